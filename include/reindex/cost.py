"""What a batch used (tokens, characters, compute seconds) and what it cost, batch vs online.

Three pieces, all Airflow-free:

* ``PRICES`` — the built-in price table (USD), every entry with its date and source. Only prices
  that were published and checked are filled in; the rest say ``configure your price``. Override
  or extend it with a YAML file named by ``$REINDEX_PRICES_FILE`` (shape: ``load_prices``).
* ``estimate(backend, model, tokens=, characters=, batch=)`` — a pure function: the estimated price
  of the work as it ran and of the same work sent online, the saving, the unit and the source.
* ``batch_usage(store, batch_id)`` / ``record_partition_usage`` / ``batch_cost`` — usage of one batch
  from the store, and the estimate written back to ``reindex.batches`` (``tokens``, ``cost_usd``,
  ``details->'cost'``).

What is counted. Usage is the batch's *embedded* chunks (``embedding_status = 'READY'`` with this
batch id): failed lines are not billed, reused vectors cost nothing. A text shared by several chunks
is sent once (batch requests are keyed by content hash), so texts are counted once per distinct
``content_sha256``. Tokens are the service's own ``statistics.token_count`` when the result lines
reported it (classic Vertex models do; ``ingest_results`` returns the sum per range, recorded with
``record_partition_usage``), else the project's tokenizer count (``chunks.token_count``; for Vertex
that is the bundled MiniLM tokenizer, a proxy for Google's — the estimate says which). Characters
are ``char_length(text)`` (Unicode code points), the unit Vertex bills the classic models by.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psycopg import sql
from psycopg.types.json import Jsonb

from reindex.errors import ConfigError
from reindex.store import Store

PRICES_ENV = "REINDEX_PRICES_FILE"

UNIT_TOKENS = "1M_tokens"  # price per 1,000,000 input tokens
UNIT_CHARACTERS = "1k_characters"  # price per 1,000 input characters
UNIT_COMPUTE = "compute_seconds"  # no API money: the work is reported in seconds of encoding
UNITS = {UNIT_TOKENS: 1_000_000, UNIT_CHARACTERS: 1_000, UNIT_COMPUTE: 1}

CONFIGURE = "configure your price"


@dataclass(frozen=True)
class Price:
    """One row of the price table. ``online``/``batch`` are USD per ``unit``; None = not known."""

    unit: str
    online: float | None
    batch: float | None
    date: str | None
    source: str


_GEMINI_SOURCE = ("Google Developers Blog, 2025-09-10, 'Gemini Batch API now supports Embeddings': "
                  "gemini-embedding-001 $0.15 per 1M input tokens online, Batch API at 50 % of that "
                  "($0.075 per 1M). Gemini API list prices; check your Vertex AI contract")
_CLASSIC_SOURCE = (f"{CONFIGURE}: classic Vertex embedding models are billed per 1,000 input characters; "
                   f"no checked price is bundled. Set ${PRICES_ENV}")

# The built-in table, keyed "<backend>/<model id>" (the model id without "publishers/google/models/"
# and without "@revision"). "local/*" covers every local model, "service/*" every embedding service's.
PRICES: dict[str, Price] = {
    "vertex/gemini-embedding-001": Price(UNIT_TOKENS, 0.15, 0.075, "2025-09-10", _GEMINI_SOURCE),
    "vertex/text-embedding-005": Price(UNIT_CHARACTERS, None, None, None, _CLASSIC_SOURCE),
    "vertex/text-multilingual-embedding-002": Price(UNIT_CHARACTERS, None, None, None, _CLASSIC_SOURCE),
    "local/*": Price(UNIT_COMPUTE, 0.0, 0.0, None,
                     "local encoding: no API charge; the machine's compute is reported in seconds"),
    "service/*": Price(UNIT_COMPUTE, 0.0, 0.0, None,
                       "your own embedding service: no API charge; the time spent encoding is reported in seconds"),
}


def price_key(backend: str, model: str) -> str:
    """``<backend>/<model id>``: ``publishers/google/models/`` prefixes and ``@revision`` stripped."""
    name = model.rsplit("/models/", 1)[-1].split("@", 1)[0].strip()
    return f"{backend}/{name}"


def _number(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{where} must be a non-negative number or null, not {value!r}")
    return float(value)


def _price(entry: Any, where: str) -> Price:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where} must be a mapping with unit, online, batch, date, source; got {entry!r}")
    unknown = set(entry) - {"unit", "online", "batch", "date", "source"}
    if unknown:
        raise ConfigError(f"{where} has unknown field(s) {sorted(unknown)}: allowed unit, online, batch, date, source")
    unit = entry.get("unit")
    if unit not in UNITS:
        raise ConfigError(f"{where}.unit must be one of {sorted(UNITS)}, not {unit!r}")
    date = entry.get("date")
    if date is not None and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", str(date)):
        raise ConfigError(f"{where}.date must be YYYY-MM-DD (the day the price was read), not {date!r}")
    source = entry.get("source")
    if not isinstance(source, str) or not source.strip():
        raise ConfigError(f"{where}.source must say where the price comes from (a non-empty string)")
    return Price(unit, _number(entry.get("online"), f"{where}.online"), _number(entry.get("batch"), f"{where}.batch"),
                 str(date) if date is not None else None, source.strip())


def load_prices(path: str | Path | None = None) -> dict[str, Price]:
    """The built-in table with the entries of ``path`` (default ``$REINDEX_PRICES_FILE``) over it.

    YAML shape (every field of an entry is required except ``date``, which a real price should have)::

        prices:
          vertex/text-embedding-005:
            unit: 1k_characters      # 1M_tokens | 1k_characters | compute_seconds
            online: 0.00002          # USD per unit, or null (unknown)
            batch: 0.00001
            date: "2026-01-15"       # when the price was read
            source: "our Google Cloud contract, 2026"

    An entry replaces the built-in one of the same key; new keys add models. Raises ``ConfigError``
    naming the file and the entry when the file is missing or malformed.
    """
    import yaml

    table = dict(PRICES)
    if path is None:
        from reindex.settings import prices_file

        path = prices_file()
    if path is None:
        return table
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"price table {path} (${PRICES_ENV}) cannot be read: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"price table {path} (${PRICES_ENV}) is not valid YAML: {e}") from None
    if not isinstance(data, Mapping) or not isinstance(data.get("prices"), Mapping):
        raise ConfigError(f"price table {path} must be a mapping with a 'prices' mapping of "
                          f"'<backend>/<model>' → entry")
    for key, entry in data["prices"].items():
        if not isinstance(key, str) or "/" not in key:
            raise ConfigError(f"price table {path}: key {key!r} must be '<backend>/<model>' (e.g. vertex/gemini-embedding-001)")
        table[key] = _price(entry, f"price table {path}: {key}")
    return table


def _usd(rate: float | None, quantity: float, unit: str) -> float | None:
    return None if rate is None else round(rate * quantity / UNITS[unit], 6)


def estimate(backend: str, model: str, *, tokens: int, characters: int, batch: bool = True,
             compute_seconds: float | None = None, prices: Mapping[str, Price] | None = None) -> dict:
    """Estimated price of embedding ``tokens``/``characters`` with ``model``, as it ran and online.

    ``batch``: the work ran as a batch job (priced at the batch rate; ``saving_usd`` = online − batch),
    else online (``saving_usd`` = 0). ``prices``: a table (default ``load_prices()``).

    Returns ``{"backend", "model", "unit", "quantity", "usd", "batch_usd", "online_usd",
    "saving_usd", "priced", "price_source", "price_date", "note"}``. ``quantity`` is what the unit
    counts (tokens, characters or compute seconds). A model without a known price has ``priced``
    False, the USD fields None, and ``note`` says what to configure. Local encoding costs 0 USD and
    reports ``compute_seconds`` as its quantity.
    """
    if tokens < 0 or characters < 0:
        raise ValueError(f"tokens ({tokens}) and characters ({characters}) must be >= 0")
    table = load_prices() if prices is None else prices
    key = price_key(backend, model)
    price = table.get(key) or table.get(f"{backend}/*")
    out: dict[str, Any] = {"backend": backend, "model": key.split("/", 1)[1], "batch": batch}
    if price is None:
        return {**out, "unit": None, "quantity": None, "usd": None, "batch_usd": None, "online_usd": None,
                "saving_usd": None, "priced": False, "price_source": CONFIGURE, "price_date": None,
                "note": f"no price for {key}: add it to a YAML table named by ${PRICES_ENV}"}
    quantity: float = {UNIT_TOKENS: tokens, UNIT_CHARACTERS: characters}.get(
        price.unit, round(compute_seconds or 0.0, 3))
    batch_usd, online_usd = _usd(price.batch, quantity, price.unit), _usd(price.online, quantity, price.unit)
    usd = batch_usd if batch else online_usd
    saving = None if usd is None or online_usd is None else round(online_usd - usd, 6)
    priced = usd is not None
    note = "" if priced else (f"no {'batch' if batch else 'online'} price for {key} "
                              f"(billed per {price.unit.replace('_', ' ')}): {CONFIGURE} in ${PRICES_ENV}")
    return {**out, "unit": price.unit, "quantity": quantity, "usd": usd, "batch_usd": batch_usd,
            "online_usd": online_usd, "saving_usd": saving, "priced": priced, "price_source": price.source,
            "price_date": price.date, "note": note}


# --- the store side -------------------------------------------------------------------------------

def record_partition_usage(store: Store, batch_id: str, part: str, *, reported_tokens: int = 0,
                           seconds: float = 0.0, service: dict | None = None) -> None:
    """Keep one mapped task's usage on the batch row (``details->'usage_parts'->part``).

    ``part``: the task's stable name (e.g. ``"ingest_results/3"``); a rerun of the same task
    overwrites its own entry, so the sums in ``batch_usage`` never count a task twice.
    ``reported_tokens``: the service's token counts of the lines this task read (``ingest_ranges``'s
    ``"tokens"``); ``seconds``: the task's encode or ingest seconds; ``service``: the embedding service's
    counters for this task (``texts``, ``cached``, ``requests``, ``retries``, ``bisections``).
    """
    entry: dict = {"reported_tokens": int(reported_tokens), "seconds": float(seconds)}
    if service:
        entry["service"] = {k: int(v) for k, v in service.items()}
    store.execute(sql.SQL("""UPDATE {} SET details = jsonb_set(
            CASE WHEN jsonb_typeof(details->'usage_parts') = 'object' THEN details
                 ELSE details || '{{"usage_parts": {{}}}}'::jsonb END,
            ARRAY['usage_parts', %s], %s) WHERE batch_id = %s""").format(store.t("batches")),
        (part, Jsonb(entry), batch_id))


def batch_usage(store: Store, batch_id: str) -> dict:
    """What ``batch_id`` embedded, from the store.

    Returns ``{"batch_id", "backend", "model", "chunks", "texts", "tokens", "token_source",
    "tokenizer_tokens", "reported_tokens", "characters", "compute_seconds"}``: ``chunks`` READY with
    this batch id, ``texts`` distinct contents among them (what was sent), ``tokenizer_tokens`` and
    ``characters`` summed over those texts, ``reported_tokens`` / ``compute_seconds`` summed over
    ``record_partition_usage`` entries, and ``service`` (only for the service backend) their summed
    service counters. ``tokens`` is ``reported_tokens`` when the service reported
    any (``token_source = "service"``), else ``tokenizer_tokens`` (``"tokenizer"``). Raises
    ``ValueError`` for an unknown batch id.
    """
    t = store.t
    row = store.one(sql.SQL("""SELECT b.backend, coalesce(m.model_id, ''), b.details->'usage_parts'
        FROM {batches} b LEFT JOIN {models} m ON m.model_checksum = b.model_checksum
        WHERE b.batch_id = %s""").format(batches=t("batches"), models=t("models")), (batch_id,))
    if row is None:
        raise ValueError(f"batch_id {batch_id!r} does not exist in the store")
    backend, model, parts = row
    chunks, texts, tok, chars = store.one(sql.SQL("""SELECT coalesce(sum(n), 0)::bigint, count(*),
            coalesce(sum(token_count), 0)::bigint, coalesce(sum(char_length(text)), 0)::bigint
        FROM (SELECT DISTINCT ON (content_sha256) content_sha256, token_count, text,
                     count(*) OVER (PARTITION BY content_sha256) AS n
              FROM {chunks} WHERE batch_id = %s AND embedding_status = 'READY'
              ORDER BY content_sha256, id) d""").format(chunks=t("chunks")), (batch_id,))
    entries = parts.values() if isinstance(parts, dict) else []
    reported = sum(int(e.get("reported_tokens") or 0) for e in entries)
    seconds = round(sum(float(e.get("seconds") or 0.0) for e in entries), 3)
    service: dict[str, int] = {}
    for e in entries:
        for k, v in (e.get("service") or {}).items():
            service[k] = service.get(k, 0) + int(v)
    usage = {"batch_id": batch_id, "backend": backend, "model": model, "chunks": int(chunks), "texts": int(texts),
            "tokens": reported if reported else int(tok), "token_source": "service" if reported else "tokenizer",
            "tokenizer_tokens": int(tok), "reported_tokens": reported, "characters": int(chars),
            "compute_seconds": seconds}
    if service:  # an embedding service's counters (its cache hits among them)
        usage["service"] = service
    return usage


def batch_cost(store: Store, batch_id: str, *, prices: Mapping[str, Price] | None = None) -> dict:
    """Usage and estimate of ``batch_id``, written to its row: ``tokens``, ``cost_usd`` (NULL when not
    priced) and ``details->'cost'`` (the whole estimate). A Vertex batch is priced at the batch rate;
    a local one at 0 USD with its compute seconds. Returns ``{**batch_usage(...), "cost": estimate}``.
    Idempotent: a rerun recomputes and overwrites.
    """
    usage = batch_usage(store, batch_id)
    est = estimate(usage["backend"], usage["model"], tokens=usage["tokens"], characters=usage["characters"],
                   batch=usage["backend"] == "vertex", compute_seconds=usage["compute_seconds"], prices=prices)
    est["token_source"] = usage["token_source"]
    store.execute(sql.SQL("""UPDATE {} SET tokens = %s, cost_usd = %s, details = details || %s
        WHERE batch_id = %s""").format(store.t("batches")),
        (usage["tokens"], est["usd"], Jsonb({"cost": est, "usage": {k: usage[k] for k in (
            "chunks", "texts", "tokens", "token_source", "characters", "compute_seconds")}}), batch_id))
    return {**usage, "cost": est}
