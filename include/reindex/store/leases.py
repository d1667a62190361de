"""Per-corpus leases: two runs touching the same corpus never interleave their writes.

A run takes the corpus's lease before its first write (the chunk stage, a retry claim, an
upgrade claim) and gives it back when its batch closes. The lease lives on the ``corpora`` row;
taking it is serialised by a transaction-scoped ``pg_advisory_xact_lock`` on the corpus key, so
two runs racing for it see one winner. A lease outlives the connection that took it (a run is
many task processes), so it is released explicitly.

A lease whose holder is dead is taken over by the next run that asks for the corpus:
- its holder's DAG run is known and no longer queued or running (``holder_alive`` — the Airflow
  layer asks Airflow; the core knows no Airflow), or the holder's batch is closed or never existed;
- when the run's state cannot be known, its heartbeat (renewed by every task of the holder) is
  older than ``REINDEX_LEASE_TTL_SECONDS``.
The dead holder's batch is closed as ``ABANDONED`` and its unfinished chunks become FAILED
``ABANDONED`` (retriable): the run taking over claims them again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from psycopg import sql

from reindex.errors import CorpusBusyError
from reindex.store import Store, corpus_lock_key

log = logging.getLogger(__name__)

# Only for holders whose DAG run state cannot be asked (no DAG id, or outside Airflow): a live run
# renews the heartbeat from every task, but a deferred Vertex wait touches nothing for hours.
DEFAULT_TTL_SECONDS = 6 * 3600

HolderAlive = Callable[["Lease"], bool | None]  # True / False, or None when it cannot be known


@dataclass(frozen=True)
class Lease:
    corpus: str
    batch_id: str | None
    run_id: str | None
    acquired_at: datetime | None
    heartbeat_at: datetime | None
    dag_id: str | None = None

    @property
    def free(self) -> bool:
        return self.batch_id is None


def lease_ttl_seconds() -> int:
    from reindex.settings import lease_ttl_seconds as from_env

    return from_env()


def get_lease(store: Store, corpus: str) -> Lease:
    row = store.one(sql.SQL("""SELECT {cols} FROM {} WHERE corpus = %s""").format(
        store.t("corpora"), cols=_LEASE_COLUMNS), (corpus,))
    return Lease(corpus, *row) if row else Lease(corpus, None, None, None, None)


_LEASE_COLUMNS = sql.SQL("lease_batch_id, lease_run_id, lease_acquired_at, lease_heartbeat_at, lease_dag_id")


def _describe(h: Lease) -> str:
    run = f"{h.dag_id}/{h.run_id}" if h.dag_id else (h.run_id or "?")
    beat = f", last heartbeat {h.heartbeat_at.isoformat(timespec='seconds')}" if h.heartbeat_at else ""
    return (f"run {run} (batch {h.batch_id}) has held it since "
            f"{h.acquired_at.isoformat(timespec='seconds') if h.acquired_at else '?'}{beat}")


def _holder_dead(store: Store, holder: Lease, ttl: int, holder_alive: HolderAlive | None) -> str | None:
    """Why the holder is dead, or None while it may be alive."""
    (state,) = store.one(sql.SQL("SELECT status FROM {} WHERE batch_id = %s").format(store.t("batches")),
                         (holder.batch_id,)) or (None,)
    if state is not None and state != "RUNNING":
        return f"its batch is closed ({state})"
    verdict = holder_alive(holder) if holder_alive is not None else None
    if verdict is False:
        return "its DAG run is no longer running"
    if verdict is None:
        (silent,) = store.one("SELECT %s::timestamptz IS NULL OR %s::timestamptz <= now() - make_interval(secs => %s)",
                              (holder.heartbeat_at, holder.heartbeat_at, ttl))
        if silent:
            return f"no heartbeat for {ttl} s (REINDEX_LEASE_TTL_SECONDS)"
    return None


def abandon_batch(store: Store, batch_id: str, reason: str) -> int:
    """Close a dead run's batch as ``ABANDONED``: its unfinished (PENDING) chunks become FAILED ``ABANDONED``
    (retriable: the next run claims them again). Returns how many chunks were left unfinished."""
    t = store.t
    (running,) = store.one(sql.SQL("SELECT count(*) FROM {} WHERE batch_id = %s AND status = 'RUNNING'").format(
        t("batches")), (batch_id,))
    if not running:  # closed already (or never opened): its chunks are its summary's business
        return 0
    n = store.execute(sql.SQL("""UPDATE {} SET embedding_status = 'FAILED', error_code = 'ABANDONED',
            error_message = %s, updated_at = now() WHERE batch_id = %s AND embedding_status = 'PENDING'""").format(
        t("chunks")), (f"abandoned: {reason}"[:2000], batch_id)).rowcount
    store.execute(sql.SQL("""UPDATE {} SET status = 'ABANDONED', finished_at = now(),
            details = details || jsonb_build_object('message', %s::text)
        WHERE batch_id = %s AND status = 'RUNNING'""").format(t("batches")),
        (f"abandoned ({reason}); {n} unfinished chunk(s) left for the next run", batch_id))
    return n


def try_acquire(store: Store, corpus: str, batch_id: str, run_id: str | None = None, *,
                ttl_seconds: int | None = None, dag_id: str | None = None,
                holder_alive: HolderAlive | None = None) -> Lease | None:
    """Take the lease for ``batch_id`` if it is free, already ours, or its holder is dead (see the module
    docstring; a dead holder's batch is closed ``ABANDONED``).

    Returns None on success, else the current (live) holder.
    """
    from reindex.store.documents import ensure_corpus

    ttl = lease_ttl_seconds() if ttl_seconds is None else ttl_seconds
    t = store.t
    with store.conn.transaction():
        store.execute("SELECT pg_advisory_xact_lock(%s)", (corpus_lock_key(corpus),))
        ensure_corpus(store, corpus)
        holder = Lease(corpus, *store.one(sql.SQL("SELECT {cols} FROM {} WHERE corpus = %s FOR UPDATE").format(
            t("corpora"), cols=_LEASE_COLUMNS), (corpus,)))
        if not holder.free and holder.batch_id != batch_id:
            why = _holder_dead(store, holder, ttl, holder_alive)
            if why is None:
                return holder
            unfinished = abandon_batch(store, holder.batch_id, why)
            log.warning("corpus %s: taking over the lease of %s: %s; its batch is ABANDONED with %d unfinished "
                        "chunk(s), which this run claims again", corpus, _describe(holder), why, unfinished)
        store.execute(sql.SQL("""UPDATE {} SET lease_run_id = coalesce(%s, lease_run_id),
                lease_dag_id = CASE WHEN lease_batch_id IS DISTINCT FROM %s THEN %s
                                    ELSE coalesce(%s, lease_dag_id) END,
                lease_acquired_at = CASE WHEN lease_batch_id IS DISTINCT FROM %s THEN now()
                                         ELSE lease_acquired_at END,
                lease_batch_id = %s, lease_heartbeat_at = now() WHERE corpus = %s""").format(t("corpora")),
            (run_id, batch_id, dag_id, dag_id, batch_id, batch_id, corpus))
    return None


def busy_message(corpus: str, holder: Lease, waited: float | None = None) -> str:
    waited_txt = f" after waiting {waited:.0f} s" if waited is not None else ""
    return (f"corpus {corpus!r} is busy{waited_txt}: {_describe(holder)}. Two runs never write one corpus "
            "at once; this run starts when that one ends (on_busy=wait), or rerun it later. A holder whose run "
            "has ended is taken over automatically; if it is stuck running, mark that run failed in Airflow, or "
            f"free the corpus with `python -m reindex unlock --corpus {corpus}`.")


def acquire(store: Store, corpus: str, batch_id: str, run_id: str | None = None, *, wait_seconds: float = 0,
            poll_seconds: float = 2.0, ttl_seconds: int | None = None, dag_id: str | None = None) -> None:
    """Take the lease, waiting up to ``wait_seconds`` for the holder to finish; raises ``CorpusBusyError``."""
    started = time.monotonic()
    while True:
        holder = try_acquire(store, corpus, batch_id, run_id, ttl_seconds=ttl_seconds, dag_id=dag_id)
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


def free(store: Store, corpus: str, batch_id: str, reason: str) -> int | None:
    """Free a dead run's lease by hand (the CLI's ``unlock``, the UI's action): under the corpus lock, give back
    the lease of ``batch_id`` and close that batch ``ABANDONED`` as a takeover would (its unfinished chunks
    become FAILED ``ABANDONED``, retriable). Returns the unfinished chunk count, or None when ``batch_id`` no
    longer held the lease."""
    with store.conn.transaction():
        store.execute("SELECT pg_advisory_xact_lock(%s)", (corpus_lock_key(corpus),))
        if not release(store, corpus, batch_id):
            return None
        return abandon_batch(store, batch_id, reason)


def release(store: Store, corpus: str, batch_id: str | None = None) -> bool:
    """Give the lease back (only if ``batch_id`` holds it; any holder when None). Returns whether it was held."""
    cond = sql.SQL("lease_batch_id IS NOT NULL") if batch_id is None else sql.SQL("lease_batch_id = %s")
    params = (corpus,) if batch_id is None else (corpus, batch_id)
    return store.execute(sql.SQL("""UPDATE {} SET lease_batch_id = NULL, lease_run_id = NULL, lease_acquired_at = NULL,
        lease_heartbeat_at = NULL, lease_dag_id = NULL WHERE corpus = %s AND {}""").format(
        store.t("corpora"), cond), params).rowcount > 0
