"""Other runtimes for a local sentence-transformers model: ONNX Runtime and OpenVINO, from a cached export.

The whole model (transformer, pooling, any Dense / Normalize modules) is exported once per model revision,
offline from its local weights, to one ONNX graph whose output is the sentence embedding
(``torch.onnx.export``). The export lives in a cache keyed by the checksum of the torch model it was made
from (``REINDEX_ENCODER_CACHE``, default ``~/.cache/reindex/encoders``)::

    <cache>/<torch model checksum>/model.onnx         ONNX Runtime reads it
    <cache>/<torch model checksum>/openvino/model.xml OpenVINO's IR, converted from model.onnx
    <cache>/<torch model checksum>/export.json        what was exported, from what, when, how long it took

Every task of every run reuses it: a second run exports nothing. An export is written to a temporary folder
and renamed into place under a file lock, so two tasks starting at once export it once and a killed export
leaves nothing half-written behind. Before it is published the graph is checked against torch on texts of
other lengths and batch sizes than the one it was traced with (a graph that baked in a shape fails there).

Tokenization stays the model's own (``SentenceTransformer.preprocess``): only the forward pass changes. The
runtime and its precision are part of the ``ModelSpec`` (``runtime``, ``precision``), so their vectors are
another store: switching runtime is a model upgrade.

sentence-transformers' own ``backend="onnx"|"openvino"`` loads through Optimum, whose releases require
transformers < 5 (this project runs transformers 5): the export here uses torch's exporter and the runtimes'
own Python APIs directly, with the same result (one graph, the model's own tokenizer).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reindex.config import Encoder
from reindex.errors import ConfigError

log = logging.getLogger(__name__)

# Bump when the export changes (opset, graph wrapper): every cache entry is then made again.
EXPORT_VERSION = 1
ONNX_OPSET = 17
# An export is published only if its vectors match torch's this closely (max abs difference, fp32).
EXPORT_TOLERANCE = 1e-4
_PROBE_TEXTS = (
    "A probe sentence checks the exported graph.",
    "Проверочная фраза на русском языке, подлиннее, чтобы длина последовательности была другой.",
    "short",
)


@dataclass(frozen=True)
class Runtime:
    """How an ``Encoder`` runs: its runtime (``ModelSpec.runtime``) and numeric precision (``ModelSpec.precision``)."""

    name: str
    precision: str


RUNTIMES: dict[Encoder, Runtime] = {
    Encoder.TORCH: Runtime("torch", "fp32"),
    Encoder.ONNX: Runtime("onnx", "fp32"),
    Encoder.OPENVINO: Runtime("openvino", "fp32"),
    Encoder.OPENVINO_BF16: Runtime("openvino", "bf16"),
}


def runtime_for(encoder: str | Encoder) -> Runtime:
    try:
        return RUNTIMES[Encoder(encoder)]
    except ValueError:
        raise ConfigError(f"encoder {encoder!r} is not supported: choose one of {[e.value for e in Encoder]}") from None


def cache_root() -> Path:
    """``REINDEX_ENCODER_CACHE``: where exported models are kept (default ``~/.cache/reindex/encoders``)."""
    raw = os.environ.get("REINDEX_ENCODER_CACHE", "").strip()
    if raw:
        return Path(raw).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or str(Path.home() / ".cache")
    return Path(base) / "reindex" / "encoders"


@dataclass(frozen=True)
class Export:
    """A cached export: its folder, and whether this call made it (False: it was already there)."""

    path: Path
    exported: bool
    seconds: float = 0.0

    @property
    def onnx(self) -> Path:
        return self.path / "model.onnx"

    @property
    def openvino(self) -> Path:
        return self.path / "openvino" / "model.xml"


class _SentenceEmbedding:
    """The model's whole forward (modules after the transformer included) over positional tensors, for the
    exporter. Built lazily as an ``nn.Module`` subclass so importing this file never imports torch."""

    @staticmethod
    def wrap(model, names: list[str]):
        import torch

        class Wrapped(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, *tensors):
                return self.model(dict(zip(names, tensors, strict=True)))["sentence_embedding"]

        return Wrapped().eval()


def input_names(model) -> list[str]:
    """The tensors the model's own ``preprocess`` gives for text (``input_ids``, ``attention_mask``, …)."""
    feats = model.preprocess(["x"])
    return [k for k, v in feats.items() if hasattr(v, "shape")]


def ensure_export(model, checksum: str, *, openvino: bool = False, root: Path | None = None) -> Export:
    """The cached export of ``model`` (a loaded fp32 ``SentenceTransformer`` on CPU, the torch model whose
    ``ModelSpec.checksum`` is ``checksum``); exported now when missing. With ``openvino`` the OpenVINO IR is
    made too (from the ONNX graph) when missing. Raises ``ConfigError`` when the runtime is not installed or
    the export does not reproduce torch's vectors."""
    root = root or cache_root()
    folder = root / f"{checksum}-v{EXPORT_VERSION}"
    if _complete(folder, openvino):
        return Export(folder, exported=False)
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{folder.name}.lock"):
        if _complete(folder, openvino):  # another task made it while this one waited for the lock
            return Export(folder, exported=False)
        started = time.monotonic()
        if not (folder / "model.onnx").exists():
            _publish(folder, lambda tmp: _export_onnx(model, checksum, tmp))
        if openvino and not (folder / "openvino" / "model.xml").exists():
            _publish(folder / "openvino", lambda tmp: _convert_openvino(folder / "model.onnx", tmp))
        seconds = round(time.monotonic() - started, 3)
        log.info("exported model checksum %s to %s in %.1f s", checksum, folder, seconds)
        return Export(folder, exported=True, seconds=seconds)


def _complete(folder: Path, openvino: bool) -> bool:
    return (folder / "model.onnx").exists() and (not openvino or (folder / "openvino" / "model.xml").exists())


@contextlib.contextmanager
def _locked(path: Path):
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # blocks while another process exports the same model
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _publish(target: Path, make) -> None:
    """Make ``target`` in a temporary sibling, then rename it into place (readers never see half a folder)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private: workers running as another user read the cache too
    try:
        make(tmp)
        if target.exists():  # a partial folder of an older layout: replaced whole
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _export_onnx(model, checksum: str, out: Path) -> None:
    import torch

    names = input_names(model)
    wrapped = _SentenceEmbedding.wrap(model, names)
    feats = model.preprocess(["An example to trace the graph with.", "Ещё один пример"])
    args = tuple(feats[n] for n in names)
    axes = {n: {0: "batch", 1: "sequence"} for n in names} | {"sentence_embedding": {0: "batch"}}
    path = out / "model.onnx"
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        # the tracer warns about Python conditions on shapes it records as constants; the probe below is the check
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapped, args, str(path), dynamo=False, input_names=names,
                          output_names=["sentence_embedding"], dynamic_axes=axes, opset_version=ONNX_OPSET)
    diff = _probe_difference(model, names, _make_onnx_session(path))
    if diff > EXPORT_TOLERANCE:
        raise ConfigError(f"the ONNX export of model checksum {checksum} does not reproduce its torch vectors "
                          f"(max abs difference {diff:.2e} > {EXPORT_TOLERANCE:g}); use encoder=torch for this model")
    (out / "export.json").write_text(json.dumps({
        "checksum": checksum, "export_version": EXPORT_VERSION, "opset": ONNX_OPSET, "inputs": names,
        "torch": torch.__version__, "max_abs_diff_vs_torch": diff,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1))


def _convert_openvino(onnx_path: Path, out: Path) -> None:
    ov = _import("openvino", "openvino")
    # save_model halves the weights to fp16 by default: the fp32 runtime would then not be torch's numbers
    ov.save_model(ov.Core().read_model(str(onnx_path)), str(out / "model.xml"), compress_to_fp16=False)


def _probe_difference(model, names: list[str], forward) -> float:
    import torch

    worst = 0.0
    for texts in (list(_PROBE_TEXTS), [_PROBE_TEXTS[1]]):  # batch sizes and lengths unlike the trace's
        feats = model.preprocess(texts)
        with torch.inference_mode():
            ref = model(feats)["sentence_embedding"].float().numpy()
        got = forward({n: feats[n].numpy() for n in names})
        worst = max(worst, float(np.abs(ref - got).max()))
    return worst


def _import(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"this encoder needs the {package} package, which is not installed (pip install "
                          f"{package}; the pinned version is in requirements.txt)") from None


def _threads() -> int:
    """Threads per forward pass: ``REINDEX_ENCODER_THREADS``, else the CPUs this process may use."""
    raw = os.environ.get("REINDEX_ENCODER_THREADS", "").strip()
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise ConfigError(f"REINDEX_ENCODER_THREADS={raw!r} must be a positive integer")
        return int(raw)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _streams() -> int | None:
    """``REINDEX_ENCODER_STREAMS``: OpenVINO inference streams (batches in flight at once); unset, OpenVINO's
    ``THROUGHPUT`` choice for the threads it has (2 on a 2-core worker)."""
    raw = os.environ.get("REINDEX_ENCODER_STREAMS", "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"REINDEX_ENCODER_STREAMS={raw!r} must be a positive integer")
    return int(raw)


class Forward:
    """An exported model's forward pass: ``forward(features) -> float32 vectors`` for one batch, and
    ``forward.run_all(items, put)`` for many: ``items`` yields ``(key, features)``, ``put(key, vectors)`` is
    called for each batch, in any order, possibly from another thread, and ``run_all`` returns once every batch
    is done. ``streams`` batches run at once (1: one after the other, each on every thread)."""

    streams = 1

    def __init__(self, run) -> None:
        self._run = run

    def __call__(self, feats: dict) -> np.ndarray:
        return self._run(feats)

    def run_all(self, items, put) -> None:
        for key, feats in items:
            put(key, self._run(feats))


class _OpenVinoForward(Forward):
    """A model compiled with ``PERFORMANCE_HINT=THROUGHPUT``: its threads are split into streams, each running a
    batch of its own, fed by an ``AsyncInferQueue``. The caller tokenizes the next batch while the streams run:
    on a 2-core worker 2 streams of one thread encode ≈ 1.3 × the texts/s of one batch on both threads, with
    the same vectors (benchmarks/README.md, "Encoder runtimes"). One ``run_all`` at a time per compiled model."""

    def __init__(self, ov, compiled) -> None:
        self._compiled = compiled
        self._wanted = [i.get_any_name() for i in compiled.inputs]
        self.streams = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self._queue = ov.AsyncInferQueue(compiled, self.streams)
        self._lock = threading.Lock()

    def __call__(self, feats: dict) -> np.ndarray:
        got: dict = {}
        self.run_all([(0, feats)], got.__setitem__)
        return got[0]

    def run_all(self, items, put) -> None:
        errors: list[BaseException] = []

        def done(request, key) -> None:
            try:  # the request's output buffer is reused by its next batch: copied out here
                put(key, np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True))
            except BaseException as e:  # noqa: BLE001 - raised in the caller's thread below
                errors.append(e)

        with self._lock:
            self._queue.set_callback(done)
            try:
                for key, feats in items:  # start_async waits while every stream is busy
                    self._queue.start_async({n: np.asarray(feats[n], dtype=np.int64) for n in self._wanted}, key)
            finally:
                self._queue.wait_all()
        if errors:
            raise errors[0]


def _make_onnx_session(path: Path) -> Forward:
    """The forward pass through an ONNX Runtime CPU session (one batch at a time on every thread)."""
    ort = _import("onnxruntime", "onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = _threads()
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    wanted = [i.name for i in session.get_inputs()]

    def run(feats: dict) -> np.ndarray:
        return session.run(None, {n: np.asarray(feats[n], dtype=np.int64) for n in wanted})[0]

    return Forward(run)


# one session per graph and process
_onnx_session = functools.lru_cache(maxsize=4)(_make_onnx_session)

_OV_PRECISION = {"fp32": "f32", "bf16": "bf16"}


@functools.lru_cache(maxsize=4)
def _openvino_model(path: Path, precision: str) -> Forward:
    """The forward pass through an OpenVINO CPU model compiled at ``precision`` (fp32 or bf16), in streams
    (``_OpenVinoForward``; ``REINDEX_ENCODER_THREADS`` threads, ``REINDEX_ENCODER_STREAMS`` streams).

    OpenVINO runs bf16 by default on CPUs that have it: fp32 is asked for explicitly, and bf16 is refused
    on a CPU without bf16 support (it would silently run fp32 and store other numbers under the bf16 name).
    """
    ov = _import("openvino", "openvino")
    core = ov.Core()
    caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if precision == "bf16" and "BF16" not in caps:
        raise ConfigError(f"encoder=openvino-bf16 needs a CPU with bfloat16 support (AVX512_BF16 or AMX); this "
                          f"one offers {list(caps)}: use encoder=openvino (fp32)")
    config = {"INFERENCE_PRECISION_HINT": _OV_PRECISION[precision], "PERFORMANCE_HINT": "THROUGHPUT",
              "INFERENCE_NUM_THREADS": _threads()}
    streams = _streams()
    if streams is not None:
        config["NUM_STREAMS"] = streams
    forward = _OpenVinoForward(ov, core.compile_model(str(path), "CPU", config))
    log.info("OpenVINO %s model compiled: %d stream(s) on %d thread(s)", precision, forward.streams,
             config["INFERENCE_NUM_THREADS"])
    return forward


def forward_for(runtime: Runtime, export: Export) -> Forward:
    """The exported model's forward pass for ``runtime`` (``Forward``: ``{input name: int array} -> float32
    vectors``, one batch or many)."""
    if runtime.name == "onnx":
        return _onnx_session(export.onnx)
    if runtime.name == "openvino":
        return _openvino_model(export.openvino, runtime.precision)
    raise ConfigError(f"runtime {runtime.name!r} has no exported forward pass")
