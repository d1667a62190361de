"""The pgvector store: schema, document/chunk merge, vector loading, batches, search.

Every function takes a ``Store`` (a psycopg 3 connection plus the schema name). Identifiers are
always composed with ``psycopg.sql``; no SQL is built by string formatting.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import psycopg
from psycopg import sql

from reindex.config import DEFAULT_SCHEMA


@dataclass
class Store:
    conn: psycopg.Connection
    schema: str = DEFAULT_SCHEMA

    def t(self, name: str) -> sql.Identifier:
        """A schema-qualified table identifier."""
        return sql.Identifier(self.schema, name)

    def execute(self, query, params=None):
        return self.conn.execute(query, params)

    def one(self, query, params=None):
        return self.conn.execute(query, params).fetchone()


def connect(dsn: str, *, autocommit: bool = False) -> psycopg.Connection:
    return psycopg.connect(dsn, autocommit=autocommit)


def embedding_table_name(corpus: str, model_checksum: str) -> str:
    """Name of the vector table of one (corpus, model): readable and within 63 bytes."""
    if len(corpus) <= 45:
        return f"emb_{corpus}_{model_checksum[:12]}"
    digest = hashlib.sha1(corpus.encode()).hexdigest()[:6]
    return f"emb_{corpus[:38]}_{digest}_{model_checksum[:12]}"


def corpus_lock_key(corpus: str) -> int:
    """A stable 63-bit key for ``pg_advisory_lock`` on one corpus."""
    return int.from_bytes(hashlib.sha256(f"reindex:{corpus}".encode()).digest()[:8], "big") >> 1
