"""Per-corpus leases: two runs touching the same corpus never interleave their writes.

A run takes the corpus's lease before its first write (the chunk stage, a retry claim, an
upgrade claim) and gives it back when its batch closes. The lease lives on the ``corpora`` row;
taking it is serialised by a transaction-scoped ``pg_advisory_xact_lock`` on the corpus key, so
two runs racing for it see one winner. A lease outlives the connection that took it (a run is
many task processes), so it is released explicitly, and a lease whose holder looks dead (its
batch is closed, or it has not been touched for ``ttl_seconds``) can be taken over.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime

from psycopg import sql

from reindex.errors import ReindexError
from reindex.store import Store, corpus_lock_key

log = logging.getLogger(__name__)

DEFAULT_TTL_SECONDS = 48 * 3600  # longer than a Vertex batch job may run


class CorpusBusyError(ReindexError):
    """Another run holds the corpus's lease."""

    def __init__(self, message: str, holder: Lease) -> None:
        super().__init__(message)
        self.holder = holder


@dataclass(frozen=True)
class Lease:
    corpus: str
    batch_id: str | None
    run_id: str | None
    acquired_at: datetime | None
    heartbeat_at: datetime | None

    @property
    def free(self) -> bool:
        return self.batch_id is None


def lease_ttl_seconds() -> int:
    return int(os.environ.get("REINDEX_LEASE_TTL_SECONDS", DEFAULT_TTL_SECONDS))


def get_lease(store: Store, corpus: str) -> Lease:
    row = store.one(sql.SQL("""SELECT lease_batch_id, lease_run_id, lease_acquired_at, lease_heartbeat_at
        FROM {} WHERE corpus = %s""").format(store.t("corpora")), (corpus,))
    return Lease(corpus, *row) if row else Lease(corpus, None, None, None, None)


def _describe(h: Lease) -> str:
    return (f"run {h.run_id or '?'} (batch {h.batch_id}) has held it since "
            f"{h.acquired_at.isoformat(timespec='seconds') if h.acquired_at else '?'}")


def try_acquire(store: Store, corpus: str, batch_id: str, run_id: str | None = None, *,
                ttl_seconds: int | None = None) -> Lease | None:
    """Take the lease for ``batch_id`` if it is free, already ours, or its holder looks dead.

    Returns None on success, else the current holder.
    """
    from reindex.store.documents import ensure_corpus

    ttl = lease_ttl_seconds() if ttl_seconds is None else ttl_seconds
    t = store.t
    with store.conn.transaction():
        store.execute("SELECT pg_advisory_xact_lock(%s)", (corpus_lock_key(corpus),))
        ensure_corpus(store, corpus)
        holder = Lease(corpus, *store.one(sql.SQL("""SELECT lease_batch_id, lease_run_id, lease_acquired_at,
                lease_heartbeat_at FROM {} WHERE corpus = %s FOR UPDATE""").format(t("corpora")), (corpus,)))
        if not holder.free and holder.batch_id != batch_id:
            (alive,) = store.one(sql.SQL("""SELECT %s::timestamptz > now() - make_interval(secs => %s)
                AND NOT EXISTS (SELECT 1 FROM {batches} WHERE batch_id = %s AND status <> 'RUNNING')""").format(
                batches=t("batches")), (holder.heartbeat_at, ttl, holder.batch_id))
            if alive:
                return holder
            log.warning("corpus %s: taking over the lease of %s (closed or silent for %d s)", corpus,
                        _describe(holder), ttl)
        store.execute(sql.SQL("""UPDATE {} SET lease_batch_id = %s, lease_run_id = %s,
                lease_acquired_at = CASE WHEN lease_batch_id IS DISTINCT FROM %s THEN now()
                                         ELSE lease_acquired_at END,
                lease_heartbeat_at = now() WHERE corpus = %s""").format(t("corpora")),
            (batch_id, run_id, batch_id, corpus))
    return None


def busy_message(corpus: str, holder: Lease, waited: float | None = None) -> str:
    waited_txt = f" after waiting {waited:.0f} s" if waited is not None else ""
    return (f"corpus {corpus!r} is busy{waited_txt}: {_describe(holder)}. Two runs never write one corpus "
            "at once; this run starts when that one ends (on_busy=wait), or rerun it later. If that run is "
            f"dead, free the corpus with `python -m reindex unlock --corpus {corpus}`.")


def acquire(store: Store, corpus: str, batch_id: str, run_id: str | None = None, *, wait_seconds: float = 0,
            poll_seconds: float = 2.0, ttl_seconds: int | None = None) -> None:
    """Take the lease, waiting up to ``wait_seconds`` for the holder to finish; raises ``CorpusBusyError``."""
    started = time.monotonic()
    while True:
        holder = try_acquire(store, corpus, batch_id, run_id, ttl_seconds=ttl_seconds)
        if holder is None:
            return
        waited = time.monotonic() - started
        if waited >= wait_seconds:
            raise CorpusBusyError(busy_message(corpus, holder, waited if wait_seconds else None), holder)
        log.info("corpus %s busy (%s); waiting", corpus, _describe(holder))
        time.sleep(min(poll_seconds, max(0.0, wait_seconds - waited)))


def heartbeat(store: Store, corpus: str, batch_id: str) -> None:
    """Show the lease's holder is alive (long runs touch it from every task)."""
    store.execute(sql.SQL("UPDATE {} SET lease_heartbeat_at = now() WHERE corpus = %s AND lease_batch_id = %s").format(
        store.t("corpora")), (corpus, batch_id))


def release(store: Store, corpus: str, batch_id: str | None = None) -> bool:
    """Give the lease back (only if ``batch_id`` holds it; any holder when None). Returns whether it was held."""
    cond = sql.SQL("lease_batch_id IS NOT NULL") if batch_id is None else sql.SQL("lease_batch_id = %s")
    params = (corpus,) if batch_id is None else (corpus, batch_id)
    return store.execute(sql.SQL("""UPDATE {} SET lease_batch_id = NULL, lease_run_id = NULL, lease_acquired_at = NULL,
        lease_heartbeat_at = NULL WHERE corpus = %s AND {}""").format(store.t("corpora"), cond), params).rowcount > 0
