import hashlib

import orjson
import pytest

from reindex.errors import ConfigError
from reindex.vertex import formats
from reindex.vertex.formats import CLASSIC, GEMINI, content_key, family_for, limits_for, request_line


@pytest.mark.parametrize("model, family", [
    ("text-embedding-005", CLASSIC),
    ("text-multilingual-embedding-002", CLASSIC),
    ("textembedding-gecko@003", CLASSIC),
    ("textembedding-gecko-multilingual@001", CLASSIC),
    ("publishers/google/models/text-embedding-005", CLASSIC),
    ("gemini-embedding-001", GEMINI),
])
def test_family_for(model, family):
    assert family_for(model) == family


@pytest.mark.parametrize("model", ["gpt-embed", "sentence-transformers/all-MiniLM-L6-v2", "", "gemini-2.5-pro"])
def test_family_for_unknown_names_supported_models(model):
    with pytest.raises(ConfigError, match="text-embedding-005.*gemini-embedding-001"):
        family_for(model)


def test_documented_limits():
    assert formats.MAX_TOKENS_PER_TEXT == 2048
    assert formats.CLASSIC_MAX_PROMPTS_PER_JOB == 30_000
    assert formats.GEMINI_MAX_ROWS_PER_JOB == 1_000_000
    assert formats.GEMINI_MAX_BYTES_PER_JOB == 1_000_000_000
    assert limits_for(CLASSIC).max_rows == 30_000 and limits_for(CLASSIC).max_bytes is None
    assert limits_for(GEMINI).max_rows == 1_000_000 and limits_for(GEMINI).max_bytes == 1_000_000_000
    with pytest.raises(ConfigError):
        limits_for("other")
    with pytest.raises(ConfigError):
        formats.JobLimits(max_rows=0)


def test_classic_line_exact():
    text = "Фотосинтез \"quoted\"\n"
    line = request_line(content_key(text), text, CLASSIC, output_dimensionality=256)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert line == orjson.dumps({"content": text, "task_type": "RETRIEVAL_DOCUMENT"}) + b"\n"
    assert line.startswith(b'{"content":"\xd0\xa4')  # UTF-8, not \u escapes
    assert b"key" not in line  # the content hash is the join key, not written


def test_classic_key_must_be_content_hash():
    assert content_key("abc") == hashlib.sha256(b"abc").hexdigest()
    with pytest.raises(ValueError, match="sha256"):
        request_line("chunk-1", "abc", CLASSIC)


def test_gemini_line_exact():
    line = request_line("k1", "hello", GEMINI, output_dimensionality=768)
    assert line == (b'{"key":"k1","request":{"content":{"parts":[{"text":"hello"}]},'
                    b'"embed_content_config":{"output_dimensionality":768,"task_type":"RETRIEVAL_DOCUMENT"}}}\n')
    plain = orjson.loads(request_line("k2", "x", GEMINI, task_type="RETRIEVAL_QUERY"))
    assert plain["request"]["embed_content_config"] == {"task_type": "RETRIEVAL_QUERY"}


def test_bad_task_type_and_unencodable_text():
    with pytest.raises(ValueError, match="task_type"):
        request_line("k", "x", GEMINI, task_type="NOPE")
    with pytest.raises(TypeError):
        request_line("k", "bad \ud800 surrogate", GEMINI)
