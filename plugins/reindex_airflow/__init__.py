"""Airflow-facing parts of airflow-reindex: hooks (I/O), task callables, operators and triggers.

Importing this package is cheap: torch, sentence-transformers and Google clients are imported
inside the tasks that need them, never at DAG parse time.
"""
