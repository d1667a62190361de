"""The configured client corpora that ``reindex_nightly`` reindexes.

Two sources, merged by corpus name (the second wins): a YAML file in the repository
(``config/corpora.yaml``, or ``$REINDEX_CORPORA_FILE``) and an Airflow Variable
(``reindex_corpora``, JSON or YAML). Each source holds a list of entries, either bare or under a
``corpora:`` key::

    corpora:
      - name: kb                   # corpus name (required)
        uri: gs://bucket/kb/       # corpus URI (required): directory, file, file:// or gs://
        backend: local             # local | vertex (default local)
        model: all-MiniLM-L6-v2    # seeds a new corpus; afterwards the corpus's active model is used
        storage: halfvec           # vector | halfvec: seeds a new corpus too (empty: vector); an existing
                                   # corpus keeps its own (switch with reindex_model_upgrade)
        enabled: true              # false: skipped by the nightly run
        max_tokens: 200            # any other reindex_corpus parameter

Every entry is validated here, with errors naming the source, the entry and the limit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from reindex.config import ReindexConfig
from reindex.errors import ConfigError

DEFAULT_FILE = Path(__file__).resolve().parents[2] / "config" / "corpora.yaml"
VARIABLE = "reindex_corpora"
_ALIASES = {"name": "corpus", "uri": "corpus_uri"}
_NOT_CONFIG = {"enabled"}


def corpora_file() -> Path:
    from reindex.settings import corpora_file as from_env

    return from_env(DEFAULT_FILE)


def parse_entries(text: str | None, source: str) -> list[dict[str, Any]]:
    """The raw entries of one source (YAML or JSON text); an empty source has none."""
    if text is None or not text.strip():
        return []
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML/JSON: {e}") from None
    if isinstance(data, dict):
        data = data.get("corpora", [])
    if data is None:
        return []
    if not isinstance(data, list) or not all(isinstance(e, dict) for e in data):
        raise ConfigError(f"{source}: expected a list of corpus entries (mappings), optionally under 'corpora:'")
    return data


def entry_config(entry: dict[str, Any], source: str, index: int) -> dict[str, Any]:
    """One validated entry as ``reindex_corpus`` conf (the run's Params)."""
    conf = {_ALIASES.get(k, k): v for k, v in entry.items() if k not in _NOT_CONFIG}
    label = f"{source}, entry {index + 1} ({entry.get('name', '?')!r})"
    missing = [k for k in ("name", "uri") if _ALIASES[k] not in conf]
    if missing:
        raise ConfigError(f"{label}: missing {', '.join(missing)}")
    known = set(ReindexConfig.__dataclass_fields__)
    unknown = sorted(set(conf) - known)
    if unknown:
        raise ConfigError(f"{label}: unknown key(s) {unknown}; allowed: name, uri, enabled and {sorted(known)}")
    try:
        cfg = ReindexConfig.from_mapping({**conf, "follow_active_model": True})
    except ConfigError as e:
        raise ConfigError(f"{label}: {e}") from None
    out = {k: v for k, v in conf.items() if v is not None}
    out["follow_active_model"] = True
    out["model"] = cfg.model
    if "storage" in out:  # an empty value is the default, which the Params form's enum spells "vector"
        out["storage"] = cfg.storage.value
    return out


def load_corpora(file_text: str | None, variable_text: str | None, *, file_source: str = "corpora file",
                 only: list[str] | None = None) -> list[dict[str, Any]]:
    """Merged, validated, enabled corpus confs, in file order then new Variable entries."""
    merged: dict[str, dict[str, Any]] = {}
    enabled: dict[str, bool] = {}
    for text, source in ((file_text, file_source), (variable_text, f"Airflow Variable {VARIABLE!r}")):
        for i, entry in enumerate(parse_entries(text, source)):
            conf = entry_config(entry, source, i)
            merged[conf["corpus"]] = conf
            flag = entry.get("enabled", True)
            if not isinstance(flag, bool):
                raise ConfigError(f"{source}, entry {i + 1}: enabled must be true or false, got {flag!r}")
            enabled[conf["corpus"]] = flag
    if only:
        unknown = sorted(set(only) - set(merged))
        if unknown:
            raise ConfigError(f"corpora {unknown} are not configured; configured: {sorted(merged)}")
        return [merged[name] for name in only]
    return [conf for name, conf in merged.items() if enabled[name]]
