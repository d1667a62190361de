"""The Params of the reindex DAGs, defined once: the Trigger form, its bounds and its descriptions.

Every single-field bound of ``reindex.config.ReindexConfig`` is mirrored here so the form refuses a
bad value before a run exists; rules that involve several fields (``overlap_tokens`` ≤ half of
``max_tokens``, the model's own limits, the corpus being readable) are checked by the run's first task,
which fails alone with the message. Optional values are ``["null", …]`` so the form can be submitted
with its defaults.
"""

from __future__ import annotations

from pathlib import Path

from airflow.sdk import Param

from reindex.config import (
    BUSY_WAIT_RANGE,
    CORPUS_NAME_PATTERN,
    DEFAULT_MAX_FAILED_RATIO,
    DEFAULT_MODEL,
    ENCODE_BATCH_RANGE,
    IVFFLAT_LISTS_RANGE,
    MAX_TOKENS_RANGE,
    PARTITION_SIZE_RANGE,
    Backend,
    Encoder,
    IndexType,
    OnBusy,
    Storage,
)

SAMPLE_CORPUS = str(Path(__file__).resolve().parents[2] / "include" / "sample_corpus")


def _backend() -> Param:
    return Param(Backend.LOCAL.value, type="string", enum=[b.value for b in Backend], title="Backend",
                 description="Where embeddings are computed: local sentence-transformers, Vertex AI batch jobs, "
                             "or service: a remote embedding service over HTTP (its Airflow connection: "
                             "service_conn_id).")


def _embedding_params() -> dict[str, Param]:
    """How a batch is embedded and stored: shared by reindex_corpus and reindex_model_upgrade."""
    return {
        "partition_size": Param(2000, type="integer", minimum=PARTITION_SIZE_RANGE[0],
                                maximum=PARTITION_SIZE_RANGE[1], title="Partition size",
                                description="Chunks per mapped encode task (grown to keep ≤ 256 tasks)."),
        "encode_batch_size": Param(64, type="integer", minimum=ENCODE_BATCH_RANGE[0], maximum=ENCODE_BATCH_RANGE[1],
                                   title="Encode batch size",
                                   description="Texts per forward pass of the local encoder."),
        "encoder": Param(Encoder.TORCH.value, type="string", enum=[e.value for e in Encoder], title="Encoder",
                         description="backend=local: what runs the model — torch, or the model exported once (cached) "
                                     "to ONNX Runtime / OpenVINO fp32 (torch's vectors within 1e-5 cosine), or "
                                     "OpenVINO bf16 (faster on bf16 CPUs, top-10 agreement ~99 %). Part of the model "
                                     "checksum: a corpus changes encoder through reindex_model_upgrade."),
        "index_type": Param(IndexType.HNSW.value, type="string", enum=[i.value for i in IndexType], title="Index",
                            description="Cosine index built after the load (none: exact search only)."),
        "ivfflat_lists": Param(None, type=["null", "integer"], minimum=IVFFLAT_LISTS_RANGE[0],
                               maximum=IVFFLAT_LISTS_RANGE[1], title="IVFFlat lists",
                               description="IVFFlat only: lists (empty: rows/1000, sqrt(rows) above 1M rows)."),
        "on_busy": Param(OnBusy.WAIT.value, type="string", enum=[o.value for o in OnBusy], title="When busy",
                         description="When another run is writing this corpus: wait for it (no worker slot "
                                     "held) or fail at once. A holder whose run has ended is taken over."),
        "busy_wait_seconds": Param(3600, type="integer", minimum=BUSY_WAIT_RANGE[0], maximum=BUSY_WAIT_RANGE[1],
                                   title="Busy wait (s)",
                                   description="on_busy=wait: give up after this long since the run started."),
        "service_conn_id": Param(None, type=["null", "string"], title="Service connection",
                                 description="backend=service: the Airflow http connection of the embedding "
                                             "service (empty: reindex_embedding_service). Host = base URL, password "
                                             "= API key, extra = {\"protocol\": \"seed004\" | \"openai\"}."),
    }


def corpus_params() -> dict[str, Param]:
    """``reindex_corpus``: a corpus, its model (empty: the active one), chunking, embedding, outcome."""
    return {
        "corpus_uri": Param(SAMPLE_CORPUS, type="string", minLength=1, title="Corpus URI",
                            description="Directory or file: a local path, file:// or gs:// URI."),
        "corpus": Param("sample", type="string", pattern=CORPUS_NAME_PATTERN, minLength=1, maxLength=63,
                        title="Corpus name", description="Lower-case letter, then letters, digits or '_' (at most 63)."),
        "backend": _backend(),
        "model": Param(None, type=["null", "string"], title="Model",
                       description="Empty: the corpus's active model (a new corpus gets the bundled "
                                   f"{DEFAULT_MODEL} locally, text-embedding-005 on Vertex). local: "
                                   "sentence-transformers name (local cache) or path; vertex: text-embedding-005, "
                                   "text-multilingual-embedding-002, gemini-embedding-001; service: empty or "
                                   "'served' (the service's model), or the model name to ask for (openai) or insist "
                                   "on (seed004). A corpus changes model "
                                   "only through reindex_model_upgrade."),
        "output_dimensionality": Param(None, type=["null", "integer"], minimum=1, maximum=3072,
                                       title="Output dimensionality",
                                       description="Vertex only: vector size asked of the model (empty: its default)."),
        "max_tokens": Param(200, type="integer", minimum=MAX_TOKENS_RANGE[0], maximum=MAX_TOKENS_RANGE[1],
                            title="Max tokens per chunk",
                            description="Most tokens per chunk (model tokenizer, special tokens excluded)."),
        "overlap_tokens": Param(32, type="integer", minimum=0, maximum=MAX_TOKENS_RANGE[1] // 2,
                                title="Overlap tokens",
                                description="Tokens shared by consecutive chunks (at most max_tokens/2)."),
        **_embedding_params(),
        "storage": Param(Storage.VECTOR.value, type="string", enum=[s.value for s in Storage], title="Storage",
                         description="Vector column type of a new corpus: vector (float32) or halfvec (half "
                                     "floats: half the table, indexable up to 4,000 dimensions, top-10 recall "
                                     "~99.98 %). Part of the model checksum: with `model` empty a corpus keeps "
                                     "its storage; switch it with reindex_model_upgrade."),
        "force": Param(False, type="boolean", title="Force",
                       description="Re-chunk every document and re-embed every chunk, even unchanged ones."),
        "max_failed_ratio": Param(DEFAULT_MAX_FAILED_RATIO, type="number", minimum=0, maximum=1,
                                  title="Max failed ratio",
                                  description="Once the retry policy is spent, the run fails if more than this "
                                              "share of its chunks is FAILED (0.01 = 1 %). A green run means the "
                                              "corpus is served as asked."),
    }


def upgrade_params() -> dict[str, Param]:
    """``reindex_model_upgrade``: the corpus, the target model, how to embed it, when to switch."""
    return {
        "corpus": Param(type="string", pattern=CORPUS_NAME_PATTERN, minLength=1, maxLength=63,
                        title="Corpus name", description="The corpus to re-embed (required)."),
        "model": Param(type="string", minLength=1, title="Target model",
                       description="Required. local: sentence-transformers name (local cache) or path; vertex: "
                                   "text-embedding-005, text-multilingual-embedding-002, gemini-embedding-001; "
                                   "service: 'served' (whatever the service serves now) or its model name."),
        "backend": _backend(),
        "dimension": Param(None, type=["null", "integer"], minimum=1, maximum=4096, title="Dimension",
                           description="local: the dimension the model must produce (checked); vertex: "
                                       "output_dimensionality asked of the model. Empty: the model's own."),
        "normalize": Param(True, type="boolean", title="Normalize",
                           description="L2-normalise the vectors (local; part of the model checksum)."),
        "storage": Param(Storage.VECTOR.value, type="string", enum=[s.value for s in Storage], title="Storage",
                         description="Vector column type of the new table: vector (float32) or halfvec (half "
                                     "floats: half the table, indexable up to 4,000 dimensions). The same model "
                                     "with another storage is an upgrade too."),
        **_embedding_params(),
        "retention_hours": Param(None, type=["null", "number"], minimum=0, title="Retention (h)",
                                 description="Keep the replaced table this long (empty: REINDEX_STORE_RETENTION_HOURS, "
                                             "default 168)."),
        "max_failed": Param(0, type="integer", minimum=0, title="Max failed chunks",
                            description="Switch even if up to this many chunks got no new vector."),
        **quality_params(),
    }


def quality_params() -> dict[str, Param]:
    """The quality gate before ``switch_model``: the new store against the old one (reindex.quality)."""
    return {
        "quality_below": Param("fail", type="string", enum=["fail", "switch", "wait"], title="Below the quality bar",
                               description="When the new store retrieves worse than the old one: fail (the old model "
                                           "keeps serving), switch anyway, or wait for a human to approve or reject "
                                           "the switch (Required Actions; the figures are in the request)."),
        "quality_max_drop": Param(0.02, type="number", minimum=0, maximum=1, title="Max hit-rate drop",
                                  description="The new store may find a query's own document in its top 10 at most "
                                              "this much less often than the old one (0.02 = 2 points)."),
        "quality_min_agreement": Param(0.97, type="number", minimum=0, maximum=1, title="Min top-10 agreement",
                                       description="Same model weights (only encoder, precision or storage change): "
                                                   "the two stores' exact top-10 must agree at least this much."),
        "quality_sample": Param(100, type="integer", minimum=1, maximum=10_000, title="Sampled queries",
                                description="Without user queries: chunks sampled from the corpus, a span of each "
                                            "used as a query that should find its own document."),
        "quality_queries": Param(None, type=["null", "string", "array"], title="User queries",
                                 description="Instead of sampled chunks: a list of query texts, or a file path "
                                             "(one query per line, or JSONL {\"query\": …, \"doc_id\": …})."),
    }
