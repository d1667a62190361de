"""The vector-scale benchmark (``benchmarks/vectors_scale.py``): its data, its ground truth, and a tiny run of
the whole thing against the session's PostgreSQL (load through ``load_vectors``, ``build_index``, queries)."""

from __future__ import annotations

import contextlib

import numpy as np


def test_generated_vectors_are_unit_deterministic_and_prefix_stable():
    from benchmarks.vectors_scale import make_queries, make_vectors

    a = make_vectors(1_500, 96, seed=4)
    assert a.shape == (1_500, 96) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(make_vectors(1_500, 96, seed=4), a)
    np.testing.assert_array_equal(make_vectors(700, 96, seed=4), a[:700])  # a smaller n is a prefix
    q = make_queries(50, 96, seed=4)
    assert q.shape == (50, 96) and not np.isin(q[:, 0], a[:, 0]).any()  # held out: another stream
    assert not np.array_equal(make_vectors(10, 96, seed=5), a[:10])


def test_exact_top_k_is_a_full_sort_chunked():
    from benchmarks.vectors_scale import exact_top_k

    rng = np.random.default_rng(1)
    data = rng.standard_normal((1_003, 16)).astype(np.float32)
    queries = rng.standard_normal((7, 16)).astype(np.float32)
    sims = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (
        data / np.linalg.norm(data, axis=1, keepdims=True)).T
    expected = np.argsort(-sims, axis=1)[:, :10]
    np.testing.assert_array_equal(exact_top_k(data, queries, chunk=100), expected)


def test_recall_at_k_is_the_mean_overlap():
    from benchmarks.vectors_scale import recall_at_k

    truth = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert recall_at_k([[1, 2, 3, 4], [5, 6, 0, 0]], truth) == 0.75
    assert recall_at_k([[4, 3, 2, 1], []], truth) == 0.5


def test_a_tiny_run_loads_builds_and_queries_through_the_product(store_uri):
    import psycopg
    from psycopg import sql

    from benchmarks.vectors_scale import render, run

    n, queries = 2_000, 30
    try:
        results = run(store_uri, sizes_=(n,), dims=(64,), storages=("vector", "halfvec"), queries=queries,
                      ef_search=(40,))
        # graph memory far below what 2,000 vectors need: pgvector's notice is kept
        small = run(store_uri, sizes_=(n,), dims=(64,), storages=("vector",), queries=queries, ef_search=(40,),
                    maintenance_work_mem="1MB")[0]
    finally:
        with contextlib.closing(psycopg.connect(store_uri, autocommit=True)) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(f"vscale_{n}")))

    assert [(r["n"], r["dim"], r["storage"]) for r in results] == [(n, 64, "vector"), (n, 64, "halfvec")]
    for r in results:
        assert r["load"]["rows"] == n and r["load"]["blocks"] == 1 and r["load"]["rows_per_s"] > 0
        b = r["build"]
        assert (b["m"], b["ef_construction"], b["maintenance_work_mem"]) == (16, 64, "64MB")  # build_index's sizing
        assert b["opclass"] == f"{r['storage']}_cosine_ops" and b["notices"] == []
        assert b["memory"]["samples"] >= 1 and b["memory"]["peak_pss_sum_mib"] > 0
        assert r["sizes"]["hnsw_bytes"] > 0 and r["sizes"]["table_bytes"] > 0
        q = r["query"]
        assert q["queries"] == queries and q["exact_scan"]["agreement_with_numpy"] == 1.0
        e40 = q["ef_search"]["40"]
        assert 0.9 <= e40["recall_at_10"] <= 1.0 and e40["short_answers"] == 0
        assert 0 < e40["p50_ms"] <= e40["p99_ms"]
    assert "recall_at_10_vs_float32" in results[1]["query"]["ef_search"]["40"]
    assert results[1]["sizes"]["table_bytes"] < results[0]["sizes"]["table_bytes"]  # half floats

    assert small["build"]["maintenance_work_mem"] == "1MB"
    assert any("no longer fits into maintenance_work_mem" in x for x in small["build"]["notices"])
    table = render({"runs": [*results, small]})
    assert table.count("\n") == 2 + 3 and "| 64 | halfvec | 2,000 |" in table and "| 1MB: no, after " in table
