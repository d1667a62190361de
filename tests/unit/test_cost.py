"""Cost estimates with known answers, the price table override, and a batch's usage from the store."""

from __future__ import annotations

import hashlib
from decimal import Decimal

import pytest

from reindex.cost import (
    PRICES,
    Price,
    batch_cost,
    batch_usage,
    estimate,
    load_prices,
    price_key,
    record_partition_usage,
)
from reindex.errors import ConfigError

CLASSIC_YAML = """
prices:
  vertex/text-embedding-005:
    unit: 1k_characters
    online: 0.000025
    batch: 0.00002
    date: "2026-01-15"
    source: "test fixture, not a real price"
"""


def test_gemini_batch_is_half_the_online_price():
    est = estimate("vertex", "gemini-embedding-001", tokens=1_000_000, characters=5_000_000, batch=True, prices=PRICES)
    assert {k: est[k] for k in ("unit", "quantity", "usd", "batch_usd", "online_usd", "saving_usd", "priced",
                                "price_date")} == {
        "unit": "1M_tokens", "quantity": 1_000_000, "usd": 0.075, "batch_usd": 0.075, "online_usd": 0.15,
        "saving_usd": 0.075, "priced": True, "price_date": "2025-09-10"}
    assert "Google Developers Blog, 2025-09-10" in est["price_source"]


def test_gemini_small_batch_rounds_to_micro_dollars():
    est = estimate("vertex", "gemini-embedding-001", tokens=3_333, characters=0, prices=PRICES)
    assert (est["batch_usd"], est["online_usd"], est["saving_usd"]) == (0.00025, 0.0005, 0.00025)


def test_online_work_saves_nothing():
    est = estimate("vertex", "gemini-embedding-001", tokens=2_000_000, characters=0, batch=False, prices=PRICES)
    assert (est["usd"], est["online_usd"], est["saving_usd"], est["batch"]) == (0.3, 0.3, 0.0, False)


def test_model_names_are_normalised():
    assert price_key("vertex", "projects/p/locations/l/publishers/google/models/gemini-embedding-001@001") == \
        "vertex/gemini-embedding-001"
    est = estimate("vertex", "publishers/google/models/gemini-embedding-001@001", tokens=10_000_000, characters=0,
                   prices=PRICES)
    assert (est["model"], est["usd"]) == ("gemini-embedding-001", 0.75)


def test_classic_models_are_billed_by_characters_and_unpriced_by_default():
    est = estimate("vertex", "text-embedding-005", tokens=100, characters=2_000_000, prices=PRICES)
    assert (est["unit"], est["quantity"], est["priced"], est["usd"], est["batch_usd"], est["online_usd"],
            est["saving_usd"], est["price_date"]) == ("1k_characters", 2_000_000, False, None, None, None, None, None)
    assert est["note"] == ("no batch price for vertex/text-embedding-005 (billed per 1k characters): "
                           "configure your price in $REINDEX_PRICES_FILE")
    assert est["price_source"].startswith("configure your price")


def test_local_encoding_costs_no_api_money_and_reports_seconds():
    est = estimate("local", "sentence-transformers/all-MiniLM-L6-v2", tokens=50_000, characters=200_000,
                   compute_seconds=12.3456, batch=False, prices=PRICES)
    assert (est["unit"], est["quantity"], est["usd"], est["online_usd"], est["saving_usd"], est["priced"]) == (
        "compute_seconds", 12.346, 0.0, 0.0, 0.0, True)


def test_unknown_model_says_what_to_configure():
    est = estimate("vertex", "text-embedding-999", tokens=1, characters=1, prices=PRICES)
    assert (est["priced"], est["unit"], est["usd"]) == (False, None, None)
    assert est["note"] == "no price for vertex/text-embedding-999: add it to a YAML table named by $REINDEX_PRICES_FILE"


def test_negative_usage_is_refused():
    with pytest.raises(ValueError, match=r"tokens \(-1\) and characters \(0\) must be >= 0"):
        estimate("vertex", "gemini-embedding-001", tokens=-1, characters=0, prices=PRICES)


def test_yaml_table_overrides_and_extends(tmp_path, monkeypatch):
    path = tmp_path / "prices.yaml"
    path.write_text(CLASSIC_YAML)
    monkeypatch.setenv("REINDEX_PRICES_FILE", str(path))
    table = load_prices()
    assert table["vertex/text-embedding-005"] == Price("1k_characters", 0.000025, 0.00002, "2026-01-15",
                                                       "test fixture, not a real price")
    assert table["vertex/gemini-embedding-001"] == PRICES["vertex/gemini-embedding-001"]  # untouched
    est = estimate("vertex", "text-embedding-005", tokens=0, characters=2_000_000)  # reads $REINDEX_PRICES_FILE
    assert (est["batch_usd"], est["online_usd"], est["saving_usd"], est["price_date"]) == (0.04, 0.05, 0.01,
                                                                                          "2026-01-15")


@pytest.mark.parametrize(("text", "message"), [
    ("prices: [1, 2]", "must be a mapping with a 'prices' mapping"),
    ("prices:\n  gemini: {unit: 1M_tokens, online: 1, batch: 1, source: x}", "key 'gemini' must be '<backend>/<model>'"),
    ("prices:\n  vertex/m: {unit: tokens, online: 1, batch: 1, source: x}",
     "vertex/m.unit must be one of ['1M_tokens', '1k_characters', 'compute_seconds'], not 'tokens'"),
    ("prices:\n  vertex/m: {unit: 1M_tokens, online: -1, batch: 1, source: x}",
     "vertex/m.online must be a non-negative number or null, not -1"),
    ("prices:\n  vertex/m: {unit: 1M_tokens, online: 1, batch: 1}", "vertex/m.source must say where the price comes"),
    ("prices:\n  vertex/m: {unit: 1M_tokens, online: 1, batch: 1, source: x, date: 'May 2026'}",
     "vertex/m.date must be YYYY-MM-DD"),
    ("prices:\n  vertex/m: {unit: 1M_tokens, online: 1, batch: 1, source: x, price: 2}",
     "vertex/m has unknown field(s) ['price']"),
    ("prices: {", "is not valid YAML"),
])
def test_malformed_tables_name_the_file_and_entry(tmp_path, text, message):
    path = tmp_path / "prices.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_prices(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_missing_table_file(tmp_path):
    with pytest.raises(ConfigError, match=r"prices.yaml \(\$REINDEX_PRICES_FILE\) cannot be read"):
        load_prices(tmp_path / "prices.yaml")


# --- usage from the store -------------------------------------------------------------------------------

def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _seed(store, model_id: str, backend: str) -> None:
    from reindex.store.batches import create_batch

    store.execute(f"""INSERT INTO {store.schema}.models (model_checksum, model_id, revision, dim, normalized, backend)
        VALUES ('m1', %s, 'r', 768, true, %s)""", (model_id, backend))
    store.execute(f"INSERT INTO {store.schema}.corpora (corpus) VALUES ('kb')")
    store.execute(f"INSERT INTO {store.schema}.documents (corpus, doc_id) VALUES ('kb', 'd')")
    create_batch(store, "B", "kb", backend, "m1")
    create_batch(store, "OTHER", "kb", backend, "m1")
    rows = [  # chunk, text, tokens, status, batch
        ("a", "hello world", 2, "READY", "B"),
        ("b", "hello world", 2, "READY", "B"),  # same text as a: sent once
        ("c", "ünïcödé", 5, "READY", "B"),  # 7 characters, 11 UTF-8 bytes
        ("d", "failed text", 3, "FAILED", "B"),  # not billed
        ("e", "pending text", 4, "PENDING", "B"),
        ("f", "other batch", 6, "READY", "OTHER"),
        ("g", "reused", 6, "READY", None),
    ]
    for i, (chunk, text, tokens, status, batch) in enumerate(rows):
        store.execute(f"""INSERT INTO {store.schema}.chunks (corpus, chunk_id, doc_id, ordinal, text, content_sha256,
            token_count, embedding_status, batch_id) VALUES ('kb', %s, 'd', %s, %s, %s, %s, %s, %s)""",
                      (chunk, i, text, _sha(text), tokens, status, batch))


def test_batch_usage_counts_embedded_distinct_texts(store):
    _seed(store, "gemini-embedding-001", "vertex")
    assert batch_usage(store, "B") == {
        "batch_id": "B", "backend": "vertex", "model": "gemini-embedding-001", "chunks": 3, "texts": 2,
        "tokens": 7, "token_source": "tokenizer", "tokenizer_tokens": 7, "reported_tokens": 0, "characters": 18,
        "compute_seconds": 0.0}
    with pytest.raises(ValueError, match="batch_id 'nope' does not exist in the store"):
        batch_usage(store, "nope")


def test_reported_tokens_win_and_a_rerun_task_counts_once(store):
    _seed(store, "gemini-embedding-001", "vertex")
    record_partition_usage(store, "B", "ingest_results/0", reported_tokens=1_000_000, seconds=1.5)
    record_partition_usage(store, "B", "ingest_results/1", reported_tokens=500_000, seconds=0.5)
    record_partition_usage(store, "B", "ingest_results/0", reported_tokens=1_200_000, seconds=2.0)  # task rerun
    usage = batch_usage(store, "B")
    assert (usage["tokens"], usage["token_source"], usage["reported_tokens"], usage["tokenizer_tokens"],
            usage["compute_seconds"]) == (1_700_000, "service", 1_700_000, 7, 2.5)
    out = batch_cost(store, "B", prices=PRICES)
    assert (out["cost"]["usd"], out["cost"]["online_usd"], out["cost"]["saving_usd"]) == (0.1275, 0.255, 0.1275)
    tokens, cost_usd, details = store.one(
        f"SELECT tokens, cost_usd, details FROM {store.schema}.batches WHERE batch_id = 'B'")
    assert (tokens, cost_usd) == (1_700_000, Decimal("0.127500"))
    assert details["cost"]["token_source"] == "service" and details["usage"]["texts"] == 2
    assert set(details["usage_parts"]) == {"ingest_results/0", "ingest_results/1"}


def test_unpriced_batch_keeps_a_null_cost(store):
    _seed(store, "text-embedding-005", "vertex")
    out = batch_cost(store, "B", prices=PRICES)
    assert (out["characters"], out["cost"]["priced"], out["cost"]["quantity"]) == (18, False, 18)
    assert store.one(f"SELECT tokens, cost_usd FROM {store.schema}.batches WHERE batch_id = 'B'") == (7, None)


def test_local_batch_costs_zero_with_its_seconds(store):
    _seed(store, "sentence-transformers/all-MiniLM-L6-v2", "local")
    record_partition_usage(store, "B", "encode_partition/0", seconds=3.25)
    out = batch_cost(store, "B", prices=PRICES)
    assert (out["cost"]["usd"], out["cost"]["unit"], out["cost"]["quantity"], out["cost"]["batch"]) == (
        0.0, "compute_seconds", 3.25, False)
    assert store.one(f"SELECT cost_usd FROM {store.schema}.batches WHERE batch_id = 'B'") == (Decimal("0"),)
