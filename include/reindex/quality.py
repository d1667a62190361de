"""Retrieval agreement: does another model, runtime or store retrieve what the reference retrieves?

Two uses, one measure:

* **in memory** (``vector_agreement``): the vectors of the same texts by a reference (fp32 torch) and a
  candidate (another runtime or precision). Every text is a query over all the others (itself excluded) or
  separate query vectors are given; the figures are the overlap of the two top-k neighbour sets, and the
  min / mean cosine between the two vectors of each text (only when both have the same dimension).
* **in the store** (``evaluate_switch``): before an upgrade switches a corpus to its new store, known-item
  queries (a span of a sampled chunk's text: does the query find its own document?) or user queries are run
  against the old and the new store. Figures: the own-document hit rate in the top k of each store (what the
  users get: the served index search), the top-k agreement of the two stores' exact searches (the vectors'
  own agreement, no index noise), the new index's recall@k against exact search over the same vectors, and
  the cosine of each query's two vectors when both models make vectors of one dimension.

``GateSettings`` turns the figures into a verdict (``gate_verdict``): the new store may find the own document
at most ``max_drop`` less often than the old one, and when the upgrade keeps the model's weights (only the
runtime, precision or storage change) the two stores' top-k must agree at least ``min_agreement``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from psycopg import sql

from reindex.errors import ConfigError

log = logging.getLogger(__name__)

K = 10


def overlap_at_k(reference: Sequence[Sequence], candidate: Sequence[Sequence], k: int = K) -> float:
    """Mean share of each reference top-k list found in the candidate's top-k list (1.0: the same sets).

    A query with fewer than k reference results counts against that smaller number; with none it is left out.
    """
    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference result lists against {len(candidate)} candidate lists")
    shares = []
    for ref, cand in zip(reference, candidate, strict=True):
        want = list(ref)[:k]
        if want:
            shares.append(len(set(want) & set(list(cand)[:k])) / len(want))
    return float(np.mean(shares)) if shares else 0.0


def exact_top_k(queries: np.ndarray, base: np.ndarray, k: int = K, *, exclude_self: bool = False) -> np.ndarray:
    """Indices of the ``k`` rows of ``base`` most cosine-similar to each query, best first (exact search).
    With ``exclude_self`` query ``i`` is row ``i`` of ``base`` and never its own neighbour."""
    q = _unit(queries)
    b = _unit(base)
    sims = q @ b.T
    if exclude_self:
        np.fill_diagonal(sims, -np.inf)
    k = min(k, b.shape[0] - (1 if exclude_self else 0))
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(sims, top, axis=1).argsort(axis=1, kind="stable")[:, ::-1]
    return np.take_along_axis(top, order, axis=1)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class Agreement:
    """How a candidate's vectors agree with a reference's on the same texts."""

    texts: int
    k: int
    top_k_agreement: float  # mean share of the reference's top-k neighbours the candidate also finds
    min_cosine: float | None  # worst cosine between a text's two vectors (None: different dimensions)
    mean_cosine: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def vector_agreement(reference: np.ndarray, candidate: np.ndarray, *, k: int = K,
                     reference_queries: np.ndarray | None = None,
                     candidate_queries: np.ndarray | None = None) -> Agreement:
    """Top-k neighbour agreement and per-text cosine of two encodings of the same texts (rows aligned).

    Without query vectors every text is a query over the others (itself excluded); with them (the same
    queries encoded by each side) the queries search the texts.
    """
    reference, candidate = np.asarray(reference), np.asarray(candidate)
    if reference.shape[0] != candidate.shape[0]:
        raise ValueError(f"{reference.shape[0]} reference vectors against {candidate.shape[0]} candidate vectors")
    if (reference_queries is None) != (candidate_queries is None):
        raise ValueError("give the queries encoded by both sides, or neither")
    if reference_queries is None:
        ref_top = exact_top_k(reference, reference, k, exclude_self=True)
        cand_top = exact_top_k(candidate, candidate, k, exclude_self=True)
    else:
        ref_top = exact_top_k(reference_queries, reference, k)
        cand_top = exact_top_k(candidate_queries, candidate, k)
    cos_min = cos_mean = None
    if reference.shape[1] == candidate.shape[1]:
        cos = np.sum(_unit(reference) * _unit(candidate), axis=1)
        cos_min, cos_mean = float(cos.min()), float(cos.mean())
    return Agreement(texts=int(reference.shape[0]), k=k, top_k_agreement=overlap_at_k(ref_top, cand_top, k),
                     min_cosine=cos_min, mean_cosine=cos_mean)


# --- the gate before a model switch --------------------------------------------------------------------

class GateAction:
    FAIL = "fail"  # the upgrade fails, the old model keeps serving
    SWITCH = "switch"  # switch anyway (the figures stay recorded on the batch)
    WAIT = "wait"  # a human approves or rejects the switch (Airflow human-in-the-loop)

    ALL = (FAIL, SWITCH, WAIT)


@dataclass(frozen=True)
class GateSettings:
    """The quality gate's Params: what is measured and what passes."""

    below: str = GateAction.FAIL
    max_drop: float = 0.02
    min_agreement: float = 0.97
    sample: int = 100
    queries: tuple = ()  # user queries: texts, or (text, expected doc_id) pairs
    k: int = K

    def __post_init__(self) -> None:
        if self.below not in GateAction.ALL:
            raise ConfigError(f"quality_below {self.below!r} is not supported: choose one of {list(GateAction.ALL)}")
        for name in ("max_drop", "min_agreement"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
                raise ConfigError(f"quality_{name}={value!r} is out of range: must be a number between 0 and 1")
        if isinstance(self.sample, bool) or not isinstance(self.sample, int) or not 1 <= self.sample <= 10_000:
            raise ConfigError(f"quality_sample={self.sample!r} is out of range: must be an integer between 1 and "
                              "10000")

    @classmethod
    def from_params(cls, params: dict) -> GateSettings:
        """From the upgrade's Params (``quality_*``; ``None``: the default)."""
        p = {k: v for k, v in (params or {}).items() if v is not None}
        return cls(below=p.get("quality_below", GateAction.FAIL), max_drop=p.get("quality_max_drop", 0.02),
                   min_agreement=p.get("quality_min_agreement", 0.97), sample=p.get("quality_sample", 100),
                   queries=tuple(load_queries(p.get("quality_queries"))))


def load_queries(value) -> list[tuple[str, str | None]]:
    """User queries as ``(text, expected doc_id or None)``: from a list (strings, or ``{"query", "doc_id"}``
    objects), or from a file path — ``.jsonl`` lines of such objects, else one query per non-empty line."""
    if value is None or value == "" or value == []:
        return []
    items: list = []
    if isinstance(value, str):
        path = Path(value).expanduser()
        if not path.is_file():
            raise ConfigError(f"quality_queries {value!r} is not a file: give a file of queries (one per line, or "
                              "JSONL {\"query\": ..., \"doc_id\": ...}) or a list of query texts")
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        items.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ConfigError(f"quality_queries {value}: line {n} is not JSON ({e.msg})") from None
        else:
            items = [line.strip() for line in text.splitlines() if line.strip()]
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise ConfigError(f"quality_queries must be a file path or a list of queries, got {type(value).__name__}")
    out = []
    for item in items:
        if isinstance(item, str) and item.strip():
            out.append((item.strip(), None))
        elif isinstance(item, dict) and isinstance(item.get("query"), str) and item["query"].strip():
            out.append((item["query"].strip(), item.get("doc_id")))
        elif isinstance(item, list | tuple) and len(item) == 2 and isinstance(item[0], str):
            out.append((item[0], item[1]))
        else:
            raise ConfigError(f"quality_queries: {item!r} is not a query (a text, or {{\"query\", \"doc_id\"}})")
    if len(out) > 10_000:
        raise ConfigError(f"quality_queries has {len(out)} queries: at most 10000")
    return out


def known_item_query(text: str, words: int = 24) -> str:
    """A query made from a chunk: a span of up to ``words`` words from its middle (not its opening, which
    often repeats a title shared by the document's other chunks)."""
    parts = text.split()
    if len(parts) <= words:
        return " ".join(parts)
    start = max(0, (len(parts) - words) // 2)
    return " ".join(parts[start:start + words])


def sample_queries(store, corpus: str, n: int, *, model_checksums: Sequence[str], seed: str = "quality"
                   ) -> list[tuple[str, str]]:
    """``n`` known-item queries ``(query text, its doc_id)`` from chunks with a vector in every one of
    ``model_checksums``' stores: a deterministic sample (by the hash of chunk id and ``seed``)."""
    from reindex.store.vectors import get_embedding_store

    joins = sql.SQL(" ").join(
        sql.SQL("JOIN {} {} ON {}.chunk_pk = c.id").format(
            store.t(get_embedding_store(store, corpus, cs).table_name), sql.Identifier(f"e{i}"),
            sql.Identifier(f"e{i}"))
        for i, cs in enumerate(model_checksums))
    rows = store.execute(sql.SQL("""SELECT c.doc_id, c.text FROM {chunks} c {joins}
        WHERE c.corpus = %s ORDER BY md5(c.chunk_id || %s) LIMIT %s""").format(
        chunks=store.t("chunks"), joins=joins), (corpus, seed, n)).fetchall()
    return [(known_item_query(text), doc_id) for doc_id, text in rows]


def store_search(store, corpus: str, model_checksum: str, vector: np.ndarray, k: int = K, *,
                 exact: bool = False, ef_search: int = 100) -> list[tuple[str, str]]:
    """``(chunk_id, doc_id)`` of the top-k chunks of one store: through its index as searches are served,
    or with ``exact`` by a sequential scan (index scans off), the exact top-k of the stored vectors."""
    from pgvector.psycopg import register_vector

    from reindex.store.vectors import get_embedding_store

    emb = get_embedding_store(store, corpus, model_checksum)
    vec = np.asarray(vector, dtype=np.float32).reshape(-1)
    register_vector(store.conn)
    with store.conn.transaction():
        store.execute(sql.SQL("SET LOCAL hnsw.ef_search = {}").format(sql.Literal(max(ef_search, k))))
        if exact:
            store.execute("SET LOCAL enable_indexscan = off")
            store.execute("SET LOCAL enable_bitmapscan = off")
        rows = store.execute(sql.SQL("""SELECT c.chunk_id, c.doc_id
            FROM {emb} e JOIN {chunks} c ON c.id = e.chunk_pk AND c.content_sha256 = e.content_sha256
            ORDER BY e.embedding <=> %s::{type}, c.id LIMIT %s""").format(
            emb=store.t(emb.table_name), chunks=store.t("chunks"), type=sql.Identifier(emb.storage)),
            (vec, k)).fetchall()
    return [(r[0], r[1]) for r in rows]


@dataclass
class SwitchFigures:
    """What the gate measured of an upgrade's new store against the old one (JSON-able: ``to_dict``)."""

    queries: int = 0
    source: str = ""  # "sampled chunks" or "user queries"
    k: int = K
    same_weights: bool = False
    hit_rate_old: float | None = None  # own document in the top k (served search), old store
    hit_rate_new: float | None = None
    agreement: float | None = None  # top-k overlap of the two stores' exact searches
    index_recall: float | None = None  # new store: index top-k against exact top-k
    min_cosine: float | None = None  # per query, its two vectors (same dimension only)
    mean_cosine: float | None = None
    not_measured: str = ""  # why nothing could be measured (then the gate passes, saying so)
    seconds: float = 0.0
    passed: bool = True
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        """One line for the batch message, the run note and the approval text."""
        if self.not_measured:
            return f"quality gate: not measured ({self.not_measured})"
        parts = [f"{self.queries} {self.source}"]
        if self.hit_rate_old is not None or self.hit_rate_new is not None:
            parts.append(f"own document in top {self.k} {_pct(self.hit_rate_old)} → {_pct(self.hit_rate_new)} "
                         "(old → new)")
        if self.agreement is not None:
            parts.append(f"top-{self.k} agreement {_pct(self.agreement)}")
        if self.index_recall is not None:
            parts.append(f"index recall@{self.k} {_pct(self.index_recall)}")
        if self.min_cosine is not None:
            parts.append(f"cosine min {self.min_cosine:.4f} mean {self.mean_cosine:.4f}")
        verdict = "passed" if self.passed else "BELOW THRESHOLD: " + "; ".join(self.reasons)
        return "quality gate: " + ", ".join(parts) + f" — {verdict}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


Encode = Callable[[list[str]], np.ndarray]


def evaluate_switch(store, corpus: str, old_checksum: str, new_checksum: str, encode_old: Encode | None,
                    encode_new: Encode | None, settings: GateSettings, *, same_weights: bool,
                    not_measured: str = "") -> SwitchFigures:
    """Measure the new store against the old one on known-item or user queries, then judge (``gate_verdict``).

    ``encode_old`` / ``encode_new`` encode query texts with each store's model; when either is None (e.g. a
    Vertex AI batch model cannot encode a query here) nothing is measured and ``not_measured`` says why.
    """
    import time

    started = time.monotonic()
    figures = SwitchFigures(k=settings.k, same_weights=same_weights)
    if encode_old is None or encode_new is None:
        figures.not_measured = not_measured or "a model cannot encode queries here"
        return figures
    if settings.queries:
        queries = list(settings.queries)
        figures.source = "user queries"
    else:
        queries = sample_queries(store, corpus, settings.sample, model_checksums=[old_checksum, new_checksum],
                                 seed=hashlib.sha256(corpus.encode()).hexdigest()[:8])
        figures.source = "sampled chunks"
    figures.queries = len(queries)
    if not queries:
        figures.not_measured = "no chunk has a vector in both stores"
        return figures
    texts = [q for q, _ in queries]
    old_vecs, new_vecs = np.asarray(encode_old(texts)), np.asarray(encode_new(texts))
    k = settings.k
    served_old = [store_search(store, corpus, old_checksum, v, k) for v in old_vecs]
    served_new = [store_search(store, corpus, new_checksum, v, k) for v in new_vecs]
    exact_old = [store_search(store, corpus, old_checksum, v, k, exact=True) for v in old_vecs]
    exact_new = [store_search(store, corpus, new_checksum, v, k, exact=True) for v in new_vecs]
    known = [(i, doc) for i, (_, doc) in enumerate(queries) if doc is not None]
    if known:
        figures.hit_rate_old = _hit_rate(served_old, known)
        figures.hit_rate_new = _hit_rate(served_new, known)
    ids = lambda results: [[chunk for chunk, _ in r] for r in results]  # noqa: E731
    figures.agreement = overlap_at_k(ids(exact_old), ids(exact_new), k)
    figures.index_recall = overlap_at_k(ids(exact_new), ids(served_new), k)
    if old_vecs.shape[1] == new_vecs.shape[1]:
        cos = np.sum(_unit(old_vecs) * _unit(new_vecs), axis=1)
        figures.min_cosine, figures.mean_cosine = float(cos.min()), float(cos.mean())
    figures.seconds = round(time.monotonic() - started, 3)
    figures.passed, figures.reasons = gate_verdict(figures, settings)
    return figures


def _hit_rate(results: list[list[tuple[str, str]]], known: list[tuple[int, str]]) -> float:
    return sum(1 for i, doc in known if any(d == doc for _, d in results[i])) / len(known)


def gate_verdict(figures: SwitchFigures, settings: GateSettings) -> tuple[bool, list[str]]:
    """``(passed, reasons)``: the new store may find the own document at most ``max_drop`` less often than the
    old one; an upgrade that keeps the model's weights must also keep ``min_agreement`` of the top k."""
    reasons = []
    if figures.hit_rate_old is not None and figures.hit_rate_new is not None:
        drop = figures.hit_rate_old - figures.hit_rate_new
        if drop > settings.max_drop + 1e-9:
            reasons.append(f"own-document hit rate fell {drop:.1%} ({_pct(figures.hit_rate_old)} → "
                           f"{_pct(figures.hit_rate_new)}), more than quality_max_drop={settings.max_drop:.1%}")
    if figures.same_weights and figures.agreement is not None and figures.agreement < settings.min_agreement:
        reasons.append(f"top-{figures.k} agreement {_pct(figures.agreement)} with the old store is below "
                       f"quality_min_agreement={settings.min_agreement:.1%} (same model weights: only the runtime, "
                       "precision or storage changed)")
    return not reasons, reasons


# What the views of a batch (``python -m reindex status``, the Reindex tab's batch card and its JSON) show of the
# gate, every key always present (None where not recorded) so a template can read any of them.
RECORDED_GATE_KEYS = ("line", "passed", "queries", "source", "k", "same_weights", "hit_rate_old", "hit_rate_new",
                      "agreement", "index_recall", "min_cosine", "mean_cosine", "not_measured", "reasons", "below",
                      "thresholds", "decision")


def recorded_gate(details: dict | None) -> dict | None:
    """The quality gate's figures as recorded on an upgrade batch (``details.quality``, written by the
    ``quality_gate`` task), or None when the batch went through no gate (not an upgrade, or not measured yet).

    Keys: ``RECORDED_GATE_KEYS``; ``reasons`` is a list (empty when passed), ``decision`` a dict
    (``choice``, ``by``) or None; a figure that was not measured is None.
    """
    q = (details or {}).get("quality")
    if not isinstance(q, dict) or not q:
        return None
    out = {key: q.get(key) for key in RECORDED_GATE_KEYS}
    out["reasons"] = [str(r) for r in q.get("reasons") or []]
    out["decision"] = q["decision"] if isinstance(q.get("decision"), dict) else None
    if not out["line"]:  # recorded by hand or by an older gate: the line is made from the figures
        out["line"] = SwitchFigures(**{f: q[f] for f in SwitchFigures.__dataclass_fields__ if f in q}).line()
    return out


def registered_model(store, model_checksum: str) -> dict | None:
    """The model registry's row of ``model_checksum`` (``model_id``, ``revision``, ``dim``, ``normalized``,
    ``backend``, ``details``), None when unknown."""
    cur = store.execute(sql.SQL("""SELECT model_checksum, model_id, revision, dim, normalized, backend, details
        FROM {} WHERE model_checksum = %s""").format(store.t("models")), (model_checksum,))
    row = cur.fetchone()
    return None if row is None else dict(zip([c.name for c in cur.description], row, strict=True))


def same_weights(store, old_checksum: str, new_checksum: str) -> bool:
    """Whether two registered models are the same weights (id, revision, dimension, normalisation): an upgrade
    between them changes only the runtime, precision or storage, so their vectors should agree closely."""
    old, new = registered_model(store, old_checksum), registered_model(store, new_checksum)
    keys = ("model_id", "revision", "dim", "normalized", "backend")
    return bool(old and new) and all(old[k] == new[k] for k in keys)


def query_encoder(corpus: str, model_checksum: str, config: dict) -> tuple[Encode | None, str]:
    """``(encode, "")`` for queries of the store of ``model_checksum``, made from its run configuration
    (``config``: a ``ReindexConfig`` mapping, or the registry's model config) — or ``(None, why)`` when this
    process cannot encode its queries (a Vertex AI batch model) or the configuration now gives another model.

    A local model registered without its ``encoder`` (older registry entries) is tried with each encoder in turn
    (torch first) until one gives the store's checksum.
    """
    from reindex.config import Backend, Encoder

    known = {"model", "backend", "output_dimensionality", "normalize", "storage", "service_conn_id", "encoder",
             "encode_batch_size"}
    values = {k: v for k, v in (config or {}).items() if k in known and v is not None}
    tries = [values.get("encoder") or Encoder.TORCH.value]
    if "encoder" not in values and values.get("backend", Backend.LOCAL.value) == Backend.LOCAL.value:
        tries += [e.value for e in Encoder if e.value not in tries]
    why = ""
    for encoder_name in tries:
        encode, why = _query_encoder(corpus, model_checksum, {**values, "encoder": encoder_name})
        if encode is not None:
            return encode, ""
    return None, why


def _query_encoder(corpus: str, model_checksum: str, values: dict) -> tuple[Encode | None, str]:
    from reindex.backends import backend_for
    from reindex.config import ReindexConfig

    try:
        cfg = ReindexConfig(corpus=corpus, corpus_uri="store", **values)
        backend = backend_for(cfg)
        encoder = getattr(backend, "encoder", None)
        if encoder is None:
            return None, f"backend {cfg.backend.value} ({cfg.model}) cannot encode queries in this process"
        checksum = encoder.spec.stored_as(cfg.storage).checksum
    except ConfigError as e:
        return None, f"model {values.get('model')!r} is not available here: {e}"
    if checksum != model_checksum:
        return None, (f"model {cfg.model!r} ({cfg.backend.value}, encoder {cfg.encoder.value}) now gives checksum "
                      f"{checksum}, not the store's {model_checksum}")
    return encoder.encode, ""
