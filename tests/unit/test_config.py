import pytest

from reindex.config import ReindexConfig
from reindex.errors import ConfigError


def test_defaults_are_valid():
    cfg = ReindexConfig(corpus="kb", corpus_uri="/data/kb")
    assert cfg.backend.value == "local" and cfg.max_tokens == 200


@pytest.mark.parametrize(
    "override,message",
    [
        ({"corpus": "Bad-Name"}, r"corpus name 'Bad-Name' is invalid: it must match"),
        ({"corpus": "a" * 64}, r"at most 63 characters"),
        ({"corpus_uri": " "}, r"corpus_uri is empty"),
        ({"backend": "openai"}, r"backend 'openai' is not supported: choose one of \['local', 'vertex', 'service'\]"),
        ({"max_tokens": 9000}, r"max_tokens=9000 is out of range: must be between 16 and 8192"),
        ({"overlap_tokens": 150}, r"overlap_tokens=150 is out of range: must be between 0 and 100"),
        ({"partition_size": 10}, r"partition_size=10 is out of range"),
        ({"encode_batch_size": "64"}, r"encode_batch_size must be an integer"),
        ({"index_type": "flat"}, r"index_type 'flat' is not supported"),
    ],
)
def test_bad_values_name_the_input_and_the_limit(override, message):
    values = {"corpus": "kb", "corpus_uri": "/data/kb", **override}
    with pytest.raises(ConfigError, match=message):
        ReindexConfig(**values)


def test_from_mapping_takes_nones_as_defaults_and_round_trips():
    cfg = ReindexConfig.from_mapping({"corpus": "kb", "corpus_uri": "x", "model": None})
    assert cfg.model == "all-MiniLM-L6-v2"
    assert ReindexConfig.from_mapping(cfg.to_dict()) == cfg


def test_from_mapping_refuses_unknown_keys_by_name():
    """A typo in a run's conf is an error that names it and the valid keys, not a silently ignored value."""
    with pytest.raises(ConfigError, match=r"^unknown parameter\(s\) 'max_token' \(did you mean 'max_tokens'\?\), "
                                          r"'zzz': valid parameters are backend, busy_wait_seconds, "):
        ReindexConfig.from_mapping({"corpus": "kb", "corpus_uri": "x", "max_token": 100, "zzz": 1})
