"""The plugin's connection to the vector store: the DAGs' own (Airflow connection ``reindex_pg``).

Pages read through a read-only session with a short statement timeout
(``REINDEX_UI_STATEMENT_TIMEOUT_MS``, default 5000). Errors never carry the connection's DSN,
host or password to a page, a JSON answer or the log: a connection failure is reported by its
class, a query failure by its SQLSTATE.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from fastapi import HTTPException, status
from psycopg import sql

from reindex.store import Store

log = logging.getLogger(__name__)

CONN_ID = "reindex_pg"
DEFAULT_TIMEOUT_MS = 5000


def statement_timeout_ms() -> int:
    raw = os.environ.get("REINDEX_UI_STATEMENT_TIMEOUT_MS", str(DEFAULT_TIMEOUT_MS))
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 100 <= value <= 600_000:
        raise HTTPException(status.HTTP_500_INTERNAL_SERVER_ERROR,
                            f"REINDEX_UI_STATEMENT_TIMEOUT_MS={raw[:20]!r} must be an integer 100–600000 (ms)")
    return value


@contextmanager
def open_store(*, writable: bool = False) -> Iterator[Store]:
    """A ``Store`` on a fresh ``reindex_pg`` connection, read-only unless ``writable`` (the two actions).

    Store and connection errors become 503/500 ``HTTPException``s without connection details.
    """
    from airflow.exceptions import AirflowNotFoundException

    from reindex.store.inspect import read_only
    from reindex_airflow.hooks import PgVectorHook

    timeout = statement_timeout_ms()
    try:
        with PgVectorHook(CONN_ID).store() as store:
            if writable:
                store.execute(sql.SQL("SET statement_timeout = {}").format(sql.Literal(timeout)))
            else:
                read_only(store, statement_timeout_ms=timeout)
            yield store
    except AirflowNotFoundException:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            f"the Airflow connection {CONN_ID!r} (the vector store) is not defined") from None
    except psycopg.errors.QueryCanceled:
        log.warning("reindex UI: a store query ran past the %d ms statement timeout", timeout)
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            f"the store did not answer within the {timeout} ms statement timeout "
                            "(REINDEX_UI_STATEMENT_TIMEOUT_MS); try again or narrow the view") from None
    except psycopg.OperationalError as e:
        # The message of a failed connect names the server (and a DSN may be echoed): log the class only.
        log.warning("reindex UI: cannot reach the store (connection %r): %s", CONN_ID, type(e).__name__)
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            f"the vector store (Airflow connection {CONN_ID!r}) cannot be reached") from None
    except psycopg.Error as e:
        log.warning("reindex UI: store query failed: %s (SQLSTATE %s)", type(e).__name__, e.sqlstate)
        raise HTTPException(status.HTTP_500_INTERNAL_SERVER_ERROR,
                            f"a store query failed ({type(e).__name__}, SQLSTATE {e.sqlstate})") from None
