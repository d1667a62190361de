"""Benchmark 6: the corpus scan over many small documents — one task (``prepare`` + ``chunk_corpus``) and
sharded (``list_corpus`` → ``scan_shard`` × shards → ``finish_scan``) with 1, 2 and 4 scan tasks.

A generated corpus of ``docs`` documents, one ``.txt`` file each (200–1,500 characters of Russian +
English text from ``make_texts``), in folders of ``PER_FOLDER`` files, on local disk under the bench
dir. Each run times ``pipeline.prepare`` and then the scan's tasks — each in a process of its own
(``python -m benchmarks.scan worker …``) as the DAG runs them, so each peak RSS is its task's own
(``prepare`` of the local backend loads the model to know its checksum; the scan does not). The
``prepare`` seconds are reported beside the scan's, and the scan's time inside SQL statements (each
``execute`` round trip and ``COPY`` block, by statement: what the server's side costs). No encoding is
measured: after each scan the corpus's lease is released (``leases.release``) so the next scan can take it.

Runs, in order (single task on one store schema, each sharded full run on a fresh schema of its own):

1. **full**: a new corpus (fresh schema), every file read and chunked by ``chunk_corpus``;
2. **unchanged**: the same files again — change detection should open none of them;
3. **sharded**: ``_sharded_runs`` — the full scan with 1, 2 and 4 scan tasks: a ``list`` process
   (``list_corpus``), N concurrent scan-task processes that take the shard list round-robin and each run
   ``scan_shard`` for their shards one after another on a connection of their own, then a ``finish``
   process (``finish_scan``). Airflow's per-task start-up (one per mapped ``scan_shard`` instance) is left
   out: ``benchmarks/airflow_overhead.py`` measures it. Then, on the last N's schema after stub vectors, the
   sharded unchanged and 1 %-edited runs;
4. **edited**: ``edit_fraction`` of the documents (exactly that many files, chosen at random) get a
   sentence appended, then ``chunk_corpus`` again: only those files are read;
5. **GCS**: the first ``gcs_docs`` documents uploaded to the GCS emulator (in this process, a
   thread), scanned through Airflow's ``ObjectStoragePath`` exactly as the DAG's ``corpus_root``
   builds it (gcsfs underneath), full and unchanged, on a schema of their own.

Between a full scan and the unchanged one every PENDING chunk gets a stub vector (random unit
vectors through ``pipeline.plan`` + ``encode_partition``, the real load path, not timed): a nightly
run follows a run that embedded everything, and without vectors every scan would claim the whole
corpus as PENDING again. Then ``VACUUM (ANALYZE)`` of the chunks and the vector table (not timed): what
autovacuum does in the hours between two nightly runs (hint bits, the visibility map the claim's index-only
anti-join needs); an unchanged run straight after a full load pays that pass itself. Two floors come with
the local runs, without any store: the walk alone (listing + one ``stat`` per file, as change detection does)
and reading every file (walk + open + decode + sanitize).

Files are in the OS page cache for every run (the corpus was just written or read); a cold disk is
not measured. The corpus is written once and reused while its ``manifest.json`` matches; the files
an earlier run edited are restored first.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import ROOT, bench_dir, peak_rss_mib, store_uri

log = logging.getLogger("benchmarks.scan")

CORPUS = "scan"
PER_FOLDER = 1000  # files per folder
MIN_CHARS, MAX_CHARS = 200, 1500
BUCKET = "rx-scan"
PREFIX = "corpus"
SHARD_FILES = 20_000  # REINDEX_SCAN_SHARD_FILES's default; the shard bytes are chosen per corpus (``run``)
EDIT_SUFFIX = " Edited on night {night}: the text changed here."
_PREFIX_RE = re.compile(r"^#\d+\.")
GENERATOR = 2  # bump when the generated texts change: a cached corpus of another version is written again


# ---------------------------------------------------------------------------------------------
# the corpus (orchestrator)


def folder_texts(seed: int, folder: int, count: int) -> list[str]:
    """The texts of one folder: deterministic per (seed, folder), each starting ``#<global index>.``."""
    from benchmarks.texts import make_texts

    texts = make_texts(count, seed=seed * 1_000_003 + folder, min_chars=MIN_CHARS, max_chars=MAX_CHARS)
    first = folder * PER_FOLDER
    # make_texts numbers its texts from 0; the global number keeps every document's text distinct
    # (cut back to the generated length, so a longer number keeps the text within MAX_CHARS)
    return [_PREFIX_RE.sub(f"#{first + i}.", t, count=1)[: len(t)] for i, t in enumerate(texts)]


def doc_path(root: Path, index: int) -> Path:
    return root / f"f{index // PER_FOLDER:05d}" / f"doc{index:08d}.txt"


def _folders(docs: int) -> range:
    return range((docs + PER_FOLDER - 1) // PER_FOLDER)


def _folder_count(docs: int, folder: int) -> int:
    return min(PER_FOLDER, docs - folder * PER_FOLDER)


def write_txt_corpus(root: Path, docs: int, *, seed: int = 0) -> int:
    """``docs`` one-document ``.txt`` files under ``root`` in folders of ``PER_FOLDER``; returns bytes written."""
    total = 0
    for folder in _folders(docs):
        d = root / f"f{folder:05d}"
        d.mkdir(parents=True, exist_ok=True)
        for i, text in enumerate(folder_texts(seed, folder, _folder_count(docs, folder))):
            data = text.encode()
            doc_path(root, folder * PER_FOLDER + i).write_bytes(data)
            total += len(data)
    return total


def restore_documents(root: Path, docs: int, indexes: list[int], *, seed: int = 0) -> None:
    """Rewrite documents to their generated text (undo ``edit_documents``)."""
    by_folder: dict[int, list[int]] = {}
    for i in indexes:
        by_folder.setdefault(i // PER_FOLDER, []).append(i)
    for folder, members in by_folder.items():
        texts = folder_texts(seed, folder, _folder_count(docs, folder))  # make_texts(n) depends on n
        for i in members:
            doc_path(root, i).write_bytes(texts[i - folder * PER_FOLDER].encode())


def choose_edits(docs: int, fraction: float, *, seed: int = 0) -> list[int]:
    """``round(docs * fraction)`` distinct document indexes chosen at random, sorted."""
    n = round(docs * fraction)
    return sorted(int(i) for i in np.random.default_rng(seed).choice(docs, size=n, replace=False))


def edit_documents(root: Path, indexes: list[int], *, night: int = 1) -> None:
    """Append a sentence to each of these documents (in place: each file keeps its inode; its size, mtime and
    ctime change). ``texts.edit_corpus`` edits JSONL documents; this corpus is one ``.txt`` per document."""
    suffix = EDIT_SUFFIX.format(night=night).encode()
    for i in indexes:
        with doc_path(root, i).open("ab") as f:
            f.write(suffix)


def setup(work: Path, docs: int, *, seed: int = 0) -> dict:
    """Write the corpus, or reuse the one under ``work`` when its manifest matches (edits restored first)."""
    root = work / "corpus"
    marker = work / "manifest.json"
    want = {"docs": docs, "seed": seed, "per_folder": PER_FOLDER, "min_chars": MIN_CHARS, "max_chars": MAX_CHARS,
            "generator": GENERATOR}
    if marker.exists():
        manifest = json.loads(marker.read_text())
        last = doc_path(root, docs - 1)
        if {k: manifest.get(k) for k in want} == want and last.exists() and not doc_path(root, docs).exists():
            if manifest.get("edited"):
                restore_documents(root, docs, manifest["edited"], seed=seed)
                log.info("scan %d: restored %d documents edited by the last run", docs, len(manifest["edited"]))
                manifest["edited"] = []
                marker.write_text(json.dumps(manifest))
            log.info("scan %d: reusing the corpus in %s", docs, root)
            return manifest
    if root.exists():
        subprocess.run(["rm", "-rf", str(root)], check=True)
    t0 = time.monotonic()
    size = write_txt_corpus(root, docs, seed=seed)
    manifest = {**want, "bytes": size, "root": str(root), "edited": [],
                "write_seconds": round(time.monotonic() - t0, 1)}
    marker.write_text(json.dumps(manifest))
    log.info("scan %d: wrote %d files (%.0f MiB) in %.0f s", docs, docs, size / 2**20, manifest["write_seconds"])
    return manifest


# ---------------------------------------------------------------------------------------------
# worker side: one measured scan in a process of its own


def _config(corpus: str, corpus_uri: str):
    from reindex.config import ReindexConfig

    return ReindexConfig(corpus=corpus, corpus_uri=corpus_uri, backend="local")


def _root(corpus_uri: str):
    if "://" in corpus_uri:
        sys.path.insert(0, str(ROOT / "plugins"))
        from reindex_airflow.tasks import corpus_root  # the DAG's own: ObjectStoragePath with the GCP conn

        return corpus_root(corpus_uri)
    return Path(corpus_uri)


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _prepare(p: dict) -> dict:
    """The DAG's ``prepare`` task: migrate, resolve and register the model (its own process, as in the DAG)."""
    import psycopg

    from reindex import pipeline
    from reindex.store import Store

    cfg = _config(p["corpus"], p["corpus_uri"])
    store = Store(psycopg.connect(p["uri"], autocommit=True), p["schema"])
    with contextlib.closing(store.conn):
        cpu0, t0 = _cpu_seconds(), time.perf_counter()
        prepared = pipeline.prepare(store, cfg)
        seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    return {"seconds": round(seconds, 3), "client_cpu_s": round(cpu, 2), "model_checksum": prepared["model_checksum"]}


@contextlib.contextmanager
def _statement_timer(schema: str):
    """Time every ``Cursor.execute`` (a statement's round trip: the server's work and the wait) and every
    ``Cursor.copy`` block (COPY to the staging tables, the rows built in between included), by statement.
    Yields ``{statement: [calls, seconds]}``; the statement is its first 90 characters, schema left out."""
    from psycopg import Cursor

    times: dict[str, list] = {}
    execute, copy = Cursor.execute, Cursor.copy
    prefix = f'"{schema}".'

    def name(cur, query) -> str:
        text = query.as_string(cur) if hasattr(query, "as_string") else str(query)
        return " ".join(text.replace(prefix, "").split())[:90]

    def timed_execute(self, query, params=None, **kw):
        t0 = time.perf_counter()
        try:
            return execute(self, query, params, **kw)
        finally:
            entry = times.setdefault(name(self, query), [0, 0.0])
            entry[0] += 1
            entry[1] += time.perf_counter() - t0

    @contextlib.contextmanager
    def timed_copy(self, statement, params=None, **kw):
        t0 = time.perf_counter()
        try:
            with copy(self, statement, params, **kw) as c:
                yield c
        finally:
            entry = times.setdefault(name(self, statement), [0, 0.0])
            entry[0] += 1
            entry[1] += time.perf_counter() - t0

    Cursor.execute, Cursor.copy = timed_execute, timed_copy
    try:
        yield times
    finally:
        Cursor.execute, Cursor.copy = execute, copy


def _chunk(p: dict) -> dict:
    """The DAG's ``chunk_corpus`` task (the scan), then the lease given back: no encode follows."""
    import psycopg

    from reindex import pipeline
    from reindex.store import Store
    from reindex.store.leases import release

    cfg = _config(p["corpus"], p["corpus_uri"])
    root = _root(p["corpus_uri"])
    store = Store(psycopg.connect(p["uri"], autocommit=True), p["schema"])
    with contextlib.closing(store.conn), _statement_timer(p["schema"]) as statements:
        cpu0, t0 = _cpu_seconds(), time.perf_counter()
        manifest = pipeline.chunk_corpus(store, cfg, root, batch_id=p["batch_id"], model_checksum=p["model_checksum"])
        seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
        timed = dict(statements)
        release(store, cfg.corpus, p["batch_id"])
    keys = ("files", "read_files", "unchanged_files", "documents", "unchanged_documents", "failed_documents",
            "deleted_documents", "chunks", "rechunked_chunks", "pending", "reused")
    return {"seconds": round(seconds, 3), "client_cpu_s": round(cpu, 2), **{k: manifest.get(k) for k in keys},
            "statements_s": round(sum(v[1] for v in timed.values()), 2),
            "statements": sum(v[0] for v in timed.values()),
            "top_statements": _top(timed)}


def _top(timed: dict, n: int = 8) -> list[dict]:
    return [{"statement": k, "calls": v[0], "seconds": round(v[1], 2)}
            for k, v in sorted(timed.items(), key=lambda kv: -kv[1][1])[:n]]


def _store(p: dict):
    import psycopg

    from reindex.store import Store

    return Store(psycopg.connect(p["uri"], autocommit=True), p["schema"])


def _list_task(p: dict) -> dict:
    """The DAG's ``list_corpus`` task: the lease, the batch, the listing with change detection, the shards."""
    from reindex import scan

    cfg = _config(p["corpus"], p["corpus_uri"])
    root = _root(p["corpus_uri"])
    store = _store(p)
    with contextlib.closing(store.conn), _statement_timer(p["schema"]) as statements:
        cpu0, w0, t0 = _cpu_seconds(), time.time(), time.perf_counter()
        listed = scan.list_corpus(store, cfg, root, batch_id=p["batch_id"], model_checksum=p["model_checksum"],
                                  shard_bytes=p["shard_bytes"], shard_files=p["shard_files"])
        seconds, cpu, w1 = time.perf_counter() - t0, _cpu_seconds() - cpu0, time.time()
        timed = dict(statements)
    keys = ("files", "read_files", "unchanged_files", "entries", "split_files")
    return {"seconds": round(seconds, 3), "client_cpu_s": round(cpu, 2), "wall": [w0, w1],
            **{k: listed.get(k) for k in keys}, "shards": listed["shards"],
            "statements_s": round(sum(v[1] for v in timed.values()), 2),
            "statements": sum(v[0] for v in timed.values()), "top_statements": _top(timed)}


def _shard_task(p: dict) -> dict:
    """One scan task process: ``scan_shard`` for each of ``p["shards"]`` in turn, on one connection of its own
    (as a worker slot running several mapped ``scan_shard`` instances one after another, without Airflow's
    per-task start-up)."""
    from reindex import scan

    cfg = _config(p["corpus"], p["corpus_uri"])
    root = _root(p["corpus_uri"])
    store = _store(p)
    sums: dict[str, int] = {}
    per_shard = []
    with contextlib.closing(store.conn), _statement_timer(p["schema"]) as statements:
        cpu0, w0, t0 = _cpu_seconds(), time.time(), time.perf_counter()
        for shard in p["shards"]:
            out = scan.scan_shard(store, cfg, root, batch_id=p["batch_id"], shard=shard)
            per_shard.append(out["seconds"])
            for k in ("entries", "read_files", "documents", "unchanged_documents", "failed_documents", "chunks",
                      "changed_chunks"):
                sums[k] = sums.get(k, 0) + out[k]
        seconds, cpu, w1 = time.perf_counter() - t0, _cpu_seconds() - cpu0, time.time()
        timed = dict(statements)
    return {"seconds": round(seconds, 3), "client_cpu_s": round(cpu, 2), "wall": [w0, w1], "shards": p["shards"],
            "shard_seconds": per_shard, **sums, "statements_s": round(sum(v[1] for v in timed.values()), 2),
            "statements": sum(v[0] for v in timed.values()), "top_statements": _top(timed)}


def _finish_task(p: dict) -> dict:
    """The DAG's ``finish_scan`` task (deletions, fingerprints, the claim), then the lease given back: no encode
    follows."""
    from reindex import scan
    from reindex.store.leases import release

    cfg = _config(p["corpus"], p["corpus_uri"])
    store = _store(p)
    with contextlib.closing(store.conn), _statement_timer(p["schema"]) as statements:
        cpu0, w0, t0 = _cpu_seconds(), time.time(), time.perf_counter()
        manifest = scan.finish_scan(store, cfg, batch_id=p["batch_id"], model_checksum=p["model_checksum"])
        seconds, cpu, w1 = time.perf_counter() - t0, _cpu_seconds() - cpu0, time.time()
        timed = dict(statements)
        release(store, cfg.corpus, p["batch_id"])
    keys = ("files", "read_files", "unchanged_files", "documents", "unchanged_documents", "failed_documents",
            "deleted_documents", "chunks", "rechunked_chunks", "changed_chunks", "pending", "reused", "shards")
    return {"seconds": round(seconds, 3), "client_cpu_s": round(cpu, 2), "wall": [w0, w1],
            **{k: manifest.get(k) for k in keys}, "statements_s": round(sum(v[1] for v in timed.values()), 2),
            "statements": sum(v[0] for v in timed.values()), "top_statements": _top(timed)}


def _walk(p: dict, *, read: bool) -> dict:
    """The store-free floors: listing + fingerprints of every file (``read=False``: change detection that names
    every file unchanged), or reading every file."""
    from reindex.corpus import CorpusReader, Document

    root = _root(p["corpus_uri"])
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    reader = CorpusReader(root, unchanged=None if read else (lambda files: {f.uri for f in files}))
    documents = chars = 0
    for item in reader:
        if isinstance(item, Document):
            documents += 1
            chars += len(item.text)
    return {"seconds": round(time.perf_counter() - t0, 3), "client_cpu_s": round(_cpu_seconds() - cpu0, 2),
            "files": reader.stats["files"], "read_files": reader.reads["read_files"],
            "unchanged_files": reader.reads["unchanged_files"], "documents": documents, "chars": chars}


def _fill(p: dict) -> dict:
    """Stub vectors (random unit vectors) for every PENDING chunk of the batch, through the real load path."""
    import psycopg
    from psycopg import sql

    from reindex import pipeline
    from reindex.backends import backend_for
    from reindex.store import Store
    from reindex.store.leases import release
    from reindex.store.vectors import get_embedding_store

    class StubEncoder:
        def __init__(self, spec) -> None:
            self.spec = spec
            self.rng = np.random.default_rng(0)

        def encode(self, texts: list[str]) -> np.ndarray:
            v = self.rng.standard_normal((len(texts), self.spec.dim)).astype(np.float32)
            return v / np.linalg.norm(v, axis=1, keepdims=True)

    cfg = _config(p["corpus"], p["corpus_uri"])
    store = Store(psycopg.connect(p["uri"], autocommit=True), p["schema"])
    with contextlib.closing(store.conn):
        t0 = time.perf_counter()
        pipeline.take_corpus(store, cfg, p["batch_id"])  # the scan gave the lease back
        encoder = StubEncoder(backend_for(cfg).model_spec())
        loaded = sum(pipeline.encode_partition(store, cfg, part, model_checksum=p["model_checksum"],
                                               encoder=encoder)["ready"]
                     for part in pipeline.plan(store, cfg, p["batch_id"]))
        release(store, cfg.corpus, p["batch_id"])
        # what autovacuum does in the hours between a full run and the next nightly one: hint bits and the
        # visibility map of the rows just written (the claim's anti-join is then index-only)
        t1 = time.perf_counter()
        emb = get_embedding_store(store, cfg.corpus, p["model_checksum"])
        for table in ("chunks", emb.table_name):
            store.execute(sql.SQL("VACUUM (ANALYZE) {}").format(store.t(table)))
    return {"seconds": round(t1 - t0, 2), "vectors": loaded, "vacuum_seconds": round(time.perf_counter() - t1, 2)}


def worker(params: dict) -> dict:
    task = params["task"]
    if task == "prepare":
        out = _prepare(params)
    elif task == "chunk":
        out = _chunk(params)
    elif task in ("walk", "read"):
        out = _walk(params, read=task == "read")
    elif task == "fill":
        out = _fill(params)
    elif task == "list":
        out = _list_task(params)
    elif task == "shard":
        out = _shard_task(params)
    elif task == "finish":
        out = _finish_task(params)
    else:
        raise ValueError(f"unknown scan worker task {task!r} (prepare, chunk, walk, read, fill, list, shard, finish)")
    out["rss_mib"] = round(peak_rss_mib(), 1)
    return out


def start_worker(params: dict, *, env: dict | None = None) -> tuple[subprocess.Popen, float]:
    """Start ``python -m benchmarks.scan worker '<json>'`` in a fresh interpreter (as nice as this process). Its
    output goes to temporary files, not pipes, so workers started together never block on a full pipe."""
    cmd = [sys.executable, "-m", "benchmarks.scan", "worker", json.dumps(params)]
    # closed by collect_worker, which every caller runs: the files outlive this function
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=out, stderr=err, text=True)
    proc.outputs = (out, err)  # type: ignore[attr-defined]
    return proc, time.monotonic()


def collect_worker(proc: subprocess.Popen, started: float, task: str, *, timeout: float = 6 * 3600) -> dict:
    """Wait for a worker started by ``start_worker``; its JSON result with ``process_seconds`` added."""
    out, err = proc.outputs  # type: ignore[attr-defined]
    with out, err:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"scan worker {task} ran past {timeout:.0f} s and was killed") from None
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"scan worker {task} failed ({proc.returncode}):\n{stderr[-4000:]}")
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"scan worker {task} printed no result:\n{stderr[-2000:]}")
    result = json.loads(lines[-1])
    result["process_seconds"] = round(time.monotonic() - started, 3)
    return result


def run_worker(params: dict, *, env: dict | None = None, timeout: float = 6 * 3600) -> dict:
    """``python -m benchmarks.scan worker '<json>'`` in a fresh interpreter; its JSON result."""
    proc, started = start_worker(params, env=env)
    return collect_worker(proc, started, params["task"], timeout=timeout)


# ---------------------------------------------------------------------------------------------
# orchestrator


def _measure(label: str, params: dict, env: dict | None = None) -> dict:
    load = os.getloadavg()[0]
    result = run_worker(params, env=env)
    result.update(label=label, load_before=round(load, 2))
    log.info("scan %s: %s", label, {k: result.get(k) for k in ("seconds", "read_files", "unchanged_files",
                                                                  "documents", "chunks", "rss_mib")})
    return result


def _scan(label: str, params: dict, batch_id: str, env: dict | None = None) -> dict:
    """One run of the two tasks, each in its own process as in the DAG: ``prepare``, then ``chunk_corpus``.
    ``seconds``, the rates and ``rss_mib`` are the scan's (``chunk_corpus``); ``prepare_*`` the first task's."""
    prepared = run_worker({**params, "task": "prepare"}, env=env)
    result = _measure(label, {**params, "task": "chunk", "batch_id": batch_id,
                              "model_checksum": prepared["model_checksum"]}, env)
    result.update(prepare_s=prepared["seconds"], prepare_cpu_s=prepared["client_cpu_s"],
                  prepare_rss_mib=prepared["rss_mib"], model_checksum=prepared["model_checksum"],
                  total_s=round(prepared["seconds"] + result["seconds"], 3))
    return result


def _merged_top(tops: list[list[dict]], n: int = 8) -> list[dict]:
    """The scan-task processes' top statements added up by statement (each process reports its own top 8)."""
    merged: dict[str, list] = {}
    for top in tops:
        for t in top:
            entry = merged.setdefault(t["statement"], [0, 0.0])
            entry[0] += t["calls"]
            entry[1] += t["seconds"]
    return _top(merged, n)


def _sharded_scan(label: str, params: dict, batch_id: str, tasks: int, shard_bytes: int, shard_files: int,
                  env: dict | None = None) -> dict:
    """One sharded scan as the DAG runs it, each task in a process of its own: ``prepare``, ``list_corpus``, then
    ``tasks`` concurrent scan-task processes that take the shards round-robin (each runs ``scan_shard`` for its
    shards one after another on its own connection; no process is started for no shard), then ``finish_scan``.

    ``seconds`` is list + shards + finish: the list's and finish's own seconds, and the shard stage's wall from
    the first scan task starting its first shard to the last one done (interpreter start-up and imports left
    out, as for ``chunk_corpus``'s seconds; ``shards_process_s`` has them). ``rss_mib`` is the highest peak RSS
    of the three stages' processes, ``shard_rss_mib`` the highest of the scan-task processes."""
    prepared = run_worker({**params, "task": "prepare"}, env=env)
    common = {**params, "batch_id": batch_id, "model_checksum": prepared["model_checksum"]}
    load = os.getloadavg()[0]
    listed = run_worker({**common, "task": "list", "shard_bytes": shard_bytes, "shard_files": shard_files},
                        env=env)
    shard_ids = [s["shard"] for s in listed["shards"]]
    groups = [g for g in (shard_ids[i::tasks] for i in range(tasks)) if g]
    t0 = time.monotonic()
    started = [start_worker({**common, "task": "shard", "shards": g}, env=env)
               for g in groups]
    workers = [collect_worker(proc, at, "shard") for proc, at in started]
    shards_process_s = time.monotonic() - t0
    finished = run_worker({**common, "task": "finish"}, env=env)
    shards_s = max(w["wall"][1] for w in workers) - min(w["wall"][0] for w in workers) if workers else 0.0
    stages = {"list": listed, "finish": finished}
    result = {
        "label": label, "tasks": tasks, "processes": len(groups), "shards": len(shard_ids),
        "shard_bytes": shard_bytes, "shard_files": shard_files,
        "list_s": listed["seconds"], "shards_s": round(shards_s, 3), "finish_s": finished["seconds"],
        "seconds": round(listed["seconds"] + shards_s + finished["seconds"], 3),
        "shards_process_s": round(shards_process_s, 3),
        "files": listed["files"], "read_files": listed["read_files"], "unchanged_files": listed["unchanged_files"],
        "shard_read_files": sum(w["read_files"] for w in workers),
        **{k: finished.get(k) for k in ("documents", "unchanged_documents", "failed_documents", "deleted_documents",
                                        "chunks", "rechunked_chunks", "pending", "reused")},
        "client_cpu_s": round(listed["client_cpu_s"] + finished["client_cpu_s"]
                              + sum(w["client_cpu_s"] for w in workers), 2),
        "statements_s": round(listed["statements_s"] + finished["statements_s"]
                              + sum(w["statements_s"] for w in workers), 2),
        "list_rss_mib": listed["rss_mib"], "finish_rss_mib": finished["rss_mib"],
        "shard_rss_mib": max((w["rss_mib"] for w in workers), default=None),
        "rss_mib": max([listed["rss_mib"], finished["rss_mib"]] + [w["rss_mib"] for w in workers]),
        "task_seconds": [w["seconds"] for w in workers], "task_cpu_s": [w["client_cpu_s"] for w in workers],
        "task_shards": [len(g) for g in groups],
        "stages": {k: {"seconds": v["seconds"], "client_cpu_s": v["client_cpu_s"], "statements_s": v["statements_s"],
                       "statements": v["statements"], "top_statements": v["top_statements"]}
                   for k, v in stages.items()},
        "shard_top_statements": _merged_top([w["top_statements"] for w in workers]),
        "prepare_s": prepared["seconds"], "prepare_rss_mib": prepared["rss_mib"],
        "model_checksum": prepared["model_checksum"], "load_before": round(load, 2),
    }
    log.info("scan %s: %s", label, {k: result.get(k) for k in ("seconds", "list_s", "shards_s", "finish_s", "shards",
                                                                  "processes", "read_files", "documents", "chunks",
                                                                  "rss_mib")})
    return result


def _sharded_runs(uri: str, base: dict, docs: int, corpus: dict, root: Path, work: Path, single: dict, *,
                  tasks: tuple[int, ...], shards: int, edited: list[int],
                  night: int) -> dict:
    """The sharded scans: full with each of ``tasks`` scan tasks (each on a fresh schema), then, on the last
    ``tasks`` run's schema after stub vectors, unchanged and with
    ``edited`` edited (the files are edited here and restored after). ``single``: the single-task runs of the
    same benchmark run, for the ratios."""
    shard_bytes = max(1, math.ceil(corpus["bytes"] / shards))  # ``shards`` shards of the corpus's bytes
    shard_files = SHARD_FILES
    keep = tasks[-1]
    runs: dict[str, dict] = {}
    for n in tasks:
        sbase = {**base, "schema": f"{base['schema']}_t{n}"}
        _drop_schema(uri, sbase["schema"])
        runs[f"full_{n}"] = _sharded_scan(f"1. full scan, new corpus, {n} scan task{'s' if n > 1 else ''}", sbase,
                                          f"scan-t{n}-1", n, shard_bytes, shard_files)
        if n != keep:
            _drop_schema(uri, sbase["schema"])
    kbase = {**base, "schema": f"{base['schema']}_t{keep}"}
    fill = run_worker({**kbase, "task": "fill", "batch_id": f"scan-t{keep}-1",
                       "model_checksum": runs[f"full_{keep}"]["model_checksum"]})
    runs["unchanged"] = _sharded_scan("2. same corpus, unchanged", kbase, f"scan-t{keep}-2", keep, shard_bytes,
                                      shard_files)
    marker = work / "manifest.json"
    corpus["edited"] = edited  # recorded before editing: a crash mid-edit is still restored next time
    marker.write_text(json.dumps(corpus))
    edit_documents(root, edited, night=night)
    try:
        runs["edited"] = _sharded_scan(f"3. {len(edited):,} documents edited", kbase, f"scan-t{keep}-3", keep,
                                       shard_bytes, shard_files)
    finally:
        restore_documents(root, docs, edited, seed=corpus["seed"])
        corpus["edited"] = []
        marker.write_text(json.dumps(corpus))
    runs["edited"]["edited_documents"] = len(edited)
    for r in runs.values():
        _rates(r)
    one = runs[f"full_{tasks[0]}"]
    for key in [f"full_{n}" for n in tasks]:
        r = runs[key]
        r["speedup_vs_first"] = round(one["seconds"] / r["seconds"], 3)
        r["x_single_task"] = round(r["seconds"] / single["full"]["seconds"], 4) if "full" in single else None
    for key in ("unchanged", "edited"):
        r = runs[key]
        r["x_full"] = {str(n): round(r["seconds"] / runs[f"full_{n}"]["seconds"], 4) for n in tasks}
        r["x_single_task_full"] = round(r["seconds"] / single["full"]["seconds"], 4) if "full" in single else None
    # linear in the documents from the measured stages; the shard stage of the 1-task run divided by N assumes N
    # free cores for the N scan tasks (this machine has 2), list and finish are one task each whatever N
    full1 = runs[f"full_{tasks[0]}"]
    extrapolated = {}
    for n_docs in (1_000_000, 10_000_000):
        f = n_docs / docs
        extrapolated[str(n_docs)] = {
            "list_s": round(full1["list_s"] * f), "finish_s": round(full1["finish_s"] * f),
            "full_s_by_tasks": {str(n): round((full1["list_s"] + full1["shards_s"] * tasks[0] / n
                                               + full1["finish_s"]) * f) for n in (1, 4, 16, 64)},
            "unchanged_s": round(runs["unchanged"]["seconds"] * f), "edited_s": round(runs["edited"]["seconds"] * f)}
    return {"tasks": list(tasks), "shards_target": shards,
            "shard_bytes": shard_bytes, "shard_files": shard_files, "kept_tasks": keep, "fill_seconds": fill["seconds"],
            "vacuum_seconds": fill["vacuum_seconds"],
            "runs": runs, "extrapolated": extrapolated}


def _drop_schema(uri: str, schema: str) -> None:
    import psycopg
    from psycopg import sql

    with contextlib.closing(psycopg.connect(uri, autocommit=True)) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@contextlib.contextmanager
def _gcs_sample(root: Path, docs: int):
    """The GCS emulator (a thread of this process) with the first ``docs`` documents under ``gs://BUCKET/PREFIX/``;
    yields the worker's environment."""
    from reindex.emulators.gcs import anonymous_client, start_gcs_emulator

    url, stop = start_gcs_emulator(buckets=[BUCKET], set_env=False)
    try:
        bucket = anonymous_client(url).bucket(BUCKET)
        t0 = time.monotonic()
        for i in range(docs):
            path = doc_path(root, i)
            bucket.blob(f"{PREFIX}/{path.parent.name}/{path.name}").upload_from_filename(str(path),
                                                                                        content_type="text/plain")
        log.info("uploaded %d documents to the GCS emulator in %.0f s", docs, time.monotonic() - t0)
        yield {"STORAGE_EMULATOR_HOST": url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
               "AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT": json.dumps(
                   {"conn_type": "google_cloud_platform", "extra": {"is_anonymous": True, "project": "emulator"}}),
               "AIRFLOW_HOME": str(root.parent / "airflow"), "AIRFLOW__CORE__LOAD_EXAMPLES": "false"}
    finally:
        stop()


def _rates(run: dict) -> None:
    s = run["seconds"]
    run["documents_per_s"] = round(run["documents"] / s, 1) if s else None
    run["chunks_per_s"] = round(run["rechunked_chunks"] / s, 1) if s and run.get("rechunked_chunks") is not None \
        else None


def run(data_dir: Path, *, docs: int = 200_000, edit_fraction: float = 0.01, gcs_docs: int = 2_000,
        seed: int = 0, gcs: bool = True, tasks: tuple[int, ...] = (1, 2, 4),
        shards: int = 24, single: bool = True) -> dict:
    """The runs above; returns the results section (``runs`` keyed full / unchanged / edited / walk / read /
    gcs_full / gcs_unchanged, ratios to the full scans, and a linear extrapolation to 1 M / 10 M documents;
    ``sharded``: the sharded scan's runs with each of ``tasks`` scan tasks, see ``_sharded_runs``; none when
    ``tasks`` is empty). ``shards``: the shard bytes are the corpus's bytes over this (24 shards: work for 1, 2
    and 4 tasks alike). ``single=False`` leaves out the single-task runs (full, unchanged, edited; at 1M documents
    they alone take an hour here): the floors, the sharded runs and the GCS sample remain."""
    if docs < 1 or not 0 < edit_fraction < 1:
        raise ValueError(f"scan benchmark: docs must be ≥ 1 (got {docs}) and edit_fraction in (0, 1) "
                         f"(got {edit_fraction})")
    if not single and not tasks:
        raise ValueError("scan benchmark: without the single-task runs, give at least one sharded run (tasks)")
    if any(n < 1 for n in tasks) or shards < 1:
        raise ValueError(f"scan benchmark: scan tasks must be ≥ 1 (got {list(tasks)}) and "
                         f"shards ≥ 1 (got {shards})")
    load_at_start = os.getloadavg()
    work = bench_dir(data_dir) / f"scan-{docs}"
    work.mkdir(parents=True, exist_ok=True)
    corpus = setup(work, docs, seed=seed)
    root = Path(corpus["root"])
    uri = store_uri(data_dir)
    schema = f"scan_{docs}"
    base = {"uri": uri, "schema": schema, "corpus": CORPUS, "corpus_uri": str(root)}
    runs: dict[str, dict] = {}
    _drop_schema(uri, schema)
    runs["walk"] = _measure("walk: listing + one stat per file, no store", {**base, "task": "walk"})
    runs["read"] = _measure("read every file, no store", {**base, "task": "read"})
    fill = None
    if single:
        runs["full"] = _scan("1. full scan, new corpus", base, "scan-1")
        checksum = runs["full"]["model_checksum"]
        fill = run_worker({**base, "task": "fill", "batch_id": "scan-1", "model_checksum": checksum})
        log.info("scan: stub vectors for %d chunks in %.0f s, VACUUM %.0f s (not timed)", fill["vectors"],
                 fill["seconds"], fill["vacuum_seconds"])
        runs["unchanged"] = _scan("2. same corpus, unchanged", base, "scan-2")
    marker = work / "manifest.json"
    edited = choose_edits(docs, edit_fraction, seed=seed + 1)
    sharded = None
    if tasks:
        # the same documents edited (and restored after) for the sharded edited run; the full and unchanged
        # sharded runs see the corpus the single-task runs 1 and 2 saw
        sharded = _sharded_runs(uri, base, docs, corpus, root, work, runs, tasks=tuple(tasks),
                                shards=shards, edited=edited, night=seed + 1)
    if single:
        corpus["edited"] = edited  # recorded before editing: a crash mid-edit is still restored next time
        marker.write_text(json.dumps(corpus))
        edit_documents(root, edited, night=seed + 1)
        runs["edited"] = _scan(f"3. {len(edited):,} documents edited ({edit_fraction:.0%})", base, "scan-3")
        runs["edited"]["edited_documents"] = len(edited)
    if gcs:
        n = min(gcs_docs, docs)
        gschema = f"scan_gcs_{n}"
        _drop_schema(uri, gschema)
        gbase = {**base, "schema": gschema, "corpus": "scan_gcs", "corpus_uri": f"gs://{BUCKET}/{PREFIX}/"}
        with _gcs_sample(root, n) as env:
            runs["gcs_full"] = _scan(f"4. GCS emulator, {n:,} objects, full", gbase, "scan-gcs-1", env)
            run_worker({**gbase, "task": "fill", "batch_id": "scan-gcs-1",
                        "model_checksum": runs["gcs_full"]["model_checksum"]}, env=env)
            runs["gcs_unchanged"] = _scan(f"5. GCS emulator, {n:,} objects, unchanged", gbase, "scan-gcs-2", env)
    for key in ("read", "full", "unchanged", "edited", "gcs_full", "gcs_unchanged"):
        if key in runs:
            _rates(runs[key])
    pairs = ([("unchanged", "full"), ("edited", "full")] if single else []) + \
        ([("gcs_unchanged", "gcs_full")] if gcs else [])
    for key, ref in pairs:
        runs[key]["x_full"] = round(runs[key]["seconds"] / runs[ref]["seconds"], 4)
        runs[key]["x_full_total"] = round(runs[key]["total_s"] / runs[ref]["total_s"], 4)
    # the scan's seconds scaled with the corpus (prepare is a constant per run, not scaled)
    extrapolated = {str(n): {"full_s": round(n * runs["full"]["seconds"] / docs),
                             "unchanged_s": round(n * runs["unchanged"]["seconds"] / docs),
                             "edited_s": round(n * runs["edited"]["seconds"] / docs)}
                    for n in (1_000_000, 10_000_000)} if single else None
    full = runs["full"] if single else sharded["runs"][f"full_{tasks[0]}"]
    return {"docs": docs, "bytes": corpus["bytes"], "per_folder": PER_FOLDER, "chars": [MIN_CHARS, MAX_CHARS],
            "edit_fraction": edit_fraction, "gcs_docs": min(gcs_docs, docs) if gcs else None,
            "chunks_per_document": round(full["chunks"] / full["documents"], 2),
            "fill_seconds": fill["seconds"] if fill else None, "runs": runs, "extrapolated": extrapolated, "sharded": sharded,
            "load_at_start": [round(x, 2) for x in load_at_start],
            "load_at_end": [round(x, 2) for x in os.getloadavg()]}


def _cell(v, digits: int = 2) -> str:
    if v is None:
        return "–"
    return f"{v:,.{digits}f}" if isinstance(v, float) and digits else f"{round(v):,}"


def sharded_table(r: dict) -> str:
    """The sharded scan's markdown (``r``: the ``scan`` section of a results JSON, with ``sharded``)."""
    sh = r["sharded"]
    runs, single = sh["runs"], r["runs"]
    tasks = sh["tasks"]
    out = [f"**Sharded scan** (`list_corpus` → `scan_shard` × shards → `finish_scan`, each task a process of its "
           f"own; `prepare` before it, not counted), {r['docs']:,} documents, {r['bytes'] / 2**20:,.0f} MiB: "
           f"shard bytes {sh['shard_bytes']:,} (the corpus over {sh['shards_target']}), shard files "
           f"{sh['shard_files']:,}; N scan-task processes take the shards round-robin, each runs its shards one "
           "after another on its own connection:", "",
           "| run | scan tasks | shards | list s | shards s | finish s | total s | documents/s | chunks/s "
           f"| × {tasks[0]} task{'s' if tasks[0] > 1 else ''} | × single-task full | files read | chunks to embed | peak RSS MiB list / shard task / finish "
           "| CPU s | in SQL s | load before |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    full = single.get("full")
    if full:
        out.append(f"| single task (`chunk_corpus`), full, same run | 1 | – | – | – | – | {_cell(full['seconds'])} | "
                   f"{_cell(full.get('documents_per_s'), 0)} | {_cell(full.get('chunks_per_s'), 0)} | – | 100.0% | "
                   f"{_cell(full['read_files'])} | {_cell(full['pending'])} | {_cell(full['rss_mib'], 0)} (one task) | "
                   f"{_cell(full['client_cpu_s'])} | {_cell(full['statements_s'])} | {_cell(full['load_before'])} |")
    for key in [f"full_{n}" for n in tasks] + [k for k in ("unchanged", "edited") if k in runs]:
        x = runs[key]
        rss = (f"{_cell(x['list_rss_mib'], 0)} / {_cell(x['shard_rss_mib'], 0) if x['shard_rss_mib'] else '–'} / "
               f"{_cell(x['finish_rss_mib'], 0)}")
        speed = f"{x['speedup_vs_first']:.2f} ×" if x.get("speedup_vs_first") else "–"
        vs_single = x.get("x_single_task", x.get("x_single_task_full"))
        vs_single = "–" if vs_single is None else f"{vs_single:.1%}"
        out.append(f"| {x['label']} | {x['tasks']} ({x['processes']} started) | {x['shards']} | {_cell(x['list_s'])} | "
                   f"{_cell(x['shards_s'])} | {_cell(x['finish_s'])} | {_cell(x['seconds'])} | "
                   f"{_cell(x.get('documents_per_s'), 0)} | {_cell(x.get('chunks_per_s'), 0)} | {speed} | "
                   f"{vs_single} | {_cell(x['read_files'])} | {_cell(x['pending'])} | {rss} | "
                   f"{_cell(x['client_cpu_s'])} | {_cell(x['statements_s'])} | {_cell(x['load_before'])} |")
    notes = []
    for key in [k for k in ("unchanged", "edited") if k in runs]:
        x = runs[key]
        ratios = ", ".join(f"{x['x_full'][str(n)]:.1%} of the {n}-task full scan" for n in tasks)
        notes.append(f"{x['label']} (list + {'shards + ' if x['shards'] else ''}finish = {x['seconds']:.2f} s): "
                     f"{ratios}" + (f"; {x['x_single_task_full']:.1%} of the single-task full scan."
                                    if x.get("x_single_task_full") is not None else "."))
    out += ["", "Ratios: " + " ".join(notes)]
    ex = sh["extrapolated"]
    out += ["", "**Extrapolation, not measured** (linear in the documents from the "
                f"{tasks[0]}-task sharded run's stages; the shard stage divided by N assumes N free cores and a "
                "database that keeps up; list and finish are one task each whatever N):", "",
            "| documents | list s | finish s | full, 1 task | full, 4 tasks | full, 16 tasks | full, 64 tasks | "
            "unchanged s | 1 % edited s |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n_docs, v in ex.items():
        f = v["full_s_by_tasks"]
        out.append(f"| {int(n_docs):,} | {v['list_s']:,} | {v['finish_s']:,} | {f['1']:,} | {f['4']:,} | {f['16']:,} | "
                   f"{f['64']:,} | {v['unchanged_s']:,} | {v['edited_s']:,} |")
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "report":
        sys.stdout.write(sharded_table(json.loads(Path(sys.argv[2]).read_text())["scan"]) + "\n")
        raise SystemExit(0)
    if len(sys.argv) != 3 or sys.argv[1] != "worker":
        raise SystemExit("usage: python -m benchmarks.scan worker '<json params>' | report <results.json>")
    logging.basicConfig(level=logging.WARNING)
    result = worker(json.loads(sys.argv[2]))
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    sys.stdout.flush()
