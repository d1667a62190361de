"""Benchmark 6: the corpus scan (``prepare`` + ``chunk_corpus``) over many small documents.

A generated corpus of ``docs`` documents, one ``.txt`` file each (200–1,500 characters of Russian +
English text from ``make_texts``), in folders of ``PER_FOLDER`` files, on local disk under the bench
dir. Each run times ``pipeline.prepare`` and then ``pipeline.chunk_corpus`` — the DAG's ``prepare``
and ``chunk_corpus`` tasks — each in a process of its own (``python -m benchmarks.scan worker …``) as
the DAG runs them, so each peak RSS is its task's own (``prepare`` of the local backend loads the
model to know its checksum; the scan does not). The scan's figures are ``chunk_corpus``'s; the
``prepare`` seconds are reported beside them, and the scan's time inside SQL statements (each
``execute`` round trip and ``COPY`` block, by statement: what the server's side costs). No encoding is measured: after each scan the corpus's
lease is released (``leases.release``) so the next scan can take it.

Runs, on one store schema, in order:

1. **full**: a new corpus (fresh schema), every file read and chunked;
2. **unchanged**: the same files again — change detection should open none of them;
3. **edited**: ``edit_fraction`` of the documents (exactly that many files, chosen at random) get a
   sentence appended, then the scan again: only those files are read;
4. **GCS**: the first ``gcs_docs`` documents uploaded to the GCS emulator (in this process, a
   thread), scanned through Airflow's ``ObjectStoragePath`` exactly as the DAG's ``corpus_root``
   builds it (gcsfs underneath), full and unchanged, on a schema of their own.

Between a full scan and the unchanged one every PENDING chunk gets a stub vector (random unit
vectors through ``pipeline.plan`` + ``encode_partition``, the real load path, not timed): a nightly
run follows a run that embedded everything, and without vectors every scan would claim the whole
corpus as PENDING again. Two floors come with the local runs, without any store: the walk alone
(listing + one ``stat`` per file, as change detection does) and reading every file (walk + open +
decode + sanitize).

Files are in the OS page cache for every run (the corpus was just written or read); a cold disk is
not measured. The corpus is written once and reused while its ``manifest.json`` matches; the files
an earlier run edited are restored first.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import resource
import subprocess
import sys
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
    top = sorted(timed.items(), key=lambda kv: -kv[1][1])[:8]
    keys = ("files", "read_files", "unchanged_files", "documents", "unchanged_documents", "failed_documents",
            "deleted_documents", "chunks", "rechunked_chunks", "pending", "reused")
    return {"seconds": round(seconds, 3), "client_cpu_s": round(cpu, 2), **{k: manifest.get(k) for k in keys},
            "statements_s": round(sum(v[1] for v in timed.values()), 2),
            "statements": sum(v[0] for v in timed.values()),
            "top_statements": [{"statement": k, "calls": v[0], "seconds": round(v[1], 2)} for k, v in top]}


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

    from reindex import pipeline
    from reindex.backends import backend_for
    from reindex.store import Store
    from reindex.store.leases import release

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
    return {"seconds": round(time.perf_counter() - t0, 2), "vectors": loaded}


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
    else:
        raise ValueError(f"unknown scan worker task {task!r} (prepare, chunk, walk, read, fill)")
    out["rss_mib"] = round(peak_rss_mib(), 1)
    return out


def run_worker(params: dict, *, env: dict | None = None, timeout: float = 6 * 3600) -> dict:
    """``python -m benchmarks.scan worker '<json>'`` in a fresh interpreter; its JSON result."""
    cmd = [sys.executable, "-m", "benchmarks.scan", "worker", json.dumps(params)]
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"scan worker {params['task']} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"scan worker {params['task']} printed no result:\n{proc.stderr[-2000:]}")
    out = json.loads(lines[-1])
    out["process_seconds"] = round(time.monotonic() - started, 3)
    return out


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
        seed: int = 0, gcs: bool = True) -> dict:
    """The runs above; returns the results section (``runs`` keyed full / unchanged / edited / walk / read /
    gcs_full / gcs_unchanged, ratios to the full scans, and a linear extrapolation to 1 M / 10 M documents)."""
    if docs < 1 or not 0 < edit_fraction < 1:
        raise ValueError(f"scan benchmark: docs must be ≥ 1 (got {docs}) and edit_fraction in (0, 1) "
                         f"(got {edit_fraction})")
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
    runs["full"] = _scan("1. full scan, new corpus", base, "scan-1")
    checksum = runs["full"]["model_checksum"]
    fill = run_worker({**base, "task": "fill", "batch_id": "scan-1", "model_checksum": checksum})
    log.info("scan: stub vectors for %d chunks in %.0f s (not timed)", fill["vectors"], fill["seconds"])
    runs["unchanged"] = _scan("2. same corpus, unchanged", base, "scan-2")
    marker = work / "manifest.json"
    edited = choose_edits(docs, edit_fraction, seed=seed + 1)
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
    full = runs["full"]
    pairs = [("unchanged", "full"), ("edited", "full")] + ([("gcs_unchanged", "gcs_full")] if gcs else [])
    for key, ref in pairs:
        runs[key]["x_full"] = round(runs[key]["seconds"] / runs[ref]["seconds"], 4)
        runs[key]["x_full_total"] = round(runs[key]["total_s"] / runs[ref]["total_s"], 4)
    # the scan's seconds scaled with the corpus (prepare is a constant per run, not scaled)
    extrapolated = {str(n): {"full_s": round(n * full["seconds"] / docs),
                             "unchanged_s": round(n * runs["unchanged"]["seconds"] / docs),
                             "edited_s": round(n * runs["edited"]["seconds"] / docs)}
                    for n in (1_000_000, 10_000_000)}
    return {"docs": docs, "bytes": corpus["bytes"], "per_folder": PER_FOLDER, "chars": [MIN_CHARS, MAX_CHARS],
            "edit_fraction": edit_fraction, "gcs_docs": min(gcs_docs, docs) if gcs else None,
            "chunks_per_document": round(full["chunks"] / full["documents"], 2),
            "fill_seconds": fill["seconds"], "runs": runs, "extrapolated": extrapolated,
            "load_at_start": [round(x, 2) for x in load_at_start],
            "load_at_end": [round(x, 2) for x in os.getloadavg()]}


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "worker":
        raise SystemExit("usage: python -m benchmarks.scan worker '<json params>'")
    logging.basicConfig(level=logging.WARNING)
    result = worker(json.loads(sys.argv[2]))
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    sys.stdout.flush()
