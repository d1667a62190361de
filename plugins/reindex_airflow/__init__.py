"""Airflow-facing parts of airflow-reindex: hooks (I/O), task callables, operators and triggers.

Importing this package is cheap: torch, sentence-transformers and Google clients are imported
inside the tasks that need them, never at DAG parse time.
"""

import os as _os

# gcsfs (gs:// corpora through ObjectStoragePath) by default probes every bucket's storage layout over gRPC and
# does not cache an unknown answer: against an endpoint that cannot answer it (the GCS emulator, a proxy) each
# filesystem call then stalls ~60 s. The plain JSON-API filesystem serves every bucket this product reads.
# Set before gcsfs is first imported; an explicit setting in the environment wins.
_os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
