"""Benchmark 4: Airflow overhead — a ~10k-chunk local run of ``reindex_corpus`` through ``dag.test()``.

Airflow is wired to the benchmark's own embedded PostgreSQL exactly as the tests and ``make demo``
wire it (``reindex.embedded.airflow_env``: metadata database ``airflow``, store ``reindex``), under
``<bench dir>/airflow``. The run happens in a subprocess with that environment; it reports the wall
time of ``dag.test()`` and the sum of its task instances' durations (mapped ones included). The
overhead is ``wall - Σ task durations``: scheduling, serialisation, XCom, task start-up between tasks.

By default the encoder is a stub (random unit vectors; everything else real), so the task work is
small and the overhead *fraction* is an upper bound; ``--airflow-encoder real`` uses MiniLM
(≈ 10k chunks / the CPU encode rate longer, the same absolute overhead).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import ROOT, bench_dir, peak_rss_mib, run_worker, server

log = logging.getLogger("benchmarks.airflow")


def _env(data_dir: Path) -> dict:
    from reindex.embedded import airflow_env

    env = airflow_env(ROOT, bench_dir(data_dir) / "airflow-env", server(data_dir))
    env["AIRFLOW__CORE__UNIT_TEST_MODE"] = "False"
    env["AIRFLOW__LOGGING__LOGGING_LEVEL"] = "WARNING"
    return env


def worker(p: dict) -> dict:
    import numpy as np

    logging.basicConfig(level=logging.WARNING)
    from airflow.dag_processing.dagbag import DagBag

    from reindex.embeddings.local import LocalEncoder

    if p.get("encoder", "stub") == "stub":
        rng = np.random.default_rng(0)

        def stub(self, texts):
            v = rng.standard_normal((len(texts), self.spec.dim)).astype(np.float32)
            return v / np.linalg.norm(v, axis=1, keepdims=True)

        LocalEncoder.encode = stub
    dag = DagBag(dag_folder=str(ROOT / "dags")).get_dag("reindex_corpus")
    conf = {"corpus": p["corpus"], "corpus_uri": p["corpus_uri"]}
    t0 = time.perf_counter()
    dr = dag.test(run_conf=conf)
    wall = time.perf_counter() - t0
    tis = dr.get_task_instances()
    durations = {}
    for ti in tis:
        if ti.duration is not None:
            durations[ti.task_id] = durations.get(ti.task_id, 0.0) + float(ti.duration)
    work = sum(durations.values())
    ran = [ti for ti in tis if ti.state == "success"]
    return {"state": str(dr.state), "wall_s": round(wall, 2), "task_seconds": round(work, 2),
            "overhead_s": round(wall - work, 2), "overhead_fraction": round((wall - work) / wall, 4),
            "task_instances": len(ran), "by_task": {k: round(v, 2) for k, v in sorted(durations.items())},
            "encoder": p.get("encoder", "stub"), "rss_mib": round(peak_rss_mib(), 1)}


_PARSE = """
import json, sys, time
sys.path.insert(0, {plugins!r})
from airflow.dag_processing.dagbag import DagBag
t0 = time.monotonic()
bag = DagBag(dag_folder={folder!r}, include_examples=False)
print(json.dumps({{"seconds": time.monotonic() - t0, "dags": len(bag.dags), "errors": len(bag.import_errors)}}))
"""


def dag_parse(folder: Path, repeat: int = 3) -> dict:
    """Seconds to parse ``folder`` into a DagBag in a fresh interpreter (Airflow already imported), best of
    ``repeat`` — what the dag-processor pays per file pass."""
    best: dict = {}
    for _ in range(repeat):
        out = subprocess.run([sys.executable, "-c", _PARSE.format(plugins=str(ROOT / "plugins"), folder=str(folder))],
                             capture_output=True, text=True, env=os.environ, check=True, cwd=ROOT)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        if not best or r["seconds"] < best["seconds"]:
            best = r
    return best


def parse_benchmark() -> dict:
    """The project's DAG folder against a one-DAG baseline folder (an empty DAG), parsed the same way."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "baseline.py").write_text(
            "from airflow.sdk import dag\n\n@dag(dag_id='baseline', schedule=None)\ndef baseline():\n    pass\n\n"
            "baseline()\n", encoding="utf-8")
        base = dag_parse(Path(tmp))
    ours = dag_parse(ROOT / "dags")
    return {"dags": ours["dags"], "errors": ours["errors"], "seconds": round(ours["seconds"], 3),
            "baseline_seconds": round(base["seconds"], 3),
            "ratio": round(ours["seconds"] / base["seconds"], 2) if base["seconds"] else None}


def run(data_dir: Path, *, docs: int = 1_040, encoder: str = "stub", seed: int = 3) -> dict:
    import psycopg

    from benchmarks.texts import write_corpus

    env = _env(data_dir)
    root = bench_dir(data_dir) / f"airflow-corpus-{docs}"
    if root.exists():
        for f in root.glob("*.jsonl"):
            f.unlink()
    write_corpus(root, docs, seed=seed)
    with psycopg.connect(env["REINDEX_STORE_URI"], autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS reindex CASCADE")  # a full run every time
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, env={**os.environ, **env},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    log.info("airflow db migrate: %.0f s", time.monotonic() - t0)
    result = run_worker("airflow", {"corpus": "airflow_bench", "corpus_uri": str(root), "encoder": encoder},
                        env=env, timeout=3600)
    with psycopg.connect(env["REINDEX_STORE_URI"], autocommit=True) as conn:
        result["chunks"] = conn.execute("SELECT count(*) FROM reindex.chunks WHERE corpus = 'airflow_bench'"
                                        ).fetchone()[0]
    result["docs"] = docs
    result["parse"] = parse_benchmark()
    return result
