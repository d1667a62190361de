"""Peak memory of processing a ~200 MB Vertex result file (768-d vectors) stays bounded."""

from __future__ import annotations

import hashlib
import json
import tracemalloc

import numpy as np
import orjson
from psycopg import sql

from reindex import pipeline
from reindex.backends import backend_for
from reindex.config import ReindexConfig
from reindex.store.vectors import get_embedding_store
from reindex.vertex.batch import ingest_ranges
from reindex.vertex.ranges import plan_ranges

DIM = 768
PEAK_LIMIT = 64 * 1024 * 1024


def test_200mb_result_file_is_streamed(store, tmp_path):
    n = 23_000
    texts = [f"result line {i} for the memory test" for i in range(n)]
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "docs.jsonl").write_text(
        "\n".join(json.dumps({"id": f"m{i}", "text": t}) for i, t in enumerate(texts)), encoding="utf-8")
    cfg = ReindexConfig(corpus="mem", corpus_uri=str(tmp_path / "corpus"), backend="vertex",
                        model="text-embedding-005", output_dimensionality=DIM, index_type="none")
    prepared = pipeline.prepare(store, cfg)
    pipeline.chunk_corpus(store, cfg, tmp_path / "corpus", batch_id="mem-b1",
                          model_checksum=prepared["model_checksum"])

    rng = np.random.default_rng(0)
    path = tmp_path / "predictions_0001.jsonl"
    with path.open("wb") as f:
        for start in range(0, n, 1000):
            block = rng.normal(size=(min(1000, n - start), DIM)).astype(np.float32)
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            for j, vec in enumerate(block):
                text = texts[start + j]
                f.write(orjson.dumps({"instance": {"content": text}, "predictions": [{"embeddings": {
                    "values": vec.astype(np.float64).round(9), "statistics": {"token_count": 9, "truncated": False}}}],
                    "status": ""}, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")
    size = path.stat().st_size
    assert size > 190 * 1024 * 1024

    backend = backend_for(cfg)
    emb = get_embedding_store(store, "mem", prepared["model_checksum"])
    ranges = [r.to_dict() for r in plan_ranges([(str(path), size)], target_bytes=256 * 1024 * 1024)]
    tracemalloc.start()
    counts = ingest_ranges(store, emb, backend.model_spec(), "mem-b1", ranges, backend.family,
                           open_range=lambda r: open(r.uri, "rb"))  # noqa: SIM115 - stream_results closes it
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"ingested {counts['ready']} vectors from {size / 2**20:.0f} MiB in {counts['seconds']} s; "
          f"peak traced memory {peak / 2**20:.1f} MiB")
    assert counts["ready"] == n and counts["failed"] == 0
    assert peak < PEAK_LIMIT, f"peak {peak / 2**20:.1f} MiB for a {size / 2**20:.0f} MiB file"
    (loaded,) = store.one(sql.SQL("SELECT count(*) FROM {}").format(store.t(emb.table_name)))
    assert loaded == n
    sha = hashlib.sha256(texts[0].encode()).hexdigest()
    (status,) = store.one(sql.SQL("SELECT embedding_status FROM {} WHERE content_sha256 = %s").format(
        store.t("chunks")), (sha,))
    assert status == "READY"
