"""Benchmark 1: Vertex result ingest (classic-model result JSONL, 768-d) → READY rows.

Setup (not timed, cached under the bench dir): a corpus of ``n`` one-chunk documents is chunked into
its own schema by the pipeline (``prepare`` + ``chunk_corpus``, backend vertex, text-embedding-005 at
768-d), which claims every chunk into batch ``bench-ingest``; then result files are generated from
the chunks' texts in Google's output format (``predictions_00NN.jsonl``, 25,000 lines each; values
written as shortest-repr float64 text, ≈ 16 KB per line), plus the same vectors as one COPY BINARY
file for the limit.

Methods, each in its own subprocess (peak RSS per method), each starting from the same state (the
vector table empty, the batch's chunks PENDING):

* ``limit``     server-side ``COPY emb FROM '<file>' (FORMAT BINARY)`` of the same rows;
* ``executemany`` ``json.loads`` per line + ``executemany`` upsert of 1,000 rows + status update per batch;
* ``pgvector``  pgvector-python's documented way: ``json.loads``, then ``copy.write_row`` per row into
                ``COPY … FROM STDIN (FORMAT BINARY)`` with ``register_vector``; then one status update;
* ``project``   ``reindex.vertex.batch.ingest_ranges`` — what the mapped ``ingest_results`` task runs —
                once per planned partition, from local disk or through the GCS emulator.

After each method the table is checked: every chunk READY (the limit only loads vectors), and a
sample of the stored vectors identical to the limit's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orjson

from benchmarks.common import ROOT, bench_dir, peak_rss_mib, store_uri

DIM = 768
BATCH_ID = "bench-ingest"
CORPUS = "bench"
LINES_PER_FILE = 25_000
BUCKET = "bench-results"
OUTPUT_DIR = "prediction-text-embedding-005-2026_11_23T00_00_00_000Z"
COPY_HEADER_LEN = 19  # PGCOPY signature + flags + header extension length
log = logging.getLogger("benchmarks.ingest")


def _config(corpus_dir: Path):
    from reindex.config import ReindexConfig

    return ReindexConfig(corpus=CORPUS, corpus_uri=str(corpus_dir), backend="vertex", model="text-embedding-005",
                         output_dimensionality=DIM, index_type="none", max_tokens=1024, overlap_tokens=32)


def _connect(uri: str, schema: str):
    import psycopg

    from reindex.store import Store

    return Store(psycopg.connect(uri, autocommit=True), schema)


# ---------------------------------------------------------------------------------------------
# setup (orchestrator)


def setup(data_dir: Path, n: int, *, seed: int = 0, limit_file: bool = True) -> dict:
    """Chunk a corpus of ``n`` documents and write its result files; reuse them when already there."""
    from psycopg import sql

    from reindex import pipeline
    from reindex.store.vectors import get_embedding_store

    work = bench_dir(data_dir) / f"ingest-{n}"
    marker = work / "manifest.json"
    uri = store_uri(data_dir)
    schema = f"ingest_{n}"
    if marker.exists():
        manifest = json.loads(marker.read_text())
        with contextlib.closing(_connect(uri, schema).conn) as conn:
            ok = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone()
        if ok and manifest.get("seed") == seed and (manifest.get("limit_file") or not limit_file):
            log.info("ingest %d: reusing %s", n, work)
            from reindex.store.schema import ensure_schema

            store = _connect(uri, schema)
            with contextlib.closing(store.conn):
                ensure_schema(store)  # migrations added since the data was made
            return manifest
    work.mkdir(parents=True, exist_ok=True)
    corpus_dir = work / "corpus"
    corpus_dir.mkdir(exist_ok=True)
    from benchmarks.texts import make_texts

    t0 = time.monotonic()
    with (corpus_dir / "docs.jsonl").open("wb") as f:
        for i, text in enumerate(make_texts(n, seed=seed)):
            f.write(orjson.dumps({"id": f"d{i:07d}", "text": text}) + b"\n")
    store = _connect(uri, schema)
    store.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    cfg = _config(corpus_dir)
    prepared = pipeline.prepare(store, cfg)
    chunked = pipeline.chunk_corpus(store, cfg, corpus_dir, batch_id=BATCH_ID,
                                    model_checksum=prepared["model_checksum"])
    emb = get_embedding_store(store, CORPUS, prepared["model_checksum"])
    (pending,) = store.one(sql.SQL("SELECT count(*) FROM {} WHERE batch_id = %s").format(store.t("chunks")),
                           (BATCH_ID,))
    log.info("ingest %d: corpus chunked in %.0f s (%d chunks)", n, time.monotonic() - t0, pending)
    if pending != n:
        raise RuntimeError(f"expected {n} chunks in the batch, found {pending} ({chunked})")

    out_dir = work / "results" / OUTPUT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files: list[str] = []
    limit_path = work / "limit.bin"
    from reindex.store.vectors import copy_binary_payload

    t0 = time.monotonic()
    with store.conn.cursor(name="gen") as cur, (limit_path.open("wb") if limit_file else open(os.devnull, "wb")) as lim:
        store.conn.autocommit = False
        cur.itersize = 1000
        cur.execute(sql.SQL("SELECT id, text, content_sha256 FROM {} WHERE batch_id = %s ORDER BY id").format(
            store.t("chunks")), (BATCH_ID,))
        lim.write(copy_binary_payload(np.zeros(0, np.int64), [], np.zeros((0, DIM), np.float32))[:COPY_HEADER_LEN])
        out = None
        written = 0
        while True:
            rows = cur.fetchmany(1000)
            if not rows:
                break
            vecs = rng.normal(size=(len(rows), DIM))
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            payload = copy_binary_payload(np.array([r[0] for r in rows], np.int64), [r[2] for r in rows],
                                          vecs.astype(np.float32))
            lim.write(payload[COPY_HEADER_LEN:-2])
            for (_, text, _), v in zip(rows, vecs, strict=True):
                if written % LINES_PER_FILE == 0:
                    if out:
                        out.close()
                    path = out_dir / f"predictions_{written // LINES_PER_FILE + 1:04d}.jsonl"
                    files.append(str(path))
                    out = path.open("wb")
                out.write(orjson.dumps({
                    "instance": {"content": text},
                    "predictions": [{"embeddings": {
                        "statistics": {"truncated": False, "token_count": max(1, len(text) // 4)}, "values": v}}],
                    "status": ""}, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")
                written += 1
        if out:
            out.close()
        lim.write(b"\xff\xff")
        store.conn.commit()
        store.conn.autocommit = True
    size = sum(Path(f).stat().st_size for f in files)
    log.info("ingest %d: wrote %d lines (%.0f MiB) in %.0f s", n, written, size / 2**20, time.monotonic() - t0)
    store.conn.close()
    manifest = {"n": n, "seed": seed, "uri": uri, "schema": schema, "table": emb.table_name,
                "model_checksum": prepared["model_checksum"], "corpus_dir": str(corpus_dir),
                "files": files, "bytes": size, "limit_file": str(limit_path) if limit_file else None}
    marker.write_text(json.dumps(manifest, indent=1))
    return manifest


def setup_halfvec(manifest: dict) -> dict:
    """The ``halfvec`` store of the same model (``storage="halfvec"``: its own checksum and table, created
    as the pipeline creates it, not active) and the same vectors as ``limit.bin`` as one halfvec COPY file."""
    from psycopg import sql

    from reindex.backends import backend_for
    from reindex.store.vectors import copy_binary_payload, ensure_embedding_store

    path = Path(manifest["limit_file"]).with_name("limit-halfvec.bin")
    store = _connect(manifest["uri"], manifest["schema"])
    with contextlib.closing(store.conn):
        spec = backend_for(_config(Path(manifest["corpus_dir"]))).model_spec().stored_as("halfvec")
        emb = ensure_embedding_store(store, CORPUS, spec, activate=False)
        out = {"halfvec_file": str(path), "halfvec_table": emb.table_name, "halfvec_checksum": emb.model_checksum}
        if path.exists():
            return out
        rng = np.random.default_rng(manifest["seed"])  # replays setup()'s vectors block by block
        rows = store.execute(sql.SQL("SELECT id, content_sha256 FROM {} WHERE batch_id = %s ORDER BY id").format(
            store.t("chunks")), (BATCH_ID,)).fetchall()
        with path.open("wb") as f:
            f.write(copy_binary_payload(np.zeros(0, np.int64), [], np.zeros((0, DIM), np.float32))[:COPY_HEADER_LEN])
            for start in range(0, len(rows), 1000):
                block = rows[start:start + 1000]
                vecs = rng.normal(size=(len(block), DIM))
                vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
                payload = copy_binary_payload(np.array([r[0] for r in block], np.int64), [r[1] for r in block],
                                              vecs.astype(np.float32), storage="halfvec")
                f.write(payload[COPY_HEADER_LEN:-2])
            f.write(b"\xff\xff")
    return out


def method_limit_halfvec(p: dict) -> dict:
    return _copy_file(p, p["halfvec_table"], p["halfvec_file"])


def reset(manifest: dict, halfvec_table: str | None = None) -> None:
    """Empty the vector table(s), chunks back to PENDING, vacuum and checkpoint (same start for every method)."""
    from psycopg import sql

    store = _connect(manifest["uri"], manifest["schema"])
    with contextlib.closing(store.conn):
        for table in filter(None, (manifest["table"], halfvec_table)):
            store.execute(sql.SQL("TRUNCATE {}").format(store.t(table)))
        store.execute(sql.SQL("""UPDATE {} SET embedding_status = 'PENDING', error_code = NULL, error_message = NULL
            WHERE batch_id = %s AND embedding_status <> 'PENDING'""").format(store.t("chunks")), (BATCH_ID,))
        store.execute(sql.SQL("VACUUM ANALYZE {}").format(store.t("chunks")))
        for table in filter(None, (manifest["table"], halfvec_table)):
            store.execute(sql.SQL("VACUUM ANALYZE {}").format(store.t(table)))
        store.execute("CHECKPOINT")


def check(manifest: dict, table: str | None = None) -> dict:
    """Rows loaded, chunks READY, and an md5 of a sample of the stored vectors (must equal the limit's)."""
    from psycopg import sql

    table = table or manifest["table"]
    store = _connect(manifest["uri"], manifest["schema"])
    with contextlib.closing(store.conn):
        (rows,) = store.one(sql.SQL("SELECT count(*) FROM {}").format(store.t(table)))
        (ready,) = store.one(sql.SQL("SELECT count(*) FROM {} WHERE batch_id = %s AND embedding_status = 'READY'")
                             .format(store.t("chunks")), (BATCH_ID,))
        (sample,) = store.one(sql.SQL("""SELECT md5(string_agg(embedding::text, ';' ORDER BY chunk_pk)) FROM {}
            WHERE chunk_pk % 997 = 0""").format(store.t(table)))
    return {"table_rows": rows, "ready": ready, "sample_md5": sample}


# ---------------------------------------------------------------------------------------------
# GCS emulator (its own process, so its CPU and memory are not the measured method's)


@contextlib.contextmanager
def gcs_emulator(manifest: dict):
    """Start ``python -m reindex.emulators.gcs`` (in memory) and upload the result files; yields its URL."""
    from reindex.emulators.gcs import anonymous_client, free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "reindex.emulators.gcs", "--port", str(port), "--bucket", BUCKET],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        import urllib.request

        for _ in range(200):
            try:
                urllib.request.urlopen(url + "/", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        client = anonymous_client(url)
        bucket = client.bucket(BUCKET)
        t0 = time.monotonic()
        for f in manifest["files"]:
            bucket.blob(f"{OUTPUT_DIR}/{Path(f).name}").upload_from_filename(f)
        log.info("uploaded %d result files to the GCS emulator in %.0f s", len(manifest["files"]),
                 time.monotonic() - t0)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ---------------------------------------------------------------------------------------------
# methods (worker side: each runs in its own process)


def _iter_lines(files):
    for path in files:
        with open(path, "rb") as f:
            yield from f


def _sha_to_pk(store) -> dict[str, int]:
    from psycopg import sql

    return dict(store.execute(sql.SQL("SELECT content_sha256, id FROM {} WHERE batch_id = %s").format(
        store.t("chunks")), (BATCH_ID,)).fetchall())


def _mark_ready(store, pks) -> None:
    from psycopg import sql

    store.execute(sql.SQL("""UPDATE {} SET embedding_status = 'READY', error_code = NULL, error_message = NULL,
        updated_at = now() WHERE id = ANY(%s)""").format(store.t("chunks")), (list(pks),))


def _copy_file(p: dict, table: str, path: str) -> dict:
    """The limit: one server-side ``COPY table FROM '<path>' (FORMAT BINARY)``; seconds and table size."""
    from psycopg import sql

    store = _connect(p["uri"], p["schema"])
    t0 = time.perf_counter()
    store.execute(sql.SQL("COPY {} (chunk_pk, content_sha256, embedding) FROM {} (FORMAT BINARY)").format(
        store.t(table), sql.Literal(path)))
    seconds = time.perf_counter() - t0
    size = store.one(sql.SQL("SELECT pg_total_relation_size(%s)"), (f"{p['schema']}.{table}",))[0]
    return {"seconds": seconds, "rows": p["n"], "table_mib": round(size / 2**20, 1)}


def method_limit(p: dict) -> dict:
    return _copy_file(p, p["table"], p["limit_file"])


def method_executemany(p: dict) -> dict:
    """The plain way to load result lines: json.loads per line, executemany upserts of 1,000 rows."""
    import hashlib

    from pgvector.psycopg import register_vector
    from psycopg import sql

    store = _connect(p["uri"], p["schema"])
    register_vector(store.conn)
    t0 = time.perf_counter()
    pks = _sha_to_pk(store)
    query = sql.SQL("""INSERT INTO {} (chunk_pk, content_sha256, embedding) VALUES (%s, %s, %s)
        ON CONFLICT (chunk_pk) DO UPDATE SET content_sha256 = EXCLUDED.content_sha256,
        embedding = EXCLUDED.embedding, updated_at = now()""").format(store.t(p["table"]))
    rows = []
    loaded = 0

    def flush():
        with store.conn.transaction(), store.conn.cursor() as cur:
            cur.executemany(query, rows)
            _mark_ready(store, [r[0] for r in rows])

    for line in _iter_lines(p["files"]):
        obj = json.loads(line)
        sha = hashlib.sha256(obj["instance"]["content"].encode()).hexdigest()
        values = obj["predictions"][0]["embeddings"]["values"]
        rows.append((pks[sha], sha, np.array(values, dtype=np.float32)))
        if len(rows) == 1000:
            flush()
            loaded += len(rows)
            rows = []
    if rows:
        flush()
        loaded += len(rows)
    return {"seconds": time.perf_counter() - t0, "rows": loaded}


def method_pgvector(p: dict) -> dict:
    """pgvector-python's documented bulk load: COPY BINARY, ``write_row`` per row (after json.loads)."""
    import hashlib

    from pgvector.psycopg import register_vector
    from psycopg import sql

    store = _connect(p["uri"], p["schema"])
    register_vector(store.conn)
    t0 = time.perf_counter()
    pks = _sha_to_pk(store)
    loaded = 0
    with store.conn.transaction(), store.conn.cursor() as cur:
        with cur.copy(sql.SQL("COPY {} (chunk_pk, content_sha256, embedding) FROM STDIN WITH (FORMAT BINARY)")
                      .format(store.t(p["table"]))) as copy:
            copy.set_types(["int8", "text", "vector"])
            for line in _iter_lines(p["files"]):
                obj = json.loads(line)
                sha = hashlib.sha256(obj["instance"]["content"].encode()).hexdigest()
                copy.write_row([pks[sha], sha, np.array(obj["predictions"][0]["embeddings"]["values"],
                                                        dtype=np.float32)])
                loaded += 1
        store.execute(sql.SQL("""UPDATE {} SET embedding_status = 'READY', error_code = NULL, error_message = NULL,
            updated_at = now() WHERE batch_id = %s""").format(store.t("chunks")), (BATCH_ID,))
    return {"seconds": time.perf_counter() - t0, "rows": loaded}


_task: dict = {}


def _task_init(p: dict) -> None:
    """One "task" process: its own connection, as each mapped ``ingest_results`` task has."""
    from reindex.backends import backend_for
    from reindex.store.vectors import get_embedding_store
    from reindex.vertex import parse

    variant = p.get("variant") or {}
    if "prefetch" in variant:
        parse.DEFAULT_PREFETCH = int(variant["prefetch"])
    if "fast_values" in variant:
        parse.FAST_VALUES = bool(variant["fast_values"])
    if "native" in variant:
        parse.NATIVE_VALUES = bool(variant["native"]) and parse.native.vecparse is not None
    if variant.get("proposal"):
        from benchmarks import proposals

        proposals.apply(variant["proposal"])
    backend = backend_for(_config(Path(p["corpus_dir"])))
    spec = backend.model_spec()
    checksum = p["model_checksum"]
    if p.get("storage") == "halfvec":
        spec, checksum = spec.stored_as("halfvec"), p["halfvec_checksum"]
    store = _connect(p["uri"], p["schema"])
    client = None
    if p.get("gcs_url"):
        from reindex.emulators.gcs import anonymous_client

        client = anonymous_client(p["gcs_url"])
    _task.update(store=store, emb=get_embedding_store(store, CORPUS, checksum), spec=spec,
                 family=backend.family, client=client, block_lines=variant.get("block_lines"))


def _local_open(r):
    return open(r.uri, "rb")  # noqa: SIM115 - stream_results closes it


def _task_ingest(ranges: list[dict]) -> dict:
    from reindex.vertex import batch

    extra = {"block_lines": int(_task["block_lines"])} if _task["block_lines"] else {}
    out = batch.ingest_ranges(_task["store"], _task["emb"], _task["spec"], BATCH_ID, ranges, _task["family"],
                              storage_client=_task["client"], open_range=None if _task["client"] else _local_open,
                              **extra)
    return {k: out[k] for k in ("ready", "failed", "lines")}


def _task_ready(_) -> int:
    return os.getpid()


def method_project(p: dict) -> dict:
    """``ingest_ranges`` per partition, as the mapped ``ingest_results`` task runs it: with ``tasks`` = 1 one
    partition after the other in this process; with ``tasks`` = N, N task processes (forked, each with its
    own connection, started before the clock) take the partitions in order, as N mapped task instances
    running at once do (the DAG allows 4: ``max_active_tis_per_dagrun``). Peak RSS is per task process."""
    from reindex.vertex import batch
    from reindex.vertex.ranges import group_by_partition, plan_ranges

    tasks = int(p.get("tasks") or 1)
    if p.get("gcs_url"):
        from reindex.emulators.gcs import anonymous_client

        partitions = batch.plan_result_ranges(anonymous_client(p["gcs_url"]), [f"gs://{BUCKET}/{OUTPUT_DIR}"])
    else:
        files = [(f, Path(f).stat().st_size) for f in p["files"]]
        partitions = [[r.to_dict() for r in group] for group in group_by_partition(
            plan_ranges(files, target_bytes=batch.DEFAULT_RANGE_BYTES))]
    counts = {"ready": 0, "failed": 0, "lines": 0}
    if tasks == 1:
        _task_init(p)
        t0 = time.perf_counter()
        outs = [_task_ingest(ranges) for ranges in partitions]
        seconds = time.perf_counter() - t0
        rss = peak_rss_mib()
    else:
        import multiprocessing
        import resource
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(tasks, mp_context=multiprocessing.get_context("fork"), initializer=_task_init,
                                 initargs=(p,)) as pool:
            list(pool.map(_task_ready, range(4 * tasks)))  # every process started and connected
            t0 = time.perf_counter()
            outs = list(pool.map(_task_ingest, partitions))
            seconds = time.perf_counter() - t0
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    for out in outs:
        for k in counts:
            counts[k] += out[k]
    if counts["failed"] or counts["ready"] != p["n"]:
        raise RuntimeError(f"ingest_ranges: {counts}")
    return {"seconds": seconds, "rows": counts["ready"], "partitions": len(partitions), "tasks": tasks,
            "task_rss_mib": round(rss, 1)}


METHODS = {"limit": method_limit, "executemany": method_executemany, "pgvector": method_pgvector, "project": method_project,
           "limit_halfvec": method_limit_halfvec}


def worker(params: dict) -> dict:
    logging.basicConfig(level=logging.WARNING)
    out = METHODS[params["method"]](params)
    out["rss_mib"] = round(max(peak_rss_mib(), out.pop("task_rss_mib", 0)), 1)
    out["seconds"] = round(out["seconds"], 3)
    return out


# ---------------------------------------------------------------------------------------------
# the benchmark (orchestrator)


def run(data_dir: Path, *, lines: int = 100_000, methods: list[str] | None = None, gcs: bool = True,
        rss_lines: int | None = None, variants: bool = True, repeat: int = 1,
        task_counts: tuple[int, ...] = (2, 4)) -> dict:
    """Measure every method at ``lines``; with ``rss_lines`` (e.g. 1M) measure the project path there too.

    ``repeat`` > 1 runs the limit and the project rows that many times (alternating) and keeps the
    fastest of each (the machine is shared); the executemany and pgvector baselines run once.
    """
    from benchmarks.common import run_worker

    methods = methods or ["limit", "executemany", "pgvector", "project"]
    manifest = setup(data_dir, lines)
    base = {k: manifest[k] for k in ("uri", "schema", "table", "model_checksum", "corpus_dir", "files", "n",
                                     "limit_file")}
    plan: list[tuple[str, str, dict]] = []
    for m in methods:
        if m == "project":
            plan.append(("project (local disk), 1 task at a time", "project", {}))
            for n in task_counts:
                plan.append((f"project (local disk), {n} tasks at a time", "project", {"tasks": n}))
            if gcs:
                plan.append(("project (GCS emulator), 1 task at a time", "project", {"gcs": True}))
            if variants:
                plan.append(("project, staged upsert (the load before P1/P5), 1 task", "project",
                             {"variant": {"proposal": "staged"}}))
                plan.append(("project, simdjson values (native parser off), 1 task", "project",
                             {"variant": {"native": False}}))
                plan.append(("project, orjson parse without read-ahead, 1 task", "project",
                             {"variant": {"prefetch": 0, "fast_values": False}}))
        else:
            plan.append((m, m, {}))
    halfvec_table = None
    if variants and "limit" in methods and "project" in methods:
        base.update(setup_halfvec(manifest))
        halfvec_table = base["halfvec_table"]
        plan.append(("limit, halfvec(768) table", "limit_halfvec", {}))
        plan.append(("project, halfvec storage, 1 task at a time", "project", {"storage": "halfvec"}))
        for n in task_counts:
            plan.append((f"project, halfvec storage, {n} tasks at a time", "project",
                         {"storage": "halfvec", "tasks": n}))
    results: dict[str, list[dict]] = {}
    reference: dict[str, str] = {}  # the limit's sample md5 per storage
    for attempt in range(max(1, repeat)):
        for label, method, extra in plan:
            if attempt and method in ("executemany", "pgvector"):
                continue
            reset(manifest, halfvec_table)
            params = {**base, **{k: v for k, v in extra.items() if k != "gcs"}, "method": method}
            storage = "halfvec" if method == "limit_halfvec" else extra.get("storage", "vector")
            load = os.getloadavg()[0]
            if extra.get("gcs"):
                with gcs_emulator(manifest) as url:
                    params["gcs_url"] = url
                    result = run_worker("ingest", params)
            else:
                result = run_worker("ingest", params)
            result.update(check(manifest, halfvec_table if storage == "halfvec" else None))
            result["load_before"] = round(load, 2)
            result["storage"] = storage
            if method.startswith("limit"):
                reference.setdefault(storage, result["sample_md5"])
            result["vectors_match_limit"] = result["sample_md5"] == reference.get(storage)
            result["label"] = label
            log.info("ingest %s: %s", label, result)
            results.setdefault(label, []).append(result)
    reset(manifest, halfvec_table)
    rows = []
    for label, _, _ in plan:
        runs = results[label]
        best = dict(min(runs, key=lambda r: r["seconds"]))
        best["runs_seconds"] = [r["seconds"] for r in runs]
        rows.append(best)
    limit = next((r["seconds"] for r in rows if r["label"] == "limit"), None)
    naive = next((r["seconds"] for r in rows if r["label"] == "executemany"), None)
    for r in rows:
        r["rows_per_s"] = round(r["rows"] / r["seconds"], 1)
        r["x_limit"] = round(limit / r["seconds"], 3) if limit else None
        r["x_executemany"] = round(naive / r["seconds"], 2) if naive else None
    report = {"lines": lines, "bytes": manifest["bytes"], "dim": DIM, "methods": rows}
    if rss_lines:
        big = setup(data_dir, rss_lines, limit_file=False)
        reset(big)
        params = {**{k: big[k] for k in base if k in big}, "method": "project"}
        result = run_worker("ingest", params, timeout=6 * 3600)
        result.update(check(big))
        reset(big)
        result["rows_per_s"] = round(result["rows"] / result["seconds"], 1)
        report["rss"] = {"lines": rss_lines, "bytes": big["bytes"], **result}
        log.info("ingest %d: %s", rss_lines, result)
    return report
