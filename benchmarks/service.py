"""Benchmark 5: ``backend="service"`` — the remote-embedding-service client against local encoding.

The same texts (``make_texts``: Russian and English halves, 40–1,200 characters) and the same model
(the bundled MiniLM-L6) go, each measured method in a process of its own after an untimed warm-up:

* ``local``    ``LocalEncoder("default").encode(texts)`` — one call over all texts, in its own process;
               and again with one call per request-sized slice (128 texts), as the service's encoder gets them:
               ``LocalEncoder`` token-sorts the texts of one call into batches, so this row carries the same
               padding as the service's forward passes (``padded_tokens``) and separates that cost from HTTP's;
* ``service``  ``reindex.service.client.ServiceEncoder`` (seed004 protocol) against the reference service
               (``python -m reindex.emulators.embedding_service --embedder model --no-cache``) running in a
               separate process, at each client concurrency in turn (default 1, 2 and 6). The client is
               called as ``pipeline.encode_partition`` calls it: ``encode_block`` on blocks of its own
               ``block_size`` (``max_batch_size × concurrency × 2`` texts), each split into requests of
               ``max_batch_size`` texts (the service's 128 unless ``batch_size`` is given);
* ``noop``     the same client at the highest concurrency against the service with ``--embedder noop``
               (one constant vector per text, no encoding): what remains is the client's own cost plus
               HTTP and the service's framework — its wall time as a share of the model-backed run's at the
               same concurrency is the "overhead share".

The service's cache is off, so every text is encoded (checked: the service's ``texts_encoded`` must
equal the texts sent). Both the service process and the local baseline get ``OMP_NUM_THREADS`` /
``MKL_NUM_THREADS`` = ``threads`` (default: every core), so torch uses the cores the same way in both.
The service's vectors are compared with the local baseline's (max abs difference). The service's encode
timeout is raised to ``ENCODE_TIMEOUT_S`` (see there): a text that fails fails the benchmark.

Workers run as ``python -m benchmarks.service <local|client> '<json>'`` and print one JSON line.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import ROOT, bench_dir, peak_rss_mib

log = logging.getLogger("benchmarks.service")

SERVICE_START_TIMEOUT_S = 180.0  # loading the model on a busy 2-core machine
WARM_TEXTS = 16  # untimed warm-up texts per worker (first forward passes, connections)
# The service encodes one request at a time (its model is serialised), so a request at concurrency c waits up
# to c - 1 encodes in its queue, and that wait counts against its encode timeout (30 s by default). At 6 requests
# of 128 texts on a loaded 2-core machine that is more than 30 s: every queued request came back 503. The benchmark
# measures throughput, not that limit, so the service gets ENCODE_TIMEOUT_S and the client a read timeout above it.
ENCODE_TIMEOUT_S = 600.0


def _texts(n: int, seed: int) -> list[str]:
    from benchmarks.texts import make_texts

    return make_texts(n, seed=seed, min_chars=40, max_chars=1200)


def _warm_texts(n: int, seed: int) -> list[str]:
    # Other texts than the measured ones: the warm-up must not pre-encode anything measured.
    return _texts(n, seed + 1000)


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads) from ``/proc/<pid>/stat``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_peak_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# --- workers (each in its own process) ---------------------------------------------------------------

def local_worker(p: dict) -> dict:
    """The baseline: ``LocalEncoder("default").encode(texts)`` in this process."""
    import torch

    from reindex.embeddings.local import LocalEncoder

    texts = _texts(p["texts"], p["seed"])
    enc = LocalEncoder(p.get("model", "default"), device="cpu")
    enc.encode(_warm_texts(WARM_TEXTS, p["seed"]))
    lengths = enc.token_lengths(texts)
    group = p.get("request_size") or len(texts)
    # per_request: one call per request-sized slice, as the service's encoder sees the texts (same padding)
    step = group if p.get("per_request") else len(texts)
    cpu0, t0 = time.process_time(), time.perf_counter()
    vectors = np.concatenate([enc.encode(texts[i:i + step]) for i in range(0, len(texts), step)])
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    if p.get("save"):
        np.save(p["save"], vectors)
    return {"method": "local", "calls": -(-len(texts) // step), "texts": len(texts), "tokens": int(lengths.sum()),
            "padded_tokens": padded_tokens(lengths, enc.batch_size, len(texts)),
            "padded_tokens_per_request": padded_tokens(lengths, enc.batch_size, group), "request_size": group,
            "seconds": round(seconds, 3),
            "texts_per_s": round(len(texts) / seconds, 1), "cpu_s": round(cpu, 2),
            "torch_threads": torch.get_num_threads(), "batch_size": enc.batch_size,
            "model_checksum": enc.spec.checksum, "rss_mib": round(peak_rss_mib(), 1)}


def padded_tokens(lengths: np.ndarray, batch: int, group: int) -> int:
    """Tokens the forward passes carry (each batch padded to its longest text) when ``lengths`` are cut, in
    order, into groups of ``group`` texts (one service request each) and each group is token-sorted into
    batches of ``batch``, as ``LocalEncoder.encode`` sorts the texts of one call."""
    total = 0
    for start in range(0, len(lengths), group):
        ordered = np.sort(lengths[start:start + group])[::-1]
        total += sum(int(ordered[i]) * len(ordered[i:i + batch]) for i in range(0, len(ordered), batch))
    return total


def client_worker(p: dict) -> dict:
    """``ServiceEncoder.encode_block`` over the texts in the pipeline's blocks, against ``p["url"]``."""
    import httpx

    from reindex.service.client import ServiceEncoder
    from reindex.service.settings import ServiceSettings

    texts = _texts(p["texts"], p["seed"])
    settings = ServiceSettings(url=p["url"], protocol="seed004", concurrency=p["concurrency"],
                               max_batch_size=p.get("batch_size"), timeout_seconds=p["client_timeout_s"])
    pid = p.get("service_pid")
    with ServiceEncoder(settings) as enc:
        ident = enc.identity  # /model-info: the limits (untimed)
        enc.encode_block(_warm_texts(WARM_TEXTS, p["seed"]))
        httpx.post(f"{p['url']}/admin/reset", timeout=30).raise_for_status()  # the warm-up's counters out
        before = dict(enc.stats)
        block = enc.block_size
        service_cpu0 = _proc_cpu_s(pid) if pid else None
        cpu0, t0 = time.process_time(), time.perf_counter()
        parts, failures = [], []
        for start in range(0, len(texts), block):
            _ok, vecs, fails = enc.encode_block(texts[start:start + block])
            failures += [(start + i, str(code), msg) for i, code, msg in fails]
            parts += vecs
        seconds = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        service_cpu = _proc_cpu_s(pid) - service_cpu0 if pid else None
        stats = {k: enc.stats[k] - before[k] for k in enc.stats}
        server = httpx.get(f"{p['url']}/admin/stats", timeout=30).json()
        max_batch = enc.max_batch_size
    if failures:
        raise RuntimeError(f"{len(failures)} of {len(texts)} texts failed, first: {failures[0]}")
    vectors = np.concatenate(parts)
    if p.get("save"):
        np.save(p["save"], vectors)
    return {"method": "service", "texts": len(texts), "concurrency": p["concurrency"], "batch_size": max_batch,
            "block_size": block, "seconds": round(seconds, 3), "texts_per_s": round(len(texts) / seconds, 1),
            "cpu_s": round(cpu, 2), "service_cpu_s": None if service_cpu is None else round(service_cpu, 2),
            "requests": stats["requests"], "retries": stats["retries"], "bisections": stats["bisections"],
            "cached": stats["cached"], "model": ident.model_name, "model_checksum": ident.checksum,
            "service_texts_encoded": server["texts_encoded"], "service_batch_sizes": server["batch_sizes"],
            "service_max_in_flight": server["max_in_flight"], "rss_mib": round(peak_rss_mib(), 1)}


def _run(role: str, params: dict, *, env: dict | None = None, timeout: float = 1800) -> dict:
    """``python -m benchmarks.service <role> '<json>'`` in a fresh interpreter; its JSON result."""
    cmd = [sys.executable, "-m", "benchmarks.service", role, json.dumps(params)]
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"service benchmark worker {role} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"service benchmark worker {role} printed no result:\n{proc.stderr[-2000:]}")
    out = json.loads(lines[-1])
    out["process_seconds"] = round(time.monotonic() - started, 3)
    return out


# --- the reference service in a process of its own ---------------------------------------------------

class ServiceProcess:
    """``python -m reindex.emulators.embedding_service`` on a free port, its log under ``log_path``."""

    def __init__(self, embedder: str, *, env: dict, log_path: Path, encode_timeout_s: float) -> None:
        self.embedder = embedder
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "reindex.emulators.embedding_service", "--embedder", embedder, "--port", "0",
             "--no-cache", "--encode-timeout", str(encode_timeout_s), "--log-level", "WARNING"],
            cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=self._log, text=True)
        self.url = self._wait_listening()

    def _wait_listening(self) -> str:
        import threading

        import httpx

        found: list[str] = []

        def read():  # the one line it prints once serving (readline blocks: a thread, so a deadline holds)
            for line in self.proc.stdout:
                if "listening on " in line:
                    found.append(line.rsplit("listening on ", 1)[1].strip())
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(SERVICE_START_TIMEOUT_S)
        if not found:
            self.stop()
            raise RuntimeError(f"the {self.embedder} embedding service did not start within "
                               f"{SERVICE_START_TIMEOUT_S:.0f} s; its log {self.log_path}:\n"
                               f"{self.log_path.read_text(errors='replace')[-2000:]}")
        url = found[0]
        deadline = time.monotonic() + 30
        while True:  # listening is printed after start(); /health confirms requests are served
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    return url
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the embedding service at {url} does not answer /health")
            time.sleep(0.2)

    def peak_rss_mib(self) -> float | None:
        return _proc_peak_rss_mib(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


# --- the benchmark -----------------------------------------------------------------------------------

def run(data_dir: Path, *, texts: int = 1000, seed: int = 1, concurrency: tuple[int, ...] = (1, 2, 6),
        batch_size: int | None = None, threads: int | None = None, repeat: int = 1,
        encode_timeout_s: float = ENCODE_TIMEOUT_S) -> dict:
    """Local baseline and the service client at each concurrency ``repeat`` times, alternating (fastest kept,
    shared machine); then the noop service at the highest concurrency."""
    if texts < 1 or not concurrency or min(concurrency) < 1:
        raise ValueError(f"service benchmark: texts={texts} and every concurrency {concurrency} must be >= 1")
    work = bench_dir(data_dir) / "service"
    work.mkdir(parents=True, exist_ok=True)
    threads = threads or os.cpu_count() or 1
    # The same torch intra-op pool in the local baseline and in the service process.
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    client_timeout_s = encode_timeout_s + 60  # the service's 503 arrives before the client gives up
    base = {"texts": texts, "seed": seed, "client_timeout_s": client_timeout_s}
    top = max(concurrency)
    runs: dict[str, list[dict]] = {}

    def measured(label: str, role: str, params: dict, run_env: dict | None = None) -> None:
        load = os.getloadavg()[0]
        result = _run(role, {**base, **params}, env=run_env)
        result.update(label=label, load_before=round(load, 2))
        log.info("service %s: %s", label, result)
        runs.setdefault(label, []).append(result)

    service = ServiceProcess("model", env=env, log_path=work / "service-model.log", encode_timeout_s=encode_timeout_s)
    try:
        import httpx

        info = httpx.get(f"{service.url}/model-info", timeout=30).json()
        for _ in range(max(1, repeat)):
            request_size = batch_size or info["max_batch_size"]
            measured("local encode", "local", {"save": str(work / "local.npy"), "request_size": request_size}, env)
            measured(f"local encode, {request_size} texts a call (as the service's requests)", "local",
                     {"save": str(work / "local-per-request.npy"), "request_size": request_size,
                      "per_request": True}, env)
            for c in concurrency:
                measured(f"service, concurrency {c}", "client",
                         {"url": service.url, "concurrency": c, "batch_size": batch_size,
                          "service_pid": service.proc.pid, "save": str(work / f"service-{c}.npy")})
        service_rss_mib = service.peak_rss_mib()
    finally:
        service.stop()
    noop = ServiceProcess("noop", env=env, log_path=work / "service-noop.log", encode_timeout_s=encode_timeout_s)
    try:
        for _ in range(max(1, repeat)):
            measured(f"noop service, concurrency {top} (client overhead)", "client",
                     {"url": noop.url, "concurrency": top, "batch_size": batch_size,
                      "service_pid": noop.proc.pid})
    finally:
        noop.stop()

    rows = []
    for results in runs.values():
        best = dict(min(results, key=lambda r: r["seconds"]))
        best["runs_seconds"] = [r["seconds"] for r in results]
        rows.append(best)
    local = rows[0]
    reference = np.load(work / "local.npy")
    per_request = np.load(work / "local-per-request.npy")
    rows[1]["max_abs_diff_vs_local"] = float(np.abs(per_request - reference).max())
    for r in rows:
        r["x_local"] = round(local["seconds"] / r["seconds"], 2)
        if r["method"] == "service" and "noop" not in r["label"]:
            if r["service_texts_encoded"] != texts:
                raise RuntimeError(f"{r['label']}: the service encoded {r['service_texts_encoded']} texts for "
                                   f"{texts} sent: its cache is not off")
            vectors = np.load(work / f"service-{r['concurrency']}.npy")
            r["max_abs_diff_vs_local"] = float(np.abs(vectors - reference).max())
            # the same batches as the local per-request row: the same model gives the same vectors
            r["max_abs_diff_vs_local_per_request"] = float(np.abs(vectors - per_request).max())
    model_top = next(r for r in rows if r["method"] == "service" and r["concurrency"] == top and "noop" not in r["label"])
    noop_row = rows[-1]
    noop_row["overhead_share"] = round(noop_row["seconds"] / model_top["seconds"], 4)
    return {"texts": texts, "tokens": local["tokens"], "padded_tokens_local": local["padded_tokens"],
            "padded_tokens_per_request": local["padded_tokens_per_request"], "threads": threads,
            "torch_threads": local["torch_threads"],
            "batch_size": model_top["batch_size"], "concurrency": list(concurrency), "protocol": "seed004",
            "model": info["model_name"], "service_max_batch_size": info["max_batch_size"],
            "service_max_concurrent_requests": info["max_concurrent_requests"],
            "service_encode_timeout_s": info["encode_timeout_seconds"], "client_timeout_s": client_timeout_s,
            "service_rss_mib": service_rss_mib and round(service_rss_mib, 1),
            "overhead_share": noop_row["overhead_share"], "methods": rows}


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    for _name in ("reindex", "httpx", "sentence_transformers"):
        logging.getLogger(_name).setLevel(logging.WARNING)
    _role, _params = sys.argv[1], json.loads(sys.argv[2])
    _workers = {"local": local_worker, "client": client_worker}
    if _role not in _workers:
        raise SystemExit(f"unknown service benchmark worker {_role!r}: choose {', '.join(_workers)}")
    sys.stdout.write("\n" + json.dumps(_workers[_role](_params)) + "\n")
    sys.stdout.flush()
