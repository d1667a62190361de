"""The nightly corpus list: YAML file + Airflow Variable, validated with errors naming the entry."""

from __future__ import annotations

import pytest

from reindex.corpus_list import DEFAULT_FILE, load_corpora
from reindex.errors import ConfigError

FILE = """
corpora:
  - name: kb
    uri: /data/kb
    backend: local
    model: all-MiniLM-L6-v2
  - name: client_a
    uri: gs://bucket/a/
    backend: vertex
    model: text-multilingual-embedding-002
    max_tokens: 300
  - name: old
    uri: /data/old
    enabled: false
"""


def test_file_and_variable_merge_by_name():
    variable = '[{"name": "client_a", "uri": "gs://bucket/a2/", "backend": "vertex"}, {"name": "new", "uri": "/x"}]'
    confs = load_corpora(FILE, variable)
    assert [c["corpus"] for c in confs] == ["kb", "client_a", "new"]  # 'old' is disabled
    a = confs[1]
    assert a["corpus_uri"] == "gs://bucket/a2/" and a["model"] == "text-embedding-005"  # the Variable's entry wins
    assert all(c["follow_active_model"] for c in confs)
    assert load_corpora(FILE, None, only=["old"])[0]["corpus"] == "old"


def test_the_repository_file_lists_the_sample_corpus():
    confs = load_corpora(DEFAULT_FILE.read_text(), None)
    assert [(c["corpus"], c["corpus_uri"]) for c in confs] == [("sample", "include/sample_corpus")]


@pytest.mark.parametrize(("text", "message"), [
    ("- name: kb\n", r"corpora file, entry 1 \('kb'\): missing uri"),
    ("- name: Bad-Name\n  uri: /x\n", r"entry 1 \('Bad-Name'\): corpus name 'Bad-Name' is invalid"),
    ("- name: kb\n  uri: /x\n  max_tokens: 99999\n", r"max_tokens=99999 is out of range: must be between 16 and 8192"),
    ("- name: kb\n  uri: /x\n  colour: red\n", r"unknown key\(s\) \['colour'\]"),
    ("- name: kb\n  uri: /x\n  enabled: maybe\n", r"enabled must be true or false"),
    ("corpora: {kb: 1}\n", r"expected a list of corpus entries"),
    ("- [unclosed\n", r"not valid YAML/JSON"),
])
def test_bad_entries_name_the_entry_and_the_limit(text, message):
    with pytest.raises(ConfigError, match=message):
        load_corpora(text, None)


def test_unknown_corpus_asked_for():
    with pytest.raises(ConfigError, match=r"corpora \['nope'\] are not configured; configured: \['client_a', 'kb', 'old'\]"):
        load_corpora(FILE, None, only=["nope"])


def test_storage_seeds_a_new_corpus_and_empty_is_the_default():
    text = ("- {name: half, uri: /h, storage: halfvec}\n- {name: plain, uri: /p, storage: ''}\n"
            "- {name: unset, uri: /u}\n")
    confs = {c["corpus"]: c for c in load_corpora(text, None)}
    assert confs["half"]["storage"] == "halfvec"
    assert confs["plain"]["storage"] == "vector"  # what the Params form's enum accepts
    assert "storage" not in confs["unset"]  # the run's default; an existing corpus follows its active model
    with pytest.raises(ConfigError, match=r"entry 1 \('kb'\): storage 'float16' is not supported: choose one of "
                                          r"\['vector', 'halfvec'\]"):
        load_corpora("- {name: kb, uri: /x, storage: float16}\n", None)


def test_the_variable_adds_to_the_repository_file_and_sample_stops_only_when_disabled():
    """The Variable is merged with config/corpora.yaml: `sample` keeps running beside the Variable's
    corpora until an entry disables it (the form the README and the DAG doc give)."""
    file_text = DEFAULT_FILE.read_text()
    confs = load_corpora(file_text, '[{"name": "kb", "uri": "/data/kb"}]')
    assert [c["corpus"] for c in confs] == ["sample", "kb"]
    off = '[{"name": "sample", "uri": "include/sample_corpus", "enabled": false}, {"name": "kb", "uri": "/data/kb"}]'
    assert [c["corpus"] for c in load_corpora(file_text, off)] == ["kb"]
    with pytest.raises(ConfigError, match=r"Variable 'reindex_corpora', entry 1 \('sample'\): missing uri"):
        load_corpora(file_text, '[{"name": "sample", "enabled": false}]')
