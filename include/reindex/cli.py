"""Command line: ``python -m reindex status|search|unlock --corpus NAME``.

The store is found by ``--dsn``, else ``$REINDEX_STORE_URI``, else the embedded default under
``.data/pg`` (started if needed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
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


def _status(args) -> int:
    from reindex.store import Store, connect
    from reindex.store.search import corpus_status

    with connect(_dsn(args.dsn), autocommit=True) as conn:
        try:
            st = corpus_status(Store(conn, args.schema), args.corpus)
        except LookupError as e:
            print(e, file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps(st, indent=2, default=str))
        return 0
    c, d, m, b = st["chunks"], st["documents"], st["model"], st["last_batch"] or {}
    print(f"corpus {st['corpus']}")
    print(f"  documents  {d['OK']} ok, {d['FAILED']} failed")
    print(f"  chunks     {st['chunks_total']}: READY {c['READY']}, PENDING {c['PENDING']}, FAILED {c['FAILED']}")
    for code, n in st["failed_by_reason"].items():
        print(f"    FAILED {code}: {n}")
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
    return 0


def _search(args) -> int:
    from reindex.config import Backend, Storage
    from reindex.embeddings.local import LocalEncoder
    from reindex.store import Store, connect
    from reindex.store.search import search
    from reindex.store.vectors import active_model

    with connect(_dsn(args.dsn), autocommit=True) as conn:
        store = Store(conn, args.schema)
        active = active_model(store, args.corpus)
        if active is None:
            print(f"corpus {args.corpus!r} has no active model: index it first", file=sys.stderr)
            return 2
        conf = (active["details"] or {}).get("config") or {"model": active["model_id"], "backend": active["backend"]}
        if args.model is None and conf.get("backend", "local") != Backend.LOCAL.value:
            print(f"corpus {args.corpus!r} is embedded by {conf['backend']} model {conf['model']}; this command "
                  "encodes queries locally only", file=sys.stderr)
            return 2
        encoder = LocalEncoder(args.model or conf["model"], normalize=conf.get("normalize", True))
        checksum = encoder.spec.stored_as(conf.get("storage", Storage.VECTOR)).checksum
        if checksum != active["model_checksum"]:
            print(f"model {encoder.model_name!r} (checksum {checksum}) is not the corpus's active model "
                  f"({active['model_checksum']})", file=sys.stderr)
            return 2
        hits = search(store, args.corpus, encoder.encode([args.query])[0], k=args.k,
                      model_checksum=active["model_checksum"])
    if args.json:
        print(json.dumps([h.__dict__ for h in hits], ensure_ascii=False, indent=2))
        return 0
    for i, h in enumerate(hits, 1):
        print(f"{i}. {h.score:.3f}  {h.chunk_id}\n   {h.text[:200]!r}")
    return 0


def _unlock(args) -> int:
    from reindex.store import Store, connect
    from reindex.store.leases import get_lease, release

    with connect(_dsn(args.dsn), autocommit=True) as conn:
        store = Store(conn, args.schema)
        holder = get_lease(store, args.corpus)
        if holder.free:
            print(f"corpus {args.corpus!r} is not leased")
            return 0
        release(store, args.corpus, holder.batch_id)
    print(f"released corpus {args.corpus!r} from run {holder.run_id} (batch {holder.batch_id})")
    return 0


def main(argv: list[str] | None = None) -> int:
    from reindex.config import DEFAULT_SCHEMA

    ap = argparse.ArgumentParser(prog="python -m reindex", description="Inspect and query reindexed corpora.")
    ap.add_argument("--dsn", help="PostgreSQL URI of the store (default: $REINDEX_STORE_URI or the embedded one)")
    ap.add_argument("--schema", default=DEFAULT_SCHEMA)
    sub = ap.add_subparsers(dest="command", required=True)
    st = sub.add_parser("status", help="counts by status, model, last batch")
    st.add_argument("--corpus", required=True)
    st.add_argument("--json", action="store_true")
    se = sub.add_parser("search", help="semantic search over a corpus")
    se.add_argument("--corpus", required=True)
    se.add_argument("query")
    se.add_argument("-k", type=int, default=5)
    se.add_argument("--model", default=None, help="local model name or path (default: the corpus's active model)")
    se.add_argument("--json", action="store_true")
    un = sub.add_parser("unlock", help="free a corpus whose lease is held by a dead run")
    un.add_argument("--corpus", required=True)
    args = ap.parse_args(argv)
    return {"status": _status, "search": _search, "unlock": _unlock}[args.command](args)
