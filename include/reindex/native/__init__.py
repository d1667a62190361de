"""Optional native helpers, loaded with ctypes; every caller has a pure-Python (or simdjson) path.

``vecparse.c`` parses a JSON array of numbers straight into float32 in one pass (see its header for
the contract: the values are exactly ``float32(float(text))``, and anything unusual returns -1 so the
caller takes its general path). On x86-64 with SSE4.1 (checked at load) 16 digits are converted at
once; elsewhere a portable 8-at-a-time path runs, with the same results. It is a plain shared library with no Python API, compiled by
``python -m reindex.native`` (``make`` runs it; so does the image build) into this directory as
``_vecparse-<source hash>.so``: a library is only ever loaded for the exact source it was built from.

``vecparse`` is None when no library is built (no C compiler where the project was set up);
``REINDEX_NATIVE=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import sysconfig
from collections.abc import Callable
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "vecparse.c"
ABI_VERSION = 1


def library_path() -> Path:
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    return HERE / f"_vecparse-{digest}.so"


def compiler() -> str | None:
    """The C compiler ``build`` uses (``$CC``, else Python's own, else ``cc``), or None when there is none."""
    python_cc = (sysconfig.get_config_var("CC") or "").split()
    for name in (os.environ.get("CC"), python_cc[0] if python_cc else None, "cc"):
        found = name and shutil.which(name)
        if found:
            return found
    return None


def build(*, force: bool = False) -> Path:
    """Compile ``vecparse.c`` into ``library_path()`` (a no-op when it is there); raise when it fails."""
    target = library_path()
    if target.exists() and not force:
        return target
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler found ($CC, Python's CC, cc): the native parser is not built")
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    cmd = [cc, "-O2", "-fPIC", "-shared", "-std=c11", "-Wall", "-o", str(tmp), str(SOURCE), "-lm"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"building {SOURCE.name} failed ({shlex.join(cmd)}):\n{proc.stderr.strip()}")
    os.replace(tmp, target)
    for old in HERE.glob("_vecparse-*.so"):
        if old != target:
            old.unlink(missing_ok=True)
    return target


class VecParse:
    """The loaded library: ``parse_f32_array`` (checked) and ``bind`` (a fast call for one output buffer)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        fn = lib.rx_parse_f32_array
        fn.restype = ctypes.c_long
        fn.argtypes = (ctypes.c_char_p, ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_long)
        self._fn = fn
        self._use_simd = lib.rx_use_simd
        self._use_simd.argtypes = (ctypes.c_int,)
        self.simd = bool(self._use_simd(1))

    def use_simd(self, on: bool) -> bool:
        """Take the SSE4.1 digit path (the default where the processor has it) or the portable one, for
        the whole process; both give the same values. Returns whether the SSE path is now in use."""
        self.simd = bool(self._use_simd(int(on)))
        return self.simd

    def parse_f32_array(self, raw: bytes, start: int, end: int, out: np.ndarray) -> int:
        """Parse ``raw[start:end + 1]`` (``[`` … ``]``) into the float32 C-contiguous ``out``.

        Returns the count of numbers (only the first ``len(out)`` are written), or -1 when the text is
        not a plain array of valid JSON numbers within the double range.
        """
        return self.bind(out)(raw, start, end)

    def bind(self, out: np.ndarray) -> Callable[[bytes, int, int], int]:
        """``parse(raw, start, end)`` into ``out`` (checked once here, not per call; keep ``out`` alive)."""
        if out.dtype != np.float32 or not out.flags.c_contiguous or out.ndim != 1 or not out.flags.writeable:
            raise ValueError("out must be a writeable 1-d C-contiguous float32 array")
        fn, ptr, cap = self._fn, out.ctypes.data, len(out)

        def parse(raw: bytes, start: int, end: int) -> int:
            if not (0 <= start <= end < len(raw)):
                raise ValueError(f"array bounds [{start}, {end}] outside a line of {len(raw)} bytes")
            return fn(raw, len(raw), start, end, ptr, cap)

        return parse


def _load() -> VecParse | None:
    if os.environ.get("REINDEX_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    path = library_path()
    if not path.exists():
        log.info("native vector parser not built (%s missing: run python -m reindex.native); "
                 "using simdjson", path.name)
        return None
    lib = ctypes.CDLL(str(path))
    if lib.rx_abi_version() != ABI_VERSION or lib.rx_init() != 0:
        log.warning("native vector parser %s unusable (ABI or locale); using simdjson", path.name)
        return None
    return VecParse(lib)


vecparse = _load()
