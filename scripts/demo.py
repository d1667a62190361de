"""`make demo`: run reindex_corpus end to end on the embedded default and print what happened.

Starts the embedded PostgreSQL under .data/, migrates Airflow's metadata DB, runs the
`reindex_corpus` DAG with `dag.test()` on the bundled sample corpus (or --corpus-uri), then
prints a summary (documents, chunks, READY/FAILED, seconds, vectors/s) and the top-3 hits of a
sample semantic query. Running it again reuses the current vectors (add --force to re-embed).

``--backend vertex`` starts the GCS and Vertex emulators in this process with a few injected per-line
failures, then runs the triggered ``reindex_retry`` run that heals them.

``--backend service`` starts the reference embedding service in this process (the bundled MiniLM behind
an API key; the ``reindex_embedding_service`` connection points at it) and injects the faults a real
service shows: the first block of requests has its connections dropped on every attempt (its 64 chunks
fail UNAVAILABLE and are left to ``reindex_retry``), the next meets 429s with Retry-After and 503s that
heal inside the task. It then runs the triggered ``reindex_retry`` run, checks that every chunk is READY
and searches the corpus with the query embedded by the service. It always re-embeds (the service starts
empty each time, and the fault path is the point). Exit status 1 when anything is not as expected.

``--encoder onnx|openvino|openvino-bf16`` (``make demo ENCODER=…``; local backend) indexes the corpus
``sample_<encoder>`` with that runtime (the model exported once into the encoder cache, reused after), then
measures it against plain ``SentenceTransformer.encode()`` on the corpus's own chunks: texts/s of both, the
speed-up, and the retrieval agreement with fp32 torch (top-10 neighbours, min / mean cosine). Exit status 1
when an fp32 runtime is not within 1e-5 cosine of torch, or a runtime's top-10 agreement is below 0.97.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import devenv  # noqa: E402

# The service demo's client: SERVICE_BATCH texts per request, one request in flight (concurrency 1), at most
# MAX_ATTEMPTS requests per group of texts. The task's client sends a block of texts at a time, its groups
# sharing the one connection: while a group waits to retry, the block's next group sends. The service spends
# its fault budgets in arrival order (drops, then 429s, then 503s), so with G groups per block (see
# service_faults) the arrangement does not depend on how the groups interleave: the first block's G groups are
# dropped on all their attempts (G*MAX_ATTEMPTS drops: its chunks fail UNAVAILABLE, left to reindex_retry);
# the second block's G groups meet G 429s (Retry-After 1 s) and then G 503s, each group one of each, and
# all succeed on their third attempt.
SERVICE_BATCH = 32
MAX_ATTEMPTS = 3
RETRY_AFTER = 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=None, help="default: sample (local) or sample_vertex (vertex)")
    ap.add_argument("--corpus-uri", default=str(ROOT / "include" / "sample_corpus"))
    ap.add_argument("--backend", default=os.environ.get("BACKEND", "local"))
    ap.add_argument("--query", default="How do plants turn sunlight into chemical energy?")
    ap.add_argument("--force", action="store_true", help="re-embed every chunk")
    ap.add_argument("--encoder", default=os.environ.get("ENCODER") or "torch",
                    help="backend=local: torch, onnx, openvino or openvino-bf16 (make demo ENCODER=…)")
    args = ap.parse_args()

    if args.encoder != "torch" and args.backend != "local":
        print(f"demo: --encoder {args.encoder} runs the model locally: it needs --backend local", file=sys.stderr)
        return 2
    if args.corpus is None:
        args.corpus = "sample" if args.backend == "local" else f"sample_{args.backend}"
        if args.encoder != "torch":
            args.corpus = "sample_" + args.encoder.replace("-", "_")  # another runtime is another model: its own corpus
    if args.backend == "service":
        args.force = True  # see the module docstring: every run shows the fault path
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
    if args.encoder != "torch":
        conf["encoder"] = args.encoder
    emulator = None
    if args.backend == "vertex":
        emulator = start_vertex_emulators()
        conf.update(model="text-embedding-005", output_dimensionality=384)
    elif args.backend == "service":
        emulator = start_embedding_service()
    started = time.monotonic()
    dr = first = dag.test(run_conf=conf)
    service_stats = emulator.stats() if args.backend == "service" else None  # before the retry runs add to it
    retry_runs = []
    while emulator is not None and dr.state == DagRunState.SUCCESS and _task_state(dr, "trigger_retry") == "success":
        # dag.test() does not run the triggered reindex_retry run; run it here as the scheduler would
        if args.backend == "service":
            emulator.set_faults()  # the storm is over
        else:
            emulator.configure(error_rates={})
        dr = bag.get_dag("reindex_retry").test(run_conf=_triggered_conf(dr))
        retry_runs.append(dr)
    seconds = time.monotonic() - started

    import psycopg

    from reindex.backends import backend_for
    from reindex.config import ReindexConfig
    from reindex.cost import batch_cost
    from reindex.store import Store, connect
    from reindex.store.search import corpus_status, search

    print()
    print(f"reindex_corpus run {first.run_id}: {first.state}")
    for run in retry_runs:
        print(f"reindex_retry run  {run.run_id}: {run.state}")
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
            if args.backend == "service":
                with _service_encoder(emulator) as encoder:  # the query is embedded by the service too
                    query_vector = encoder.encode([args.query])[0]
            else:
                # the emulator embeds with the same bundled MiniLM, so the query is encoded locally either way
                cfg = ReindexConfig(corpus=args.corpus, corpus_uri=args.corpus_uri,
                                    encoder=args.encoder if args.backend == "local" else "torch")
                query_vector = backend_for(cfg).encoder.encode([args.query])[0]
            hits = search(store, args.corpus, query_vector, k=3)
        usage = {b[0]: batch_cost(store, b[0]).get("service") or {} for b in batches} if service_stats else {}
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
    if args.backend == "vertex":
        print(f"  Vertex     {emulator.stats()['create_calls']} batch job(s) submitted to the emulator; batches:")
        for b in reversed(batches):
            print(f"    {b[0]} [{b[1]}] {b[2]}: {b[4]}/{b[3]} READY, {b[5]} FAILED by reason {b[6] or {}}")
    problems: list[str] = []
    if service_stats is not None:
        problems = _print_service(emulator, service_stats, batches, usage, status, first, retry_runs)
    if args.encoder != "torch" and status["chunks"]["READY"]:
        problems += _print_encoder(args.encoder, env["REINDEX_STORE_URI"], args.corpus)
    print(f"\nTop 3 for {args.query!r}:")
    for i, h in enumerate(hits, 1):
        print(f"  {i}. {h.score:.3f}  {h.doc_id}  {h.text[:100]!r}")
    if not hits:
        print("  (none: no chunk of this corpus has a vector)")
    print(f"\nInspect: .venv/bin/python -m reindex status --corpus {args.corpus}")
    if os.environ.get("REINDEX_DEMO_JSON"):
        Path(os.environ["REINDEX_DEMO_JSON"]).write_text(json.dumps(status, default=str))
    _stop_emulators(emulator)
    for problem in problems:
        print(f"demo: {problem}", file=sys.stderr)
    if dr.state != DagRunState.SUCCESS:
        return 1
    if not status["chunks"]["READY"]:
        print(f"demo: nothing was indexed: corpus {args.corpus!r} has no chunk with a vector "
              f"({status['documents']['FAILED']} document(s) failed, listed above)", file=sys.stderr)
        return 1
    return 1 if problems else 0


DEMO_TEXTS = 600  # chunks of the corpus measured by --encoder (a minute or two on 2 cores)


def _print_encoder(encoder: str, store_uri: str, corpus: str) -> list[str]:
    """Time ``encoder`` against plain ``SentenceTransformer.encode()`` on up to ``DEMO_TEXTS`` of the corpus's
    chunks (in that order: the plain run warms nothing for the other) and print the speed-up and the agreement
    with fp32 torch. Returns what is off: fp32 not within 1e-5 cosine, top-10 agreement below 0.97."""
    from reindex.embeddings.local import LocalEncoder
    from reindex.quality import vector_agreement
    from reindex.store import connect

    with connect(store_uri, autocommit=True) as conn:
        texts = [r[0] for r in conn.execute("SELECT text FROM reindex.chunks WHERE corpus = %s ORDER BY id LIMIT %s",
                                            (corpus, DEMO_TEXTS)).fetchall()]
    plain = LocalEncoder("default").model
    plain.encode(texts[:64], batch_size=64, normalize_embeddings=True, show_progress_bar=False)
    started = time.perf_counter()
    reference = plain.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                             show_progress_bar=False)
    plain_s = time.perf_counter() - started
    runtime = LocalEncoder("default", encoder=encoder)
    runtime.encode(texts[:64])
    started = time.perf_counter()
    vectors = runtime.encode(texts)
    runtime_s = time.perf_counter() - started
    a = vector_agreement(reference, vectors, k=10)
    export = runtime.export
    how = f"exported by this run in {export.seconds:.1f} s" if export.exported else "export reused from the cache"
    print(f"  encoder    {encoder} ({runtime.spec.runtime} {runtime.spec.precision}, checksum {runtime.spec.checksum}; "
          f"{how}: {export.path})")
    print(f"    speed    {len(texts)} chunks: plain encode() {len(texts) / plain_s:.1f} texts/s, {encoder} "
          f"{len(texts) / runtime_s:.1f} texts/s = {plain_s / runtime_s:.2f}x")
    print(f"    quality  vs fp32 torch: top-10 agreement {a.top_k_agreement:.4f}, cosine min {a.min_cosine:.6f} "
          f"mean {a.mean_cosine:.7f}")
    problems = []
    if runtime.spec.precision == "fp32" and 1 - a.min_cosine > 1e-5:
        problems.append(f"{encoder} is fp32 but its vectors differ from torch's by {1 - a.min_cosine:.1e} cosine")
    if a.top_k_agreement < 0.97:
        problems.append(f"{encoder}: top-10 agreement {a.top_k_agreement:.4f} with fp32 torch is below 0.97")
    return problems


def _stop_emulators(emulator) -> None:
    if emulator is not None:
        emulator.stop()
        if hasattr(emulator, "stop_gcs"):  # the Vertex emulator's GCS stand-in
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


def start_embedding_service():
    """The reference embedding service in this process: the bundled MiniLM behind a fresh API key, the
    ``reindex_embedding_service`` connection pointing at it (``SERVICE_BATCH`` texts per request, one
    request at a time), short retry timings, and ``service_faults`` armed for the first run. Sets
    ``demo_block`` (texts per block of the task's client) and ``demo_faults`` on the service it returns."""
    from reindex.emulators.embedding_service import EmbeddingService, ServiceConfig

    svc = EmbeddingService(ServiceConfig(embedder="model", api_key=secrets.token_urlsafe(24))).start()
    os.environ.update({
        "AIRFLOW_CONN_REINDEX_EMBEDDING_SERVICE": json.dumps(
            {"conn_type": "http", "host": svc.url, "password": svc.config.api_key,
             "extra": {"protocol": "seed004", "concurrency": 1, "max_batch_size": SERVICE_BATCH,
                       "timeout_seconds": 60}}),
        "REINDEX_RETRY_BACKOFF": "1,2,4", "REINDEX_RETRY_UNAVAILABLE_SECONDS": "2",
        "REINDEX_RETRY_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
    })
    with _service_encoder(svc) as probe:  # what a task's client does with these settings
        svc.demo_block = probe.block_size
    svc.demo_faults = service_faults(svc.demo_block // SERVICE_BATCH)
    svc.set_faults(**svc.demo_faults)
    return svc


def service_faults(groups: int) -> dict:
    """The faults of the service demo for ``groups`` request groups per block (see SERVICE_BATCH)."""
    return {"drop_connections": groups * MAX_ATTEMPTS, "status_429": groups, "retry_after": RETRY_AFTER,
            "status_503": groups}


def _service_encoder(svc):
    """A client of the in-process service, as a task's (for the demo's query)."""
    from reindex.service.client import ServiceEncoder
    from reindex.service.settings import ServiceSettings

    return ServiceEncoder(ServiceSettings(url=svc.url, api_key=svc.config.api_key, concurrency=1,
                                          max_batch_size=SERVICE_BATCH))


def _print_service(svc, first_stats: dict, batches: list, usage: dict, status: dict, first, retry_runs: list) -> list[str]:
    """Print the service's side of the run (faults served, requests by status, each batch's counters and
    reasons) and return what is not as the demo expects (empty: all as expected)."""
    faults = svc.demo_faults
    served = {k: first_stats["faults"][k] for k in ("drop_connections", "status_429", "status_503")}
    requests = ", ".join(f"{status_} {n}" for status_, n in sorted(first_stats["requests"].get("/embed/batch", {}).items()))
    print(f"  service    {svc.url} (seed004, {svc.model_info()['model_name']}, API key set), "
          f"{SERVICE_BATCH} texts per request, one at a time")
    print(f"    faults   injected into the first run: {served['drop_connections']} dropped connection(s), "
          f"{served['status_429']} x 429 (Retry-After {faults['retry_after']} s), "
          f"{served['status_503']} x 503")
    print(f"    requests /embed/batch in the first run by status: {requests}")
    print("  batches")
    for b in reversed(batches):
        u = usage.get(b[0], {})
        print(f"    {b[0]} [{b[1]}] {b[2]}: {b[4]}/{b[3]} READY, {b[5]} FAILED by reason {b[6] or {}}")
        print(f"      service: {u.get('requests', 0)} requests, {u.get('retries', 0)} in-task retries, "
              f"cache hits {u.get('cached', 0)}/{u.get('texts', 0)}")

    problems = []
    parent = batches[-1]  # newest first: the last row is the first run's batch
    expected_failed = min(svc.demo_block, parent[3])  # the first block's chunks
    # each dropped group spent MAX_ATTEMPTS - 1 retries; each healed group one per 429 and 503 it met
    groups = svc.demo_block // SERVICE_BATCH
    expected_retries = groups * (MAX_ATTEMPTS - 1) + faults["status_429"] + faults["status_503"]
    if served != {k: faults[k] for k in served}:
        problems.append(f"the service served faults {served}, not the {faults} injected")
    if _task_state(first, "trigger_retry") != "success":
        problems.append(f"the first run did not trigger reindex_retry (trigger_retry: {_task_state(first, 'trigger_retry')})")
    if (parent[6] or {}) != {"UNAVAILABLE": expected_failed}:
        problems.append(f"batch {parent[0]} failed {parent[5]} chunk(s) by reason {parent[6] or {}}; expected the "
                        f"first block's, {{'UNAVAILABLE': {expected_failed}}}")
    retries = usage.get(parent[0], {}).get("retries", 0)
    if retries != expected_retries:
        problems.append(f"batch {parent[0]} counted {retries} in-task retries; the injected 429s, 503s and dropped "
                        f"connections cost {expected_retries}")
    if not retry_runs:
        problems.append("no reindex_retry run ran")
    chunks = status["chunks"]
    if (chunks["READY"], chunks["FAILED"], chunks["PENDING"]) != (status["chunks_total"], 0, 0):
        problems.append(f"after the retry run(s) {chunks['READY']}/{status['chunks_total']} chunks are READY "
                        f"(FAILED {chunks['FAILED']}, PENDING {chunks['PENDING']}); expected all of them")
    else:
        healed = sum(b[4] for b in batches[:-1])
        print(f"  healed     reindex_retry embedded the {healed} failed chunk(s): READY "
              f"{chunks['READY']}/{status['chunks_total']}, FAILED 0")
    return problems


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
