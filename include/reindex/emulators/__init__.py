"""Local stand-ins for Google services, for tests and offline demos.

- ``reindex.emulators.vertex``: a Vertex AI BatchPredictionJob REST emulator (``VertexEmulator``,
  ``EmulatorConfig``) that embeds texts read from GCS and writes Google-format JSONL results.
- ``reindex.emulators.gcs``: starts ``gcp-storage-emulator`` in-process (``start_gcs_emulator``,
  ``gcs_emulator``).

Names are resolved lazily so that ``python -m reindex.emulators.vertex`` does not import its
module twice and importing this package stays cheap.
"""

from __future__ import annotations

_EXPORTS = {
    "EmulatorConfig": "reindex.emulators.vertex",
    "VertexEmulator": "reindex.emulators.vertex",
    "start_gcs_emulator": "reindex.emulators.gcs",
    "gcs_emulator": "reindex.emulators.gcs",
    "anonymous_client": "reindex.emulators.gcs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
