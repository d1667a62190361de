"""Validated run configuration, mirrored by the ``reindex_corpus`` DAG's Params form."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from enum import StrEnum
from typing import Any

from reindex.errors import ConfigError

CORPUS_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,62}$"
_CORPUS_NAME_RE = re.compile(CORPUS_NAME_PATTERN)

DEFAULT_MODEL = "all-MiniLM-L6-v2"
DEFAULT_SCHEMA = "reindex"

# Bounds shared with the Params form (dags/) so both reject the same inputs.
MAX_TOKENS_RANGE = (16, 8192)
PARTITION_SIZE_RANGE = (100, 1_000_000)
ENCODE_BATCH_RANGE = (1, 4096)
MAX_PARTITIONS = 256
IVFFLAT_LISTS_RANGE = (1, 32768)
BUSY_WAIT_RANGE = (0, 7 * 24 * 3600)
DEFAULT_MAX_FAILED_RATIO = 0.01


class Backend(StrEnum):
    LOCAL = "local"
    VERTEX = "vertex"
    SERVICE = "service"  # a remote embedding service over HTTP (seed004 or OpenAI-compatible)


class Encoder(StrEnum):
    """What runs the model of ``backend=local`` (part of the model checksum: another runtime is another store).
    Measured in benchmarks/README.md (runtimes): fp32 ONNX Runtime / OpenVINO give torch's vectors within 1e-5
    cosine; ``openvino-bf16`` trades a little agreement for speed on CPUs with bf16 support."""

    TORCH = "torch"  # sentence-transformers on torch (the default)
    ONNX = "onnx"  # the model exported to ONNX, run by ONNX Runtime (fp32)
    OPENVINO = "openvino"  # the ONNX export run by OpenVINO, fp32 inference precision
    OPENVINO_BF16 = "openvino-bf16"  # OpenVINO in bfloat16 (AMX / AVX-512 BF16 CPUs)


class IndexType(StrEnum):
    HNSW = "hnsw"
    IVFFLAT = "ivfflat"
    NONE = "none"


# ``served``: whatever model the embedding service serves (its name and checksum become the corpus's model).
SERVED_MODEL = "served"
DEFAULT_MODELS = {Backend.LOCAL: DEFAULT_MODEL, Backend.VERTEX: "text-embedding-005", Backend.SERVICE: SERVED_MODEL}


class Storage(StrEnum):
    """The pgvector column type of a store: ``halfvec`` keeps half floats (half the table, faster COPY,
    top-10 recall ~99.98 % of float32 in benchmarks/README.md) and is part of the model checksum."""

    VECTOR = "vector"  # float32
    HALFVEC = "halfvec"  # IEEE half floats, |x| <= 65504


# pgvector indexes (HNSW, IVFFlat) take vectors of at most this many dimensions per column type.
INDEX_MAX_DIMS = {Storage.VECTOR: 2000, Storage.HALFVEC: 4000}


class OnBusy(StrEnum):
    """What a run does when another run holds the corpus's lease."""

    WAIT = "wait"  # wait (rescheduled, no worker slot held) up to ``busy_wait_seconds``
    FAIL = "fail"  # fail at once, naming the run that holds the corpus


def _check_range(name: str, value: int, bounds: tuple[int, int]) -> None:
    lo, hi = bounds
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(f"{name}={value} is out of range: must be between {lo} and {hi}")


def validate_corpus_name(name: str) -> str:
    if not isinstance(name, str) or not _CORPUS_NAME_RE.match(name):
        raise ConfigError(
            f"corpus name {name!r} is invalid: it must match {CORPUS_NAME_PATTERN} "
            "(lower-case letter first, then lower-case letters, digits or '_', at most 63 characters)"
        )
    return name


@dataclass(frozen=True)
class ReindexConfig:
    """Everything one ``reindex_corpus`` run needs to know. Validated on construction."""

    corpus: str
    corpus_uri: str
    backend: Backend = Backend.LOCAL
    model: str | None = None  # None/empty: the corpus's active model, else DEFAULT_MODELS[backend]
    max_tokens: int = 200
    overlap_tokens: int = 32
    partition_size: int = 2000
    encode_batch_size: int = 64
    index_type: IndexType = IndexType.HNSW
    storage: Storage = Storage.VECTOR  # in the model checksum: a corpus switches via reindex_model_upgrade
    force: bool = False
    max_document_bytes: int = 64 * 1024 * 1024
    output_dimensionality: int | None = None  # Vertex: requested vector size (None: the model's default)
    normalize: bool = True  # local: L2-normalise the vectors (part of the model checksum)
    ivfflat_lists: int | None = None  # IVFFlat only: lists (None: rows/1000, sqrt(rows) above 1M rows)
    on_busy: OnBusy = OnBusy.WAIT
    busy_wait_seconds: int = 3600
    # The run fails when, after the retry policy is spent, more than this share of its chunks is FAILED.
    max_failed_ratio: float = DEFAULT_MAX_FAILED_RATIO
    # When the corpus already has an active model, use it instead of ``model`` (nightly runs: the
    # configured model only seeds a new corpus; reindex_model_upgrade is how a corpus changes model).
    follow_active_model: bool = False
    # service: the Airflow connection of the embedding service (None: REINDEX_SERVICE_CONN_ID, default
    # ``reindex_embedding_service``).
    service_conn_id: str | None = None
    # local: what runs the model (``Encoder``); in the model checksum, so a corpus changes it by an upgrade.
    encoder: Encoder = Encoder.TORCH

    def __post_init__(self) -> None:
        validate_corpus_name(self.corpus)
        if not isinstance(self.corpus_uri, str) or not self.corpus_uri.strip():
            raise ConfigError("corpus_uri is empty: give a directory, file, file:// or gs:// URI")
        try:
            object.__setattr__(self, "backend", Backend(self.backend))
        except ValueError:
            raise ConfigError(
                f"backend {self.backend!r} is not supported: choose one of {[b.value for b in Backend]}"
            ) from None
        try:
            object.__setattr__(self, "index_type", IndexType(self.index_type))
        except ValueError:
            raise ConfigError(
                f"index_type {self.index_type!r} is not supported: choose one of {[i.value for i in IndexType]}"
            ) from None
        try:
            object.__setattr__(self, "storage", Storage(self.storage or Storage.VECTOR))
        except ValueError:
            raise ConfigError(
                f"storage {self.storage!r} is not supported: choose one of {[s.value for s in Storage]}"
            ) from None
        if self.model is None or (isinstance(self.model, str) and not self.model.strip()):
            # No model named: the corpus's active one, else the backend's default for a new corpus.
            object.__setattr__(self, "model", DEFAULT_MODELS[self.backend])
            object.__setattr__(self, "follow_active_model", True)
        if not isinstance(self.model, str):
            raise ConfigError(f"model must be a model name or path, got {self.model!r}")
        try:
            object.__setattr__(self, "encoder", Encoder(self.encoder or Encoder.TORCH))
        except ValueError:
            raise ConfigError(
                f"encoder {self.encoder!r} is not supported: choose one of {[e.value for e in Encoder]}"
            ) from None
        if self.encoder != Encoder.TORCH and self.backend != Backend.LOCAL:
            raise ConfigError(f"encoder={self.encoder.value} runs the model in this worker: it needs backend=local, "
                              f"not {self.backend.value}")
        _check_range("max_tokens", self.max_tokens, MAX_TOKENS_RANGE)
        _check_range("overlap_tokens", self.overlap_tokens, (0, self.max_tokens // 2))
        _check_range("partition_size", self.partition_size, PARTITION_SIZE_RANGE)
        _check_range("encode_batch_size", self.encode_batch_size, ENCODE_BATCH_RANGE)
        _check_range("max_document_bytes", self.max_document_bytes, (1024, 2**31 - 1))
        if self.output_dimensionality is not None:
            _check_range("output_dimensionality", self.output_dimensionality, (1, 3072))
        if self.ivfflat_lists is not None:
            _check_range("ivfflat_lists", self.ivfflat_lists, IVFFLAT_LISTS_RANGE)
        try:
            object.__setattr__(self, "on_busy", OnBusy(self.on_busy))
        except ValueError:
            raise ConfigError(
                f"on_busy {self.on_busy!r} is not supported: choose one of {[o.value for o in OnBusy]}"
            ) from None
        _check_range("busy_wait_seconds", self.busy_wait_seconds, BUSY_WAIT_RANGE)
        if self.service_conn_id is not None and (not isinstance(self.service_conn_id, str)
                                                 or not self.service_conn_id.strip()):
            raise ConfigError(f"service_conn_id must be a connection id, got {self.service_conn_id!r}")
        ratio = self.max_failed_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 <= ratio <= 1:
            raise ConfigError(f"max_failed_ratio={ratio!r} is out of range: must be a number between 0 and 1")
        object.__setattr__(self, "max_failed_ratio", float(ratio))
        for flag in ("normalize", "force", "follow_active_model"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{flag} must be true or false, got {getattr(self, flag)!r}")

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> ReindexConfig:
        """Build from a Params / conf mapping (``None`` = the default). A key that is not configuration
        — a typo such as ``max_token`` — is refused with its name and the valid ones, never ignored."""
        import difflib

        known = sorted(f.name for f in fields(cls))
        unknown = sorted(k for k in values if k not in known)
        if unknown:
            hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, known, 1)) else repr(k)
                     for k in unknown]
            raise ConfigError(f"unknown parameter(s) {', '.join(hints)}: valid parameters are {', '.join(known)}")
        return cls(**{k: v for k, v in values.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["backend"] = self.backend.value
        d["index_type"] = self.index_type.value
        d["storage"] = self.storage.value
        d["on_busy"] = self.on_busy.value
        d["encoder"] = self.encoder.value
        return d
