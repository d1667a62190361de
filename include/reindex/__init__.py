"""reindex: the Airflow-free core of airflow-reindex.

Chunk a corpus, compute embeddings (local sentence-transformers or Google Vertex batch),
bulk-load them into PostgreSQL + pgvector and keep per-chunk status. Nothing in this package
imports Airflow; the Airflow-facing hooks, operators and triggers live in ``plugins/``.
"""

__version__ = "0.1.0"
