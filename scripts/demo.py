"""`make demo`: run reindex_corpus end to end on the embedded default and print what happened.

Starts the embedded PostgreSQL under .data/, migrates Airflow's metadata DB, runs the
`reindex_corpus` DAG with `dag.test()` on the bundled sample corpus (or --corpus-uri), then
prints a summary (documents, chunks, READY/FAILED, seconds, vectors/s) and the top-3 hits of a
sample semantic query. Running it again reuses the current vectors (add --force to re-embed).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import devenv  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="sample")
    ap.add_argument("--corpus-uri", default=str(ROOT / "include" / "sample_corpus"))
    ap.add_argument("--backend", default=os.environ.get("BACKEND", "local"))
    ap.add_argument("--query", default="How do plants turn sunlight into chemical energy?")
    ap.add_argument("--force", action="store_true", help="re-embed every chunk")
    args = ap.parse_args()

    env = devenv.setup()
    os.environ.update(env)
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, env=os.environ,
                   stdout=subprocess.DEVNULL)
    sys.path.insert(0, str(ROOT / "plugins"))
    logging.basicConfig(level=logging.WARNING)

    from airflow.dag_processing.dagbag import DagBag
    from airflow.utils.state import DagRunState

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    if bag.import_errors:
        print(f"DAG import errors: {bag.import_errors}", file=sys.stderr)
        return 1
    dag = bag.get_dag("reindex_corpus")
    conf = {"corpus": args.corpus, "corpus_uri": args.corpus_uri, "backend": args.backend, "force": args.force}
    started = time.monotonic()
    dr = dag.test(run_conf=conf)
    seconds = time.monotonic() - started

    from reindex.backends import backend_for
    from reindex.config import ReindexConfig
    from reindex.store import Store, connect
    from reindex.store.search import corpus_status, search

    with connect(env["REINDEX_STORE_URI"], autocommit=True) as conn:
        store = Store(conn)
        status = corpus_status(store, args.corpus)
        batch = status["last_batch"] or {}
        cfg = ReindexConfig(corpus=args.corpus, corpus_uri=args.corpus_uri)
        hits = search(store, args.corpus, backend_for(cfg).encoder.encode([args.query])[0], k=3)
    encoded = batch.get("ready", 0)
    print()
    print(f"reindex_corpus run {dr.run_id}: {dr.state}")
    print(f"  corpus     {args.corpus}  ({args.corpus_uri})")
    print(f"  documents  {status['documents']['OK']} ok, {status['documents']['FAILED']} failed")
    print(f"  chunks     {status['chunks_total']}: READY {status['chunks']['READY']}, "
          f"FAILED {status['chunks']['FAILED']}, PENDING {status['chunks']['PENDING']}")
    print(f"  batch      {batch.get('batch_id')} {batch.get('status')}: encoded {encoded}, "
          f"reused {batch.get('reused', 0)}, failed {batch.get('failed', 0)} {batch.get('counts_by_reason') or ''}")
    print(f"  model      {status['model']['model_id']} ({status['model']['dim']}-d, checksum {status['model']['checksum']})")
    print(f"  time       {seconds:.1f} s wall, {encoded / seconds:.1f} vectors/s")
    print(f"\nTop 3 for {args.query!r}:")
    for i, h in enumerate(hits, 1):
        print(f"  {i}. {h.score:.3f}  {h.doc_id}  {h.text[:100]!r}")
    print(f"\nInspect: .venv/bin/python -m reindex status --corpus {args.corpus}")
    if os.environ.get("REINDEX_DEMO_JSON"):
        Path(os.environ["REINDEX_DEMO_JSON"]).write_text(json.dumps(status, default=str))
    return 0 if dr.state == DagRunState.SUCCESS else 1


if __name__ == "__main__":
    sys.exit(main())
