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
    ap.add_argument("--corpus", default=None, help="default: sample (local) or sample_vertex (vertex)")
    ap.add_argument("--corpus-uri", default=str(ROOT / "include" / "sample_corpus"))
    ap.add_argument("--backend", default=os.environ.get("BACKEND", "local"))
    ap.add_argument("--query", default="How do plants turn sunlight into chemical energy?")
    ap.add_argument("--force", action="store_true", help="re-embed every chunk")
    args = ap.parse_args()

    if args.corpus is None:
        args.corpus = "sample" if args.backend == "local" else f"sample_{args.backend}"
    if "://" not in args.corpus_uri:
        # refuse a missing, unreadable or empty corpus before starting anything (seconds, not minutes)
        from reindex.corpus import check_corpus_root
        from reindex.errors import CorpusError

        try:
            check_corpus_root(Path(args.corpus_uri).expanduser().absolute(), args.corpus, args.corpus_uri)
        except CorpusError as e:
            print(f"demo: {e}", file=sys.stderr)
            return 2
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
    emulator = None
    if args.backend == "vertex":
        emulator = start_vertex_emulators()
        conf.update(model="text-embedding-005", output_dimensionality=384)
    started = time.monotonic()
    dr = dag.test(run_conf=conf)
    retry_runs = []
    while emulator is not None and dr.state == DagRunState.SUCCESS and _task_state(dr, "trigger_retry") == "success":
        # dag.test() does not run the triggered reindex_retry run; run it here as the scheduler would
        emulator.configure(error_rates={})
        dr = bag.get_dag("reindex_retry").test(run_conf=_triggered_conf(dr))
        retry_runs.append(dr)
    seconds = time.monotonic() - started

    import psycopg

    from reindex.backends import backend_for
    from reindex.config import ReindexConfig
    from reindex.store import Store, connect
    from reindex.store.search import corpus_status, search

    print()
    print(f"reindex_corpus run {dr.run_id}: {dr.state}")
    failed_tasks = _failed_tasks(dr)
    if failed_tasks:  # listed even when the run's state is success (a teardown can decide that)
        print(f"  failed     {', '.join(failed_tasks)} (the error is in the log above)")
    with connect(env["REINDEX_STORE_URI"], autocommit=True) as conn:
        store = Store(conn)
        try:
            status = corpus_status(store, args.corpus)
        except (LookupError, psycopg.errors.UndefinedTable):  # the run failed before it wrote anything
            status = None
        batches = [] if status is None else store.execute(
            "SELECT batch_id, kind, status, total, ready, failed, counts_by_reason, reused FROM reindex.batches "
            "WHERE corpus = %s ORDER BY started_at DESC LIMIT %s", (args.corpus, 1 + len(retry_runs))).fetchall()
        if not batches:
            _stop_emulators(emulator)
            print(f"demo: nothing was indexed: the run recorded no batch for corpus {args.corpus!r} at "
                  f"{args.corpus_uri} (failed: {', '.join(failed_tasks) or 'see the log above'})", file=sys.stderr)
            return 1
        failed_docs = store.execute(
            "SELECT doc_id, error_code, error_message FROM reindex.documents WHERE corpus = %s AND status = 'FAILED' "
            "ORDER BY doc_id LIMIT 5", (args.corpus,)).fetchall()
        hits = []
        if status["chunks"]["READY"]:
            # the emulator embeds with the same bundled MiniLM, so the query is encoded locally either way
            cfg = ReindexConfig(corpus=args.corpus, corpus_uri=args.corpus_uri)
            hits = search(store, args.corpus, backend_for(cfg).encoder.encode([args.query])[0], k=3)
    batch = status["last_batch"] or {}
    encoded = sum(b[4] for b in batches)  # vectors computed by this run: its batch and retry batches
    print(f"  corpus     {args.corpus}  ({args.corpus_uri})")
    print(f"  documents  {status['documents']['OK']} ok, {status['documents']['FAILED']} failed")
    for doc_id, code, message in failed_docs:
        print(f"    {doc_id}: {code}: {message}")
    print(f"  chunks     {status['chunks_total']}: READY {status['chunks']['READY']}, "
          f"FAILED {status['chunks']['FAILED']}, PENDING {status['chunks']['PENDING']}")
    print(f"  last batch {batch.get('batch_id')} [{batch.get('kind')}] {batch.get('status')}: "
          f"failed {batch.get('failed', 0)} {batch.get('counts_by_reason') or ''}")
    print(f"  this run   encoded {encoded}, reused {batches[-1][7]} (current vectors kept)")
    print(f"  model      {status['model']['model_id']} ({status['model']['dim']}-d, checksum {status['model']['checksum']})")
    print(f"  time       {seconds:.1f} s wall, {encoded / seconds:.1f} vectors/s")
    if emulator is not None:
        print(f"  Vertex     {emulator.stats()['create_calls']} batch job(s) submitted to the emulator; batches:")
        for b in reversed(batches):
            print(f"    {b[0]} [{b[1]}] {b[2]}: {b[4]}/{b[3]} READY, {b[5]} FAILED by reason {b[6] or {}}")
    print(f"\nTop 3 for {args.query!r}:")
    for i, h in enumerate(hits, 1):
        print(f"  {i}. {h.score:.3f}  {h.doc_id}  {h.text[:100]!r}")
    if not hits:
        print("  (none: no chunk of this corpus has a vector)")
    print(f"\nInspect: .venv/bin/python -m reindex status --corpus {args.corpus}")
    if os.environ.get("REINDEX_DEMO_JSON"):
        Path(os.environ["REINDEX_DEMO_JSON"]).write_text(json.dumps(status, default=str))
    _stop_emulators(emulator)
    if dr.state != DagRunState.SUCCESS:
        return 1
    if not status["chunks"]["READY"]:
        print(f"demo: nothing was indexed: corpus {args.corpus!r} has no chunk with a vector "
              f"({status['documents']['FAILED']} document(s) failed, listed above)", file=sys.stderr)
        return 1
    return 0


def _stop_emulators(emulator) -> None:
    if emulator is not None:
        emulator.stop()
        emulator.stop_gcs()


def _failed_tasks(dr) -> list[str]:
    return sorted({ti.task_id for ti in dr.get_task_instances() if str(ti.state) == "failed"})  # not upstream_failed


def start_vertex_emulators():
    """GCS (gcp-storage-emulator) and the Vertex batch emulator in this process, with a few injected
    per-line failures so the demo shows the partial-failure path and a healing retry run."""
    from reindex.emulators.gcs import start_gcs_emulator
    from reindex.emulators.vertex import EmulatorConfig, VertexEmulator

    url, stop_gcs = start_gcs_emulator(buckets=["reindex-batches"])
    emu = VertexEmulator(EmulatorConfig(embedder="model", seed=int(time.time()), transient_max_failures=1,
                                        error_rates={"rate_limited": 0.01, "unavailable": 0.005}),
                         gcs_host=url).start()
    os.environ.update({
        "REINDEX_VERTEX_PROJECT": "emulator", "REINDEX_VERTEX_ENDPOINT": emu.endpoint,
        "REINDEX_GCS_BUCKET": "reindex-batches", "REINDEX_VERTEX_POLL_SECONDS": "1",
        "REINDEX_RETRY_BACKOFF": "1,2,4", "REINDEX_RETRY_UNAVAILABLE_SECONDS": "2",
        "AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT": json.dumps(
            {"conn_type": "google_cloud_platform", "extra": {"is_anonymous": True, "project": "emulator"}}),
    })
    emu.stop_gcs = stop_gcs
    return emu


def _task_state(dr, task_id: str) -> str | None:
    return next((str(ti.state) for ti in dr.get_task_instances() if ti.task_id == task_id), None)


def _triggered_conf(dr) -> dict:
    """The conf of the reindex_retry run that ``dr``'s trigger_retry task created."""
    from airflow import settings
    from airflow.models.dagrun import DagRun
    from airflow.models.xcom import XComModel

    with settings.Session() as session:
        run_id = session.query(XComModel.value).filter(
            XComModel.dag_id == dr.dag_id, XComModel.run_id == dr.run_id, XComModel.task_id == "trigger_retry",
            XComModel.key == "trigger_run_id").scalar()
        if isinstance(run_id, str) and run_id.startswith('"'):
            run_id = json.loads(run_id)
        triggered = session.query(DagRun).filter(DagRun.dag_id == "reindex_retry", DagRun.run_id == run_id).one()
        return dict(triggered.conf)


if __name__ == "__main__":
    sys.exit(main())
