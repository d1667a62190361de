"""Command line: ``python -m reindex status|search|unlock --corpus NAME``.

The store is found by ``--dsn``, else ``$REINDEX_STORE_URI``, else the embedded default under
``.data/pg`` (started if needed). Exit status 0 when the command answered; 2, with one ``error:``
line on stderr and no traceback, when it cannot (store unreachable, schema not initialised, corpus
unknown, model not available offline); argparse's own 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _dsn(arg: str | None) -> str:
    if arg:
        return arg
    if os.environ.get("REINDEX_STORE_URI"):
        return os.environ["REINDEX_STORE_URI"]
    from reindex.embedded import ensure_database, ensure_server

    data = Path(os.environ.get("REINDEX_DATA_DIR", Path.cwd() / ".data"))
    if not (data / "pg" / "PG_VERSION").exists():
        raise SystemExit(f"no store: pass --dsn, set REINDEX_STORE_URI, or run `make demo` first (looked in {data})")
    return ensure_database(ensure_server(data / "pg"), "reindex")


class CliError(Exception):
    """An answer in words: printed to stderr, exit status 2 (never a traceback)."""


def _safe_dsn(dsn: str) -> str:
    """The DSN as the user can be shown it: without its password."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    try:
        params = conninfo_to_dict(dsn)
    except Exception:  # noqa: BLE001 - an unparsable DSN is named as given, less anything after '@'
        return dsn.rsplit("@", 1)[-1]
    params.pop("password", None)
    return make_conninfo(**params)


@contextmanager
def _store(args) -> Iterator:
    """A ``Store`` on the chosen DSN and schema, which must hold the reindex tables (readers never migrate)."""
    import psycopg

    from reindex.store import Store
    from reindex.store.search import require_schema

    dsn = _dsn(args.dsn)
    try:
        conn = psycopg.connect(dsn, autocommit=True, connect_timeout=10)
    except psycopg.Error as e:
        raise CliError(f"cannot connect to the store {_safe_dsn(dsn)}: {str(e).strip()}") from None
    with conn:
        store = Store(conn, args.schema)
        try:
            require_schema(store)
        except LookupError as e:
            raise CliError(str(e)) from None
        yield store


def _known_corpus(store, corpus: str) -> None:
    from psycopg import sql

    from reindex.store.search import unknown_corpus

    if store.one(sql.SQL("SELECT 1 FROM {} WHERE corpus = %s").format(store.t("corpora")), (corpus,)) is None:
        raise CliError(unknown_corpus(store, corpus))


def _status(args) -> int:
    from reindex.store.search import corpus_status

    with _store(args) as store:
        try:
            st = corpus_status(store, args.corpus, failed_documents=args.failed_documents)
        except LookupError as e:
            raise CliError(str(e)) from None
    if args.json:
        print(json.dumps(st, indent=2, default=str))
        return 0
    c, d, m, b = st["chunks"], st["documents"], st["model"], st["last_batch"] or {}
    print(f"corpus {st['corpus']}")
    print(f"  documents  {d['OK']} ok, {d['FAILED']} failed")
    for code, n in st["failed_documents_by_reason"].items():
        print(f"    FAILED {code}: {n}")
    for f in st["failed_documents"]:
        print(f"      {f['doc_id']} ({f['source_uri']}): {f['error_code']} {f['message']}")
    if d["FAILED"] > len(st["failed_documents"]):
        print(f"      … {d['FAILED'] - len(st['failed_documents'])} more (--failed-documents N)")
    print(f"  chunks     {st['chunks_total']}: READY {c['READY']}, PENDING {c['PENDING']}, FAILED {c['FAILED']}")
    for code, n in st["failed_by_reason"].items():
        print(f"    FAILED {code}: {n}")
    if m["checksum"] is None:
        print("  model      none active yet (no run has registered one)")
    else:
        print(f"  model      {m['model_id']} ({m['dim']}-d, normalized={m['normalized']}, checksum {m['checksum']})")
        print(f"  vectors    {st['vector_table']} ({m['storage']}, index {st['index']})")
    for s in st["stores"]:
        if s["table"] != st["vector_table"]:
            print(f"             {s['table']} [{s['status']}] {s['dim']}-d ({s['storage']}, index {s['index']})")
    if st["lease"]:
        print(f"  busy       run {st['lease']['run_id']} (batch {st['lease']['batch_id']}) since {st['lease']['since']}")
    if b:
        print(f"  last batch {b['batch_id']} [{b['kind']}, {b['backend']}] {b['status']}: total {b['total']}, "
              f"ready {b['ready']}, failed {b['failed']}, reused {b['reused']}, finished {b['finished_at']}")
        gate = b.get("quality")
        if gate:  # an upgrade batch: what its quality gate measured before the switch
            print(f"             {gate['line']}")
            if gate["decision"]:
                print(f"             decision: {gate['decision'].get('choice')} by {gate['decision'].get('by')}")
    else:
        print("  last batch none")
    return 0


def _search(args) -> int:
    from reindex.config import Backend, Storage
    from reindex.embeddings.local import LocalEncoder
    from reindex.store.search import search
    from reindex.store.vectors import active_model

    with _store(args) as store:
        _known_corpus(store, args.corpus)
        active = active_model(store, args.corpus)
        if active is None:
            raise CliError(f"corpus {args.corpus!r} has no active model yet: no run has embedded it")
        conf = (active["details"] or {}).get("config") or {"model": active["model_id"], "backend": active["backend"]}
        backend = conf.get("backend", "local")
        if args.model is None and backend == Backend.SERVICE.value:
            # queries go to the embedding service that made the corpus's vectors (REINDEX_SERVICE_* outside Airflow)
            from reindex.backends import ServiceBackend
            from reindex.config import ReindexConfig

            encoder = ServiceBackend(ReindexConfig(
                corpus=args.corpus, corpus_uri="store", backend=Backend.SERVICE, model=conf["model"],
                normalize=conf.get("normalize", True), service_conn_id=conf.get("service_conn_id"))).encoder
            name = f"{encoder.spec.model_id} (embedding service {encoder.settings.url})"
        elif args.model is None and backend != Backend.LOCAL.value:
            raise CliError(f"corpus {args.corpus!r} is embedded by {conf['backend']} model {conf['model']}; this "
                           "command encodes queries locally or through the embedding service only")
        else:
            encoder = LocalEncoder(args.model or conf["model"], normalize=conf.get("normalize", True),
                                   encoder=conf.get("encoder", "torch"))
            name = repr(encoder.model_name)
        checksum = encoder.spec.stored_as(conf.get("storage", Storage.VECTOR)).checksum
        if checksum != active["model_checksum"]:
            raise CliError(f"model {name} (checksum {checksum}) is not the corpus's active model "
                           f"({active['model_checksum']})")
        hits = search(store, args.corpus, encoder.encode([args.query])[0], k=args.k,
                      model_checksum=active["model_checksum"])
    if args.json:
        print(json.dumps([h.__dict__ for h in hits], ensure_ascii=False, indent=2))
        return 0
    if not hits:
        print(f"corpus {args.corpus!r} has no vectors to search yet")
    for i, h in enumerate(hits, 1):
        print(f"{i}. {h.score:.3f}  {h.chunk_id}\n   {h.text[:200]!r}")
    return 0


def _unlock(args) -> int:
    from reindex.store.leases import free, get_lease

    with _store(args) as store:
        _known_corpus(store, args.corpus)
        holder = get_lease(store, args.corpus)
        if holder.free:
            print(f"corpus {args.corpus!r} is not leased")
            return 0
        abandoned = free(store, args.corpus, holder.batch_id, "its lease was freed by hand (python -m reindex unlock)")
    print(f"released corpus {args.corpus!r} from run {holder.run_id} (batch {holder.batch_id}"
          + (f", ABANDONED with {abandoned} unfinished chunk(s) left for the next run)" if abandoned else ")"))
    return 0


def _count(value: str) -> int:
    n = int(value)
    if not 0 <= n <= 10_000:
        raise argparse.ArgumentTypeError(f"{n} is out of range: must be between 0 and 10000")
    return n


def _top_k(value: str) -> int:
    k = int(value)
    if not 1 <= k <= 1000:
        raise argparse.ArgumentTypeError(f"-k {k} is out of range: must be between 1 and 1000")
    return k


def main(argv: list[str] | None = None) -> int:
    """Run one command; 0 on success, 2 with a message on stderr when it cannot answer (no traceback)."""
    import psycopg

    from reindex.config import DEFAULT_SCHEMA
    from reindex.errors import ReindexError

    ap = argparse.ArgumentParser(prog="python -m reindex", description="Inspect and query reindexed corpora.")
    ap.add_argument("--dsn", help="PostgreSQL URI of the store (default: $REINDEX_STORE_URI or the embedded one)")
    ap.add_argument("--schema", default=DEFAULT_SCHEMA)
    sub = ap.add_subparsers(dest="command", required=True)
    st = sub.add_parser("status", help="counts by status, model, last batch")
    st.add_argument("--corpus", required=True)
    st.add_argument("--json", action="store_true")
    st.add_argument("--failed-documents", type=_count, default=5, metavar="N",
                    help="list the first N failed documents (default 5)")
    se = sub.add_parser("search", help="semantic search over a corpus")
    se.add_argument("--corpus", required=True)
    se.add_argument("query")
    se.add_argument("-k", type=_top_k, default=5, help="number of hits, 1-1000 (default 5)")
    se.add_argument("--model", default=None, help="local model name or path (default: the corpus's active model)")
    se.add_argument("--json", action="store_true")
    un = sub.add_parser("unlock", help="free a corpus whose lease is held by a dead run")
    un.add_argument("--corpus", required=True)
    args = ap.parse_args(argv)
    try:
        return {"status": _status, "search": _search, "unlock": _unlock}[args.command](args)
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ReindexError, LookupError) as e:  # configuration (e.g. a model not available offline), store state
        print(f"error: {e}", file=sys.stderr)
        return 2
    except psycopg.Error as e:
        # e.g. a schema older than this code, or the server going away mid-command: in words, not a traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: the store query failed in schema {args.schema!r}: {first}", file=sys.stderr)
        return 2
