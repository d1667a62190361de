"""A Vertex AI batch-prediction emulator for text-embedding jobs (tests and offline demos).

An HTTP service that implements the subset of the ``JobService`` REST API (v1) that
``google.cloud.aiplatform_v1.JobServiceClient(transport="rest")`` uses for batch prediction:

====== =================================================================== ======================
POST   ``/v1/projects/{p}/locations/{l}/batchPredictionJobs``              create (body = job)
GET    ``/v1/projects/{p}/locations/{l}/batchPredictionJobs/{id}``         get
POST   ``/v1/projects/{p}/locations/{l}/batchPredictionJobs/{id}:cancel``  cancel (returns ``{}``)
GET    ``/v1/projects/{p}/locations/{l}/batchPredictionJobs``              list (``pageSize``,
                                                                           ``pageToken``,
                                                                           ``filter``)
====== =================================================================== ======================

Wire format (checked against google-cloud-aiplatform 2.7.0's ``rest_base.py``/``rest.py``):
protobuf JSON with camelCase names (``displayName``, ``inputConfig.instancesFormat``,
``inputConfig.gcsSource.uris``, ``outputConfig.predictionsFormat``,
``outputConfig.gcsDestination.outputUriPrefix``, ``modelParameters`` (a ``google.protobuf.Value``,
so ``outputDimensionality`` arrives as a float such as ``768.0``), ``outputInfo.gcsOutputDirectory``,
``completionStats.{successfulCount,failedCount,incompleteCount}`` (int64, hence JSON *strings*),
``createTime``/``startTime``/``endTime``/``updateTime`` (RFC 3339), ``error {code, message}``).
The client sends ``$alt=json;enum-encoding=int``; the emulator then writes ``state`` as the enum
number (e.g. ``4``), otherwise as its name (``"JOB_STATE_SUCCEEDED"``). Errors are
``{"error": {"code": <http>, "message": ..., "status": "RESOURCE_EXHAUSTED"}}``, which
``google.api_core.exceptions.from_http_response`` turns into the usual exception classes.
``list`` answers ``{"batchPredictionJobs": [...], "nextPageToken": "..."}``.

Admin endpoints (not Google's): ``GET /emulator/health``, ``GET /emulator/stats`` (call counters,
e.g. ``create_calls``), ``GET|POST /emulator/config`` (POST merges a JSON object of
``EmulatorConfig`` fields into the current configuration), ``POST /emulator/reset`` (forget jobs,
counters and fault history; ``{"config": true}`` also restores the start-up configuration),
``GET /emulator/jobs``.

Job life cycle. A job is created ``JOB_STATE_PENDING``, waits ``pending_delay_s``, becomes
``JOB_STATE_RUNNING`` (a background thread), and ends ``SUCCEEDED``; or ``partial_state``
(``SUCCEEDED`` by default — real Vertex usually reports a job with some failed instances as
SUCCEEDED with ``failedCount > 0``; set ``PARTIALLY_SUCCEEDED`` to exercise that state) when any
instance failed; ``FAILED`` (``outcome="FAILED"``, unreadable/missing input, limits exceeded,
``max_failed_ratio`` exceeded); ``EXPIRED`` (``outcome="EXPIRED"``: straight from PENDING, no
output); ``CANCELLED`` (``:cancel`` while not terminal: ``JOB_STATE_CANCELLING`` until the worker
stops; output written so far stays, unprocessed lines count as ``incompleteCount``). Each job uses
the configuration as it was when it was created.

Input and output. The worker reads every input object (``gs://`` URIs; ``*`` wildcards allowed)
with google-cloud-storage — against ``gcs_host`` when given, else ``STORAGE_EMULATOR_HOST`` —
streaming it in 1 MiB chunks (never a whole file), first to count the instances (limits:
30,000 per classic job, 1,000,000 rows / 1 GB per Gemini job, configurable), then to process them
in blocks of ``embed_block_size``. Results go to
``<outputUriPrefix>/prediction-<model>-<YYYY_MM_DDTHH_MM_SS_mmmZ>/predictions_0001.jsonl, …`` and
``errors_0001.jsonl, …``, a new file every ``lines_per_file`` lines, each uploaded when full.
Blank input lines are skipped.

- Classic models (``text-embedding-004/005``, ``text-multilingual-embedding-002``; ``@version``
  suffixes and full ``projects/…/publishers/google/models/…`` names accepted): input
  ``{"content": str, "task_type"?: str, "title"?: str}``; success line (predictions file)
  ``{"instance": <input echoed>, "predictions": [{"embeddings": {"values": [...], "statistics":
  {"token_count": N, "truncated": bool}}}], "status": ""}``; failure line (errors file)
  ``{"instance": <input>, "error": {"code": 400|429|503, "message": ...}, "status": <message>}``
  (and, with ``classic_failures_in_predictions``, also ``{"instance", "predictions": [], "status":
  <message>}`` in the predictions file). ``modelParameters.outputDimensionality`` (1..768) and
  ``modelParameters.autoTruncate`` apply to the whole job.
- ``gemini-embedding-001``: input ``{"key": str, "request": {"content": {"parts": [{"text": str}]},
  "embed_content_config": {"output_dimensionality"?: int, "task_type"?: str, "title"?: str,
  "auto_truncate"?: bool}}}`` (camelCase spellings accepted); success line ``{"key", "request",
  "response": {"embedding": {"values": [...]}}}``; failure line ``{"key", "request", "status":
  {"code", "message"}}``. *Choice:* PRODUCT.md documents only the input; like Vertex's Gemini
  batch output, failures stay in the predictions files, marked by a non-empty ``status`` (an
  object, so the code survives); ``gemini_failures_in_errors_file`` moves them to errors files.

Per-instance checks, in order: not UTF-8 / not JSON / wrong shape → 400; a control character other
than ``\\n`` and ``\\t`` (so ``\\r`` too), C1 controls or a lone surrogate → 400 ``Invalid
characters in content``; more than ``max_input_tokens`` (2,048) tokens → 400 ``Text too long: N
tokens > 2048`` unless auto-truncation is on (then the text is cut to the limit and
``truncated`` is true). Auto-truncation defaults to ``auto_truncate_default`` (true, as on
Vertex) when the job does not say. Tokens are counted with the local model's tokenizer when
``embedder="model"`` (special tokens excluded), else (``token_counter="regex"``) as words plus
punctuation marks (``\\w+|[^\\w\\s]``), an approximation that undercounts sub-word tokenizers; only
``content`` (classic) or the joined ``parts[].text`` (Gemini) is counted. Then fault injection:
``force_errors`` (marker substring → kind) and ``error_rates`` (kind → probability), drawn from
sha256(seed, line key) — the key is the Gemini ``key``, or the canonical JSON of the classic
instance — so the same input fails the same way on every run. Kinds: ``too_long`` (400),
``invalid_characters`` (400), ``rate_limited`` (429 ``RESOURCE_EXHAUSTED``), ``unavailable``
(503 ``UNAVAILABLE``). ``transient_max_failures`` caps how many times one key gets an injected
429/503 over the emulator's life, so a retry of those lines can succeed.

Embedders. ``embedder="model"`` (default): the bundled sentence-transformers model
(``reindex.embeddings.local.LocalEncoder(local_model)``; 384-d, normalised). It has one
dimension: a job asking for another (``outputDimensionality`` or a Gemini
``output_dimensionality``) ends FAILED with a message saying so — no padding or truncation.
``embedder="hash"`` is for TESTS ONLY: unit vectors expanded from shake-256 of
``task_type \\0 title \\0 text`` in the requested dimension (default ``hash_dim``); deterministic,
meaningless, and fast enough for 10,000+ line jobs in well under a second (at small dimensions).

Job-level faults: ``outcome`` (``FAILED`` after ``fail_after_lines`` lines with ``error {fail_code,
fail_message}``; ``EXPIRED``), ``pending_delay_s``/``running_delay_s``/``line_delay_s`` (slow
jobs), ``truncate_last_line`` (the last line of the last predictions file is cut in half, without
its newline, while the job still reports success), ``create_quota`` (creates accepted before
``429 RESOURCE_EXHAUSTED "Quota exceeded … per day"``), ``create_errors`` (HTTP codes answered to
the next creates, one each).

Use: ``with VertexEmulator(EmulatorConfig(embedder="hash")) as emu: emu.endpoint`` or
``python -m reindex.emulators.vertex --port 8790 --gcs-host http://127.0.0.1:9023 --embedder hash``.
``VERTEX_EMULATOR_CONFIG`` (a JSON object, or the path of a JSON file) sets the start-up
configuration of the command and of ``VertexEmulator()`` without an explicit config.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import hashlib
import itertools
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
import orjson

log = logging.getLogger(__name__)

CONFIG_ENV = "VERTEX_EMULATOR_CONFIG"

JOB_STATES: dict[str, int] = {
    "JOB_STATE_UNSPECIFIED": 0, "JOB_STATE_QUEUED": 1, "JOB_STATE_PENDING": 2, "JOB_STATE_RUNNING": 3,
    "JOB_STATE_SUCCEEDED": 4, "JOB_STATE_FAILED": 5, "JOB_STATE_CANCELLING": 6, "JOB_STATE_CANCELLED": 7,
    "JOB_STATE_PAUSED": 8, "JOB_STATE_EXPIRED": 9, "JOB_STATE_UPDATING": 10, "JOB_STATE_PARTIALLY_SUCCEEDED": 11,
}
TERMINAL_STATES = frozenset({"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED",
                             "JOB_STATE_EXPIRED", "JOB_STATE_PARTIALLY_SUCCEEDED"})

# google.rpc.Code numbers used in job.error
CODE_CANCELLED, CODE_INVALID_ARGUMENT, CODE_DEADLINE_EXCEEDED, CODE_NOT_FOUND = 1, 3, 4, 5
CODE_INTERNAL = 13

HTTP_STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                     409: "ALREADY_EXISTS", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 501: "UNIMPLEMENTED",
                     503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}

# Fault kinds that can be injected per line: (HTTP-style code, message template).
FAULT_KINDS: dict[str, tuple[int, str]] = {
    "too_long": (400, "Text too long: {tokens} tokens > {limit}"),
    "invalid_characters": (400, "Invalid characters in content"),
    "rate_limited": (429, "Resource exhausted: rate limit of requests per minute for this base model "
                          "reached; retry later. RESOURCE_EXHAUSTED"),
    "unavailable": (503, "The service is currently unavailable. UNAVAILABLE"),
}
TRANSIENT_KINDS = frozenset({"rate_limited", "unavailable"})

CLASSIC_MODELS: dict[str, int] = {"text-embedding-004": 768, "text-embedding-005": 768,
                                  "text-multilingual-embedding-002": 768}
GEMINI_MODELS: dict[str, int] = {"gemini-embedding-001": 3072}
TASK_TYPES = frozenset({"RETRIEVAL_QUERY", "RETRIEVAL_DOCUMENT", "SEMANTIC_SIMILARITY", "CLASSIFICATION",
                        "CLUSTERING", "QUESTION_ANSWERING", "FACT_VERIFICATION", "CODE_RETRIEVAL_QUERY"})

_CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_PARENT_RE = re.compile(r"^/v1/(projects/[^/]+/locations/[^/]+)/batchPredictionJobs$")
_JOB_RE = re.compile(r"^/v1/(projects/[^/]+/locations/[^/]+/batchPredictionJobs/[^/:]+)(:cancel)?$")
_FILTER_RE = re.compile(r'^\s*([A-Za-z_][\w.\-]*)\s*=\s*(?:"([^"]*)"|(\S+))\s*$')
_READ_CHUNK = 1 << 20


# --------------------------------------------------------------------------------------------- config


@dataclass
class EmulatorConfig:
    """Behaviour of the emulator; each job keeps a copy of the configuration it was created under.

    Treat instances as immutable: change the live configuration with ``VertexEmulator.configure``
    or ``POST /emulator/config``. ``__post_init__`` validates every field (``ValueError``).
    """

    embedder: str = "model"  # "model" (bundled local model) | "hash" (TEST ONLY)
    local_model: str = "default"  # model alias/path for embedder="model"
    hash_dim: int = 768  # hash embedder dimension when the job does not ask for one
    token_counter: str = "auto"  # "auto" (model tokenizer iff embedder="model") | "regex" | "model"
    max_input_tokens: int = 2048
    auto_truncate_default: bool = True  # when the job/line does not set autoTruncate (Vertex: true)
    pending_delay_s: float = 0.0
    running_delay_s: float = 0.0  # minimum time a job spends RUNNING
    line_delay_s: float = 0.0  # extra time per input line (slow jobs)
    lines_per_file: int = 10_000  # roll predictions_/errors_ files after this many lines
    embed_block_size: int = 256
    seed: int = 0
    error_rates: dict[str, float] = field(default_factory=dict)  # kind -> probability per line
    force_errors: dict[str, str] = field(default_factory=dict)  # marker substring -> kind
    transient_max_failures: int | None = None  # max injected 429/503 per line key (None: unlimited)
    partial_state: str = "JOB_STATE_SUCCEEDED"  # final state when some lines failed
    max_failed_ratio: float | None = None  # FAILED when failed/total exceeds this
    outcome: str = "auto"  # "auto" | "FAILED" | "EXPIRED"
    fail_after_lines: int = 0  # outcome FAILED: lines processed (and written) before failing
    fail_code: int = CODE_INTERNAL
    fail_message: str = "Internal error occurred (injected by the emulator)."
    truncate_last_line: bool = False
    create_quota: int | None = None  # accepted creates before 429 (counted since start/reset)
    create_errors: list[int] = field(default_factory=list)  # HTTP codes for the next creates
    max_instances_classic: int | None = 30_000
    max_instances_gemini: int | None = 1_000_000
    max_input_bytes_gemini: int | None = 1_000_000_000
    classic_failures_in_predictions: bool = False
    gemini_failures_in_errors_file: bool = False
    gcs_project: str = "emulator"

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"EmulatorConfig: {msg}")

        need(self.embedder in ("model", "hash"), f"embedder must be 'model' or 'hash', not {self.embedder!r}")
        need(self.token_counter in ("auto", "regex", "model"),
             f"token_counter must be auto|regex|model, not {self.token_counter!r}")
        need(isinstance(self.hash_dim, int) and 1 <= self.hash_dim <= 3072, "hash_dim must be in 1..3072")
        need(isinstance(self.max_input_tokens, int) and self.max_input_tokens >= 1, "max_input_tokens must be >= 1")
        for name in ("pending_delay_s", "running_delay_s", "line_delay_s"):
            need(isinstance(getattr(self, name), int | float) and getattr(self, name) >= 0, f"{name} must be >= 0")
        need(isinstance(self.lines_per_file, int) and self.lines_per_file >= 1, "lines_per_file must be >= 1")
        need(isinstance(self.embed_block_size, int) and self.embed_block_size >= 1, "embed_block_size must be >= 1")
        need(isinstance(self.error_rates, dict), "error_rates must be an object")
        for kind, rate in self.error_rates.items():
            need(kind in FAULT_KINDS, f"unknown error kind {kind!r} (known: {', '.join(FAULT_KINDS)})")
            need(isinstance(rate, int | float) and 0 <= rate <= 1, f"error_rates[{kind!r}] must be in [0, 1]")
        need(sum(self.error_rates.values()) <= 1 + 1e-9, "error_rates must sum to at most 1")
        need(isinstance(self.force_errors, dict), "force_errors must be an object")
        for marker, kind in self.force_errors.items():
            need(bool(marker) and kind in FAULT_KINDS, f"force_errors[{marker!r}] must name a kind in {list(FAULT_KINDS)}")
        state = self.partial_state if self.partial_state.startswith("JOB_STATE_") else f"JOB_STATE_{self.partial_state}"
        need(state in ("JOB_STATE_SUCCEEDED", "JOB_STATE_PARTIALLY_SUCCEEDED"),
             "partial_state must be SUCCEEDED or PARTIALLY_SUCCEEDED")
        self.partial_state = state
        need(self.outcome in ("auto", "FAILED", "EXPIRED"), "outcome must be auto|FAILED|EXPIRED")
        need(self.max_failed_ratio is None or 0 <= self.max_failed_ratio <= 1, "max_failed_ratio must be in [0, 1]")
        need(isinstance(self.fail_after_lines, int) and self.fail_after_lines >= 0, "fail_after_lines must be >= 0")
        need(self.create_quota is None or self.create_quota >= 0, "create_quota must be >= 0")
        need(all(isinstance(c, int) and 400 <= c <= 599 for c in self.create_errors),
             "create_errors must be HTTP error codes")
        self.create_errors = list(self.create_errors)
        need(self.transient_max_failures is None or self.transient_max_failures >= 0,
             "transient_max_failures must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def merged(self, changes: Mapping[str, Any]) -> EmulatorConfig:
        """A new config with ``changes`` applied; unknown field names are a ``ValueError``."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"EmulatorConfig: unknown option(s) {', '.join(unknown)}")
        return dataclasses.replace(copy.deepcopy(self), **copy.deepcopy(dict(changes)))

    @classmethod
    def from_env(cls, var: str = CONFIG_ENV) -> EmulatorConfig:
        """The default config updated from ``$VERTEX_EMULATOR_CONFIG`` (JSON text or a JSON file path)."""
        raw = os.environ.get(var, "").strip()
        if not raw:
            return cls()
        if not raw.startswith("{"):
            with open(raw, encoding="utf-8") as f:
                raw = f.read()
        return cls().merged(json.loads(raw))


# ------------------------------------------------------------------------------------ embedders etc.


class HashEmbedder:
    """TEST ONLY: deterministic unit vectors from shake-256 of (salt, text); carry no meaning."""

    def embed(self, texts: list[str], salts: list[str], dim: int) -> np.ndarray:
        out = np.empty((len(texts), dim), dtype=np.float32)
        for i, (text, salt) in enumerate(zip(texts, salts, strict=True)):
            digest = hashlib.shake_256(f"{salt}\x00{text}".encode()).digest(2 * dim)
            out[i] = np.frombuffer(digest, dtype="<i2")
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        norms[norms == 0] = 1.0
        out /= norms
        return out


class ModelEmbedder:
    """The bundled local sentence-transformers model; one dimension (``dim``), normalised vectors."""

    def __init__(self, model: str = "default") -> None:
        from reindex.embeddings.local import LocalEncoder

        self.encoder = LocalEncoder(model)
        self._lock = threading.Lock()

    @property
    def dim(self) -> int:
        with self._lock:
            return self.encoder.spec.dim

    def embed(self, texts: list[str], salts: list[str], dim: int) -> np.ndarray:
        with self._lock:
            vectors = self.encoder.encode(texts)
        if vectors.shape[1] != dim:
            raise _JobError(CODE_INVALID_ARGUMENT, _dim_message(dim, vectors.shape[1]))
        return vectors


def _dim_message(requested: int, native: int) -> str:
    return (f"output dimensionality {requested} cannot be served: the emulator's local model produces "
            f"{native}-d vectors (ask for {native}, or run the emulator with embedder='hash')")


class RegexTokenCounter:
    """Words and punctuation marks (``\\w+|[^\\w\\s]``): a cheap approximation of a token count."""

    def count(self, text: str) -> int:
        return sum(1 for _ in _TOKEN_RE.finditer(text))

    def truncate(self, text: str, limit: int) -> str:
        for i, m in enumerate(_TOKEN_RE.finditer(text), 1):
            if i == limit:
                return text[:m.end()]
        return text


class ModelTokenCounter:
    """Tokens of the local model's fast tokenizer, special tokens excluded."""

    def __init__(self, model: str = "default") -> None:
        from reindex.chunking import load_tokenizer
        from reindex.models import resolve_model_path

        self.tokenizer = load_tokenizer(resolve_model_path(model))

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def truncate(self, text: str, limit: int) -> str:
        offsets = self.tokenizer.encode(text, add_special_tokens=False).offsets
        return text if len(offsets) <= limit else text[:offsets[limit - 1][1]]


# ------------------------------------------------------------------------------------------- jobs


class _JobError(Exception):
    """Ends a running job FAILED with ``error {code, message}``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _rfc3339(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _folder_stamp(t: float) -> str:
    d = datetime.fromtimestamp(t, UTC)
    return d.strftime("%Y_%m_%dT%H_%M_%S_") + f"{d.microsecond // 1000:03d}Z"


def _split_gs(uri: str) -> tuple[str, str]:
    if not isinstance(uri, str) or not uri.startswith("gs://") or len(uri) <= 5:
        raise ValueError(f"not a gs:// URI: {uri!r}")
    bucket, _, path = uri[5:].partition("/")
    if not bucket:
        raise ValueError(f"not a gs:// URI: {uri!r}")
    return bucket, path


def _model_family(model: str) -> tuple[str, str, int] | None:
    """(family, model id, native dim) of a publisher model name, or None if not an embedding model."""
    model_id = model.rsplit("/", 1)[-1].split("@", 1)[0]
    if model_id in GEMINI_MODELS:
        return "gemini", model_id, GEMINI_MODELS[model_id]
    if model_id in CLASSIC_MODELS:
        return "classic", model_id, CLASSIC_MODELS[model_id]
    if model_id.startswith(("textembedding-gecko", "text-embedding-", "text-multilingual-embedding-")):
        return "classic", model_id, 768
    return None


@dataclass
class _Job:
    name: str
    body: dict[str, Any]
    config: EmulatorConfig
    family: str
    model_id: str
    native_dim: int
    create_time: float
    state: str = "JOB_STATE_PENDING"
    update_time: float = 0.0
    start_time: float | None = None
    end_time: float | None = None
    error: dict[str, Any] | None = None
    output_dir: str | None = None
    total: int | None = None
    successful: int = 0
    failed: int = 0
    cancel: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    thread: threading.Thread | None = None

    def resource(self, int_enums: bool = False) -> dict[str, Any]:
        with self.lock:
            res = dict(self.body)
            for key in ("state", "error", "outputInfo", "completionStats", "startTime", "endTime"):
                res.pop(key, None)
            res["name"] = self.name
            res["state"] = JOB_STATES[self.state] if int_enums else self.state
            res["createTime"] = _rfc3339(self.create_time)
            res["updateTime"] = _rfc3339(self.update_time)
            if self.start_time is not None:
                res["startTime"] = _rfc3339(self.start_time)
            if self.end_time is not None:
                res["endTime"] = _rfc3339(self.end_time)
            if self.output_dir:
                res["outputInfo"] = {"gcsOutputDirectory": self.output_dir}
            if self.start_time is not None:
                incomplete = 0
                if self.state in TERMINAL_STATES and self.total is not None:
                    incomplete = max(0, self.total - self.successful - self.failed)
                res["completionStats"] = {"successfulCount": str(self.successful),
                                          "failedCount": str(self.failed),
                                          "incompleteCount": str(incomplete)}
            if self.error:
                res["error"] = dict(self.error)
            return res


@dataclass(slots=True)
class _Item:
    """One input line on its way to an output line."""

    fault_key: str
    echo: Any  # classic: the instance; gemini: the request
    key: Any = None  # gemini only
    text: str = ""
    salt: str = ""
    dim: int = 0
    token_count: int = 0
    truncated: bool = False
    error: tuple[int, str] | None = None  # (code, message)


class _RollingSink:
    """JSONL lines into ``<dir>/<stem>_0001.jsonl, …``, ``per_file`` lines each, uploaded when full."""

    def __init__(self, bucket, folder: str, stem: str, per_file: int) -> None:
        self.bucket, self.folder, self.stem, self.per_file = bucket, folder, stem, per_file
        self.files: list[str] = []
        self._tmp = None
        self._count = 0
        self._last_line_start = 0
        self._last_line_len = 0

    def write(self, line: bytes) -> None:
        if self._tmp is None or self._count >= self.per_file:
            self._upload()
            self._tmp = tempfile.TemporaryFile(prefix="vertex-emu-")  # noqa: SIM115 - closed by _upload
            self._count = 0
        self._last_line_start = self._tmp.tell()
        self._last_line_len = len(line)
        self._tmp.write(line)
        self._tmp.write(b"\n")
        self._count += 1

    def close(self, truncate_last_line: bool = False) -> list[str]:
        """Upload the current file (its last line cut in half if asked); return the object names."""
        if self._tmp is not None and truncate_last_line:
            self._tmp.truncate(self._last_line_start + max(1, self._last_line_len // 2))
        self._upload()
        return self.files

    def _upload(self) -> None:
        if self._tmp is None:
            return
        name = f"{self.folder}/{self.stem}_{len(self.files) + 1:04d}.jsonl"
        try:
            self.bucket.blob(name).upload_from_file(self._tmp, rewind=True, content_type="application/jsonl")
        finally:
            self._tmp.close()
            self._tmp = None
        self.files.append(name)


def _iter_lines(blobs: Iterable[Any]) -> Iterator[bytes]:
    """Non-blank lines of every blob, streamed in 1 MiB chunks (trailing ``\\r`` removed)."""
    for blob in blobs:
        with blob.open("rb", chunk_size=_READ_CHUNK) as f:
            rest = b""
            while True:
                data = f.read(_READ_CHUNK)
                if not data:
                    break
                lines = (rest + data).split(b"\n")
                rest = lines.pop()
                for line in lines:
                    if line.strip():
                        yield line.removesuffix(b"\r")
            if rest.strip():
                yield rest.removesuffix(b"\r")


def _canonical(obj: Any) -> str:
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS).decode()


def _draw(seed: int, key: str) -> float:
    digest = hashlib.sha256(f"{seed}\x00{key}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _loads(line: bytes) -> Any:
    """JSON of one line; raises ``ValueError`` with a short reason."""
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        pass
    try:  # the stdlib parser also accepts lone surrogates, which are then refused as characters
        return json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError("Invalid UTF-8 in input line") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"Invalid JSON in input line: {e.msg}") from e


# ------------------------------------------------------------------------------------------- server


class VertexEmulator:
    """The emulator: job store, worker threads and the HTTP server (started by ``start``).

    ``endpoint`` is ``http://host:port``, for ``client_options={"api_endpoint": endpoint}``.
    ``gcs_host`` is the storage endpoint the workers use (default: ``STORAGE_EMULATOR_HOST``).
    """

    def __init__(self, config: EmulatorConfig | None = None, *, host: str = "127.0.0.1", port: int = 0,
                 gcs_host: str | None = None) -> None:
        self.initial_config = config if config is not None else EmulatorConfig.from_env()
        self._config = copy.deepcopy(self.initial_config)
        self.host, self.port, self.gcs_host = host, port, gcs_host
        self._lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}
        self._ids = itertools.count(int(time.time() * 1000) * 1_000_000)
        self._transient_failures: dict[str, int] = {}
        self._stats = self._zero_stats()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._model_embedder: ModelEmbedder | None = None
        self._model_counter: ModelTokenCounter | None = None
        self._hash_embedder = HashEmbedder()
        self._regex_counter = RegexTokenCounter()
        self._heavy_lock = threading.Lock()

    # -- lifecycle

    def start(self) -> VertexEmulator:
        if self._server is not None:
            return self
        emulator = self

        class Handler(_Handler):
            pass

        Handler.emulator = emulator
        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="vertex-emulator-http",
                                        daemon=True)
        self._thread.start()
        log.info("Vertex emulator listening on %s (embedder=%s)", self.endpoint, self._config.embedder)
        return self

    def stop(self) -> None:
        """Stop serving and wind the workers down (unfinished jobs are cancelled)."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server = None
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            job.cancel.set()
        for job in jobs:
            if job.thread is not None:
                job.thread.join(timeout=5)

    def __enter__(self) -> VertexEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- admin API (also over HTTP)

    @property
    def config(self) -> EmulatorConfig:
        with self._lock:
            return copy.deepcopy(self._config)

    def configure(self, changes: Mapping[str, Any] | None = None, /, **kwargs: Any) -> EmulatorConfig:
        """Merge ``changes`` into the configuration used by jobs created from now on; return it."""
        merged = dict(changes or {}, **kwargs)
        with self._lock:
            self._config = self._config.merged(merged)
            return copy.deepcopy(self._config)

    def stats(self) -> dict[str, Any]:
        """Call counters plus the number of jobs in each state."""
        with self._lock:
            out = dict(self._stats)
            jobs = list(self._jobs.values())
        states: dict[str, int] = {}
        for job in jobs:
            states[job.state] = states.get(job.state, 0) + 1
        out["jobs"] = len(jobs)
        out["jobs_by_state"] = states
        return out

    def reset(self, *, config: bool = False) -> None:
        """Forget jobs, counters and fault history (unfinished jobs are cancelled)."""
        with self._lock:
            jobs = list(self._jobs.values())
            self._jobs.clear()
            self._stats = self._zero_stats()
            self._transient_failures.clear()
            if config:
                self._config = copy.deepcopy(self.initial_config)
        for job in jobs:
            job.cancel.set()

    def job(self, name: str) -> dict[str, Any]:
        """The REST resource of a job (enum names as strings)."""
        return self._find(name).resource()

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until every job is terminal; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                busy = [j for j in self._jobs.values() if j.state not in TERMINAL_STATES]
            if not busy:
                return True
            time.sleep(0.02)
        return False

    @staticmethod
    def _zero_stats() -> dict[str, Any]:
        return {"create_calls": 0, "creates_accepted": 0, "creates_rejected": 0, "get_calls": 0,
                "list_calls": 0, "cancel_calls": 0, "lines_processed": 0}

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._stats[key] += n

    # -- routing

    def route(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> tuple[int, Any]:
        """Answer one HTTP request: ``(status, JSON-able payload)``."""
        int_enums = "enum-encoding=int" in (query.get("$alt") or [""])[0]
        try:
            if path.startswith("/emulator/"):
                return self._admin(method, path, body)
            m = _PARENT_RE.match(path)
            if m:
                if method == "POST":
                    return 200, self._create(m.group(1), _json_body(body), int_enums)
                if method == "GET":
                    return 200, self._list(m.group(1), query, int_enums)
                raise _HttpError(405 if method else 400, f"method {method} not allowed on {path}")
            m = _JOB_RE.match(path)
            if m and m.group(2) and method == "POST":
                self._cancel(m.group(1))
                return 200, {}
            if m and not m.group(2) and method == "GET":
                self._count("get_calls")
                return 200, self._find(m.group(1)).resource(int_enums)
            if m:
                raise _HttpError(501, f"{method} {path} is not implemented by the emulator")
            raise _HttpError(404, f"no route for {method} {path}")
        except _HttpError as e:
            return e.status, _error_payload(e.status, e.message)

    def _admin(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        if path == "/emulator/health":
            return 200, {"ok": True}
        if path == "/emulator/stats" and method == "GET":
            return 200, self.stats()
        if path == "/emulator/config":
            if method == "POST":
                try:
                    return 200, self.configure(_json_body(body)).to_dict()
                except (TypeError, ValueError) as e:
                    raise _HttpError(400, str(e)) from e
            return 200, self.config.to_dict()
        if path == "/emulator/reset" and method == "POST":
            opts = _json_body(body) if body.strip() else {}
            self.reset(config=bool(opts.get("config")))
            return 200, {"ok": True}
        if path == "/emulator/jobs" and method == "GET":
            with self._lock:
                jobs = list(self._jobs.values())
            return 200, {"jobs": [j.resource() for j in jobs]}
        raise _HttpError(404, f"no admin route for {method} {path}")

    # -- JobService

    def _create(self, parent: str, body: dict[str, Any], int_enums: bool = False) -> dict[str, Any]:
        """Validate and register a job, start its worker; return the job as created (PENDING)."""
        with self._lock:
            self._stats["create_calls"] += 1
            cfg = copy.deepcopy(self._config)
            if self._config.create_errors:
                code = self._config.create_errors.pop(0)
                self._stats["creates_rejected"] += 1
                raise _HttpError(code, f"Injected error {code} for this create call (emulator create_errors).")
            if cfg.create_quota is not None and self._stats["creates_accepted"] >= cfg.create_quota:
                self._stats["creates_rejected"] += 1
                project = parent.split("/")[1]
                raise _HttpError(429, (
                    "Quota exceeded for quota metric 'Batch prediction jobs' and limit 'Batch prediction "
                    "jobs per day per region' of service 'aiplatform.googleapis.com' for consumer "
                    f"'project:{project}' (limit {cfg.create_quota} per day)."))
        try:
            family, model_id, native_dim = _validate_create(body)
        except _HttpError:
            self._count("creates_rejected")
            raise
        now = time.time()
        with self._lock:
            self._stats["creates_accepted"] += 1
            name = f"{parent}/batchPredictionJobs/{next(self._ids)}"
            job = _Job(name=name, body=body, config=cfg, family=family, model_id=model_id,
                       native_dim=native_dim, create_time=now, update_time=now)
            self._jobs[name] = job
        created = job.resource(int_enums)
        job.thread = threading.Thread(target=self._run_job, args=(job,), name=f"vertex-job-{name[-6:]}",
                                      daemon=True)
        job.thread.start()
        log.info("created %s (%s, %s)", name, model_id, family)
        return created

    def _find(self, name: str) -> _Job:
        with self._lock:
            job = self._jobs.get(name)
        if job is None:
            raise _HttpError(404, f"BatchPredictionJob {name} not found.")
        return job

    def _cancel(self, name: str) -> None:
        self._count("cancel_calls")
        job = self._find(name)
        with job.lock:
            if job.state in TERMINAL_STATES:
                raise _HttpError(400, f"BatchPredictionJob {name} is in state {job.state} and cannot be "
                                      "cancelled. FAILED_PRECONDITION")
            job.cancel.set()
            job.state = "JOB_STATE_CANCELLING"
            job.update_time = time.time()

    def _list(self, parent: str, query: dict[str, list[str]], int_enums: bool) -> dict[str, Any]:
        self._count("list_calls")
        first = {k: v[0] for k, v in query.items() if v}
        try:
            size = int(first.get("pageSize") or 100)
            offset = int(first.get("pageToken") or 0)
        except ValueError as e:
            raise _HttpError(400, "pageSize and pageToken must be integers") from e
        size = max(1, min(size, 1000))
        matches = _filter_predicate(first.get("filter", ""))
        with self._lock:
            jobs = [j for j in self._jobs.values() if j.name.startswith(parent + "/")]
        chosen = [j.resource(int_enums) for j in jobs if matches(j)]
        page = chosen[offset:offset + size]
        out: dict[str, Any] = {"batchPredictionJobs": page}
        if offset + size < len(chosen):
            out["nextPageToken"] = str(offset + size)
        return out

    # -- workers

    def _set(self, job: _Job, state: str, *, error: dict[str, Any] | None = None) -> None:
        with job.lock:
            now = time.time()
            if state in TERMINAL_STATES:
                if job.cancel.is_set() and state != "JOB_STATE_EXPIRED":
                    state, error = "JOB_STATE_CANCELLED", {"code": CODE_CANCELLED, "message": "Job was cancelled."}
                job.end_time = now
            elif state == "JOB_STATE_RUNNING":
                if job.cancel.is_set():
                    return
                job.start_time = now
            job.state = state
            job.error = error
            job.update_time = now
        log.info("%s -> %s%s", job.name, state, f" ({error['message']})" if error else "")

    def _run_job(self, job: _Job) -> None:
        cfg = job.config
        try:
            if job.cancel.wait(cfg.pending_delay_s) if cfg.pending_delay_s else job.cancel.is_set():
                return self._set(job, "JOB_STATE_CANCELLED")
            if cfg.outcome == "EXPIRED":
                return self._set(job, "JOB_STATE_EXPIRED", error={
                    "code": CODE_DEADLINE_EXCEEDED,
                    "message": "Job expired: it was queued longer than the maximum queueing time."})
            self._set(job, "JOB_STATE_RUNNING")
            started = time.monotonic()
            try:
                self._execute(job)
                state, error = "JOB_STATE_SUCCEEDED", None
                if job.failed:
                    state = cfg.partial_state
                    total = job.successful + job.failed
                    if cfg.max_failed_ratio is not None and job.failed / total > cfg.max_failed_ratio:
                        state, error = "JOB_STATE_FAILED", {"code": CODE_INTERNAL, "message": (
                            f"Too many failed instances: {job.failed} of {total} "
                            f"(more than {cfg.max_failed_ratio:.0%}).")}
            except _JobError as e:
                state, error = "JOB_STATE_FAILED", {"code": e.code, "message": e.message}
            remaining = cfg.running_delay_s - (time.monotonic() - started)
            if remaining > 0 and not job.cancel.is_set():
                job.cancel.wait(remaining)
            self._set(job, state, error=error)
        except Exception as e:  # noqa: BLE001 - whatever breaks, the job must end FAILED, not hang
            log.exception("job %s crashed", job.name)
            self._set(job, "JOB_STATE_FAILED", error={"code": CODE_INTERNAL, "message": f"Internal error: {e}"})

    def _storage_client(self, cfg: EmulatorConfig):
        from reindex.emulators.gcs import anonymous_client

        return anonymous_client(self.gcs_host, cfg.gcs_project)

    def _embedder(self, cfg: EmulatorConfig) -> HashEmbedder | ModelEmbedder:
        if cfg.embedder == "hash":
            return self._hash_embedder
        with self._heavy_lock:
            if self._model_embedder is None or self._model_embedder.encoder.model_name != cfg.local_model:
                self._model_embedder = ModelEmbedder(cfg.local_model)
            return self._model_embedder

    def _token_counter(self, cfg: EmulatorConfig) -> RegexTokenCounter | ModelTokenCounter:
        kind = cfg.token_counter
        if kind == "auto":
            kind = "model" if cfg.embedder == "model" else "regex"
        if kind == "regex":
            return self._regex_counter
        with self._heavy_lock:
            if self._model_counter is None:
                self._model_counter = ModelTokenCounter(cfg.local_model)
            return self._model_counter

    def _resolve_inputs(self, client, uris: list[str]) -> list[Any]:
        from google.api_core import exceptions as gexc

        blobs = []
        for uri in uris:
            bucket_name, path = _split_gs(uri)
            bucket = client.bucket(bucket_name)
            try:
                if "*" in path or "?" in path:
                    prefix = re.split(r"[*?\[]", path, maxsplit=1)[0]
                    found = sorted((b for b in client.list_blobs(bucket_name, prefix=prefix)
                                    if fnmatch.fnmatchcase(b.name, path)), key=lambda b: b.name)
                    if not found:
                        raise _JobError(CODE_NOT_FOUND, f"No files match the input URI {uri}.")
                    blobs.extend(found)
                else:
                    blob = bucket.blob(path)
                    blob.reload()
                    blobs.append(blob)
            except gexc.NotFound as e:
                raise _JobError(CODE_NOT_FOUND, f"Input file {uri} not found.") from e
        return blobs

    def _execute(self, job: _Job) -> None:
        """Read, embed and write one job's instances; raises ``_JobError`` to fail the job."""
        cfg = job.config
        body = job.body
        client = self._storage_client(cfg)
        uris = body["inputConfig"]["gcsSource"]["uris"]
        prefix = body["outputConfig"]["gcsDestination"]["outputUriPrefix"].rstrip("/")
        out_bucket, out_path = _split_gs(prefix + "/")
        folder = f"{out_path}prediction-{job.model_id}-{_folder_stamp(job.create_time)}"
        with job.lock:
            job.output_dir = f"gs://{out_bucket}/{folder}"

        blobs = self._resolve_inputs(client, uris)
        total = sum(1 for _ in _iter_lines(blobs))
        limit = cfg.max_instances_gemini if job.family == "gemini" else cfg.max_instances_classic
        if limit is not None and total > limit:
            raise _JobError(CODE_INVALID_ARGUMENT, f"The job has {total} instances; {job.model_id} batch "
                                                   f"prediction accepts at most {limit} per job.")
        if job.family == "gemini" and cfg.max_input_bytes_gemini is not None:
            size = sum(b.size or 0 for b in blobs)
            if size > cfg.max_input_bytes_gemini:
                raise _JobError(CODE_INVALID_ARGUMENT, f"The input is {size} bytes; at most "
                                                       f"{cfg.max_input_bytes_gemini} bytes are accepted.")
        with job.lock:
            job.total = total

        embedder = self._embedder(cfg)
        counter = self._token_counter(cfg)
        params = body.get("modelParameters") or {}
        job_dim = job.native_dim
        requested = params.get("outputDimensionality", params.get("output_dimensionality"))
        if isinstance(embedder, ModelEmbedder):
            native = embedder.dim
            if job.family == "classic" and requested is not None and int(requested) != native:
                raise _JobError(CODE_INVALID_ARGUMENT, _dim_message(int(requested), native))
            job_dim = native
        else:
            job_dim = int(requested) if requested is not None else cfg.hash_dim
        auto_truncate = params.get("autoTruncate", params.get("auto_truncate", cfg.auto_truncate_default))

        if cfg.outcome == "FAILED" and cfg.fail_after_lines == 0:
            raise _JobError(cfg.fail_code, cfg.fail_message)

        bucket = client.bucket(out_bucket)
        predictions = _RollingSink(bucket, folder, "predictions", cfg.lines_per_file)
        errors = _RollingSink(bucket, folder, "errors", cfg.lines_per_file)
        completed = False
        try:
            block: list[_Item] = []
            for processed, raw in enumerate(_iter_lines(blobs), 1):
                if job.cancel.is_set() or (cfg.line_delay_s and job.cancel.wait(cfg.line_delay_s)):
                    break
                if job.family == "gemini":
                    item = self._gemini_item(raw, cfg, counter, embedder, bool(auto_truncate))
                else:
                    item = self._classic_item(raw, cfg, counter, job_dim, bool(auto_truncate))
                block.append(item)
                if len(block) >= cfg.embed_block_size:
                    self._flush(job, block, embedder, predictions, errors)
                    block = []
                if cfg.outcome == "FAILED" and processed >= cfg.fail_after_lines:
                    self._flush(job, block, embedder, predictions, errors)
                    raise _JobError(cfg.fail_code, cfg.fail_message)
            self._flush(job, block, embedder, predictions, errors)
            completed = not job.cancel.is_set()
        finally:
            predictions.close(truncate_last_line=completed and cfg.truncate_last_line)
            errors.close()

    # -- per line

    def _check_text(self, item: _Item, text: str, cfg: EmulatorConfig, counter, auto_truncate: bool,
                    extra: str = "") -> None:
        """Fill ``item.text/token_count/truncated`` or ``item.error`` for one text."""
        if _CONTROL_RE.search(text) or (extra and _CONTROL_RE.search(extra)):
            item.error = (400, FAULT_KINDS["invalid_characters"][1])
            return
        tokens = counter.count(text)
        limit = cfg.max_input_tokens
        if tokens > limit:
            if not auto_truncate:
                item.error = (400, FAULT_KINDS["too_long"][1].format(tokens=tokens, limit=limit))
                return
            text, tokens, item.truncated = counter.truncate(text, limit), limit, True
        item.text, item.token_count = text, tokens
        kind = next((k for marker, k in cfg.force_errors.items() if marker in text), None)
        if kind is None and cfg.error_rates:
            u, acc = _draw(cfg.seed, item.fault_key), 0.0
            for k in FAULT_KINDS:
                acc += cfg.error_rates.get(k, 0.0)
                if u < acc:
                    kind = k
                    break
        if kind in TRANSIENT_KINDS and cfg.transient_max_failures is not None:
            with self._lock:
                seen = self._transient_failures.get(item.fault_key, 0)
                if seen >= cfg.transient_max_failures:
                    kind = None
                else:
                    self._transient_failures[item.fault_key] = seen + 1
        if kind is not None:
            code, template = FAULT_KINDS[kind]
            item.error = (code, template.format(tokens=max(tokens, limit + 1), limit=limit))

    def _classic_item(self, raw: bytes, cfg: EmulatorConfig, counter, dim: int, auto_truncate: bool) -> _Item:
        try:
            obj = _loads(raw)
        except ValueError as e:
            text = raw.decode("utf-8", "replace")
            return _Item(fault_key=text, echo=text, error=(400, str(e)))
        item = _Item(fault_key=_canonical(obj), echo=obj, dim=dim)
        content = obj.get("content") if isinstance(obj, dict) else None
        if not isinstance(content, str):
            item.error = (400, "Invalid instance: expected a JSON object with a string field 'content'.")
            return item
        task_type, title = obj.get("task_type"), obj.get("title")
        if task_type is not None and task_type not in TASK_TYPES:
            item.error = (400, f"Invalid task_type {task_type!r}.")
        elif title is not None and not isinstance(title, str):
            item.error = (400, "Invalid instance: 'title' must be a string.")
        elif not content.strip():
            item.error = (400, "Invalid instance: 'content' is empty.")
        else:
            item.salt = f"{task_type or ''}\x00{title or ''}"
            self._check_text(item, content, cfg, counter, auto_truncate, extra=title or "")
        return item

    def _gemini_item(self, raw: bytes, cfg: EmulatorConfig, counter, embedder, auto_truncate: bool) -> _Item:
        try:
            obj = _loads(raw)
        except ValueError as e:
            text = raw.decode("utf-8", "replace")
            return _Item(fault_key=text, echo=text, error=(400, str(e)))
        if not isinstance(obj, dict):
            return _Item(fault_key=_canonical(obj), echo=obj, error=(400, "Invalid row: expected a JSON object."))
        key, request = obj.get("key"), obj.get("request")
        item = _Item(fault_key=key if isinstance(key, str) else _canonical(obj), echo=request, key=key)
        if not isinstance(key, str) or not key:
            item.error = (400, "Invalid row: 'key' must be a non-empty string.")
            return item
        content = request.get("content") if isinstance(request, dict) else None
        parts = content.get("parts") if isinstance(content, dict) else None
        texts = [p["text"] for p in parts or () if isinstance(p, dict) and isinstance(p.get("text"), str)]
        if not texts:
            item.error = (400, "Invalid request: 'request.content.parts[].text' is required.")
            return item
        conf = request.get("embed_content_config", request.get("embedContentConfig")) or {}
        if not isinstance(conf, dict):
            item.error = (400, "Invalid request: 'embed_content_config' must be an object.")
            return item
        dim = conf.get("output_dimensionality", conf.get("outputDimensionality"))
        task_type = conf.get("task_type", conf.get("taskType"))
        title = conf.get("title")
        truncate = conf.get("auto_truncate", conf.get("autoTruncate", auto_truncate))
        if dim is not None and (not isinstance(dim, int | float) or int(dim) != dim
                                or not 1 <= dim <= GEMINI_MODELS["gemini-embedding-001"]):
            item.error = (400, f"Invalid output_dimensionality {dim!r}: must be an integer in 1..3072.")
            return item
        if isinstance(embedder, ModelEmbedder):
            if dim is not None and int(dim) != embedder.dim:
                raise _JobError(CODE_INVALID_ARGUMENT, _dim_message(int(dim), embedder.dim))
            item.dim = embedder.dim
        else:
            item.dim = int(dim) if dim is not None else cfg.hash_dim
        if task_type is not None and task_type not in TASK_TYPES:
            item.error = (400, f"Invalid task_type {task_type!r}.")
            return item
        item.salt = f"{task_type or ''}\x00{title or ''}"
        self._check_text(item, "\n".join(texts), cfg, counter, bool(truncate),
                         extra=title if isinstance(title, str) else "")
        return item

    def _flush(self, job: _Job, block: list[_Item], embedder, predictions: _RollingSink,
               errors: _RollingSink) -> None:
        if not block:
            return
        cfg = job.config
        ok = [i for i in block if i.error is None]
        vectors: dict[int, np.ndarray] = {}
        for dim in sorted({i.dim for i in ok}):
            members = [i for i in ok if i.dim == dim]
            embedded = embedder.embed([i.text for i in members], [i.salt for i in members], dim)
            for i, vec in zip(members, embedded, strict=True):
                vectors[id(i)] = vec
        n_ok = n_failed = 0
        dump = orjson.dumps
        for item in block:
            if job.family == "gemini":
                if item.error is None:
                    line = {"key": item.key, "request": item.echo,
                            "response": {"embedding": {"values": vectors[id(item)]}}}
                    predictions.write(dump(line, option=orjson.OPT_SERIALIZE_NUMPY))
                    n_ok += 1
                else:
                    line = {"key": item.key, "request": item.echo,
                            "status": {"code": item.error[0], "message": item.error[1]}}
                    (errors if cfg.gemini_failures_in_errors_file else predictions).write(dump(line))
                    n_failed += 1
            elif item.error is None:
                line = {"instance": item.echo, "predictions": [{"embeddings": {
                    "values": vectors[id(item)],
                    "statistics": {"token_count": item.token_count, "truncated": item.truncated}}}],
                    "status": ""}
                predictions.write(dump(line, option=orjson.OPT_SERIALIZE_NUMPY))
                n_ok += 1
            else:
                code, message = item.error
                errors.write(dump({"instance": item.echo, "error": {"code": code, "message": message},
                                   "status": message}))
                if cfg.classic_failures_in_predictions:
                    predictions.write(dump({"instance": item.echo, "predictions": [], "status": message}))
                n_failed += 1
        with job.lock:
            job.successful += n_ok
            job.failed += n_failed
        self._count("lines_processed", len(block))


def _json_body(body: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(body or b"{}")
    except ValueError as e:
        raise _HttpError(400, f"Invalid JSON payload received: {e}") from e
    if not isinstance(obj, dict):
        raise _HttpError(400, "Invalid JSON payload received: expected an object.")
    return obj


def _error_payload(status: int, message: str) -> dict[str, Any]:
    return {"error": {"code": status, "message": message, "status": HTTP_STATUS_NAMES.get(status, "UNKNOWN")}}


def _validate_create(body: dict[str, Any]) -> tuple[str, str, int]:
    """(family, model id, native dim) of a valid create body; ``_HttpError`` 400/404 otherwise."""
    def bad(msg: str) -> _HttpError:
        return _HttpError(400, msg)

    if not isinstance(body.get("displayName"), str) or not body["displayName"]:
        raise bad("BatchPredictionJob.display_name must be set.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("BatchPredictionJob.model must be set.")
    resolved = _model_family(model)
    if resolved is None:
        raise _HttpError(404, f"Publisher Model `{model}` not found (the emulator serves text-embedding "
                              f"models and gemini-embedding-001).")
    family, model_id, native = resolved
    inp = body.get("inputConfig") or {}
    if inp.get("bigquerySource"):
        raise bad("The emulator reads JSONL from Cloud Storage only (inputConfig.gcsSource).")
    if inp.get("instancesFormat") != "jsonl":
        raise bad(f"instancesFormat {inp.get('instancesFormat')!r} is not supported; use 'jsonl'.")
    uris = (inp.get("gcsSource") or {}).get("uris")
    if not isinstance(uris, list) or not uris:
        raise bad("inputConfig.gcsSource.uris must list at least one gs:// URI.")
    out = body.get("outputConfig") or {}
    if out.get("predictionsFormat") != "jsonl":
        raise bad(f"predictionsFormat {out.get('predictionsFormat')!r} is not supported; use 'jsonl'.")
    prefix = (out.get("gcsDestination") or {}).get("outputUriPrefix")
    try:
        for uri in [*uris, prefix]:
            _split_gs(uri)
    except ValueError as e:
        raise bad(str(e)) from e
    params = body.get("modelParameters")
    if params is not None and not isinstance(params, dict):
        raise bad("modelParameters must be an object.")
    if family == "classic" and params:
        dim = params.get("outputDimensionality", params.get("output_dimensionality"))
        if dim is not None and (not isinstance(dim, int | float) or int(dim) != dim or not 1 <= dim <= native):
            raise bad(f"modelParameters.outputDimensionality must be an integer in 1..{native}, not {dim!r}.")
        truncate = params.get("autoTruncate", params.get("auto_truncate"))
        if truncate is not None and not isinstance(truncate, bool):
            raise bad("modelParameters.autoTruncate must be a boolean.")
    return family, model_id, native


def _filter_predicate(text: str):
    """A predicate for the ``filter`` of list: ``field=value`` clauses joined by AND
    (fields: state, display_name, model, labels.<key>)."""
    clauses = [c for c in re.split(r"\s+AND\s+", text.strip(), flags=re.IGNORECASE) if c]
    tests = []
    for clause in clauses:
        m = _FILTER_RE.match(clause)
        if not m:
            raise _HttpError(400, f"Unsupported filter clause {clause!r}.")
        fld, value = m.group(1), m.group(2) if m.group(2) is not None else m.group(3)
        if fld == "state":
            tests.append(lambda j, v=value: j.state == v)
        elif fld in ("display_name", "displayName"):
            tests.append(lambda j, v=value: j.body.get("displayName") == v)
        elif fld == "model":
            tests.append(lambda j, v=value: j.body.get("model") == v)
        elif fld.startswith("labels."):
            tests.append(lambda j, k=fld[7:], v=value: (j.body.get("labels") or {}).get(k) == v)
        else:
            raise _HttpError(400, f"Unsupported filter field {fld!r}.")
    return lambda job: all(t(job) for t in tests)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "VertexEmulator/1.0"
    emulator: VertexEmulator

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:  # noqa: N802
        self._dispatch("PATCH")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        log.debug("%s %s", self.address_string(), format % args)

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        try:
            status, payload = self.emulator.route(method, unquote(url.path), parse_qs(url.query), body)
        except Exception as e:  # noqa: BLE001 - answer 500 rather than drop the connection
            log.exception("emulator error on %s %s", method, self.path)
            status, payload = 500, _error_payload(500, f"Emulator error: {e}")
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


# ------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m reindex.emulators.vertex",
                                     description="Vertex AI batch-prediction emulator for embedding jobs.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8790)
    parser.add_argument("--gcs-host", default=None,
                        help="storage endpoint, e.g. http://127.0.0.1:9023 (default: $STORAGE_EMULATOR_HOST)")
    parser.add_argument("--start-gcs", action="store_true",
                        help="also start an in-memory GCS emulator in this process (on --gcs-port)")
    parser.add_argument("--gcs-port", type=int, default=9023)
    parser.add_argument("--embedder", choices=["model", "hash"], default=None,
                        help="'model' (bundled local model, default) or 'hash' (tests only)")
    parser.add_argument("--hash-dim", type=int, default=None)
    parser.add_argument("--config", default=None,
                        help=f"JSON object or JSON file of EmulatorConfig fields (default: ${CONFIG_ENV})")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    config = EmulatorConfig.from_env()
    if args.config:
        raw = args.config
        if not raw.lstrip().startswith("{"):
            with open(raw, encoding="utf-8") as f:
                raw = f.read()
        config = config.merged(json.loads(raw))
    overrides = {k: v for k, v in (("embedder", args.embedder), ("hash_dim", args.hash_dim)) if v is not None}
    config = config.merged(overrides)

    stop_gcs = None
    gcs_host = args.gcs_host or os.environ.get("STORAGE_EMULATOR_HOST")
    if args.start_gcs:
        from reindex.emulators.gcs import start_gcs_emulator

        gcs_host, stop_gcs = start_gcs_emulator(args.host, args.gcs_port, set_env=False)
        print(f"GCS emulator on {gcs_host}", flush=True)
    emulator = VertexEmulator(config, host=args.host, port=args.port, gcs_host=gcs_host).start()
    print(f"Vertex emulator on {emulator.endpoint} (embedder={config.embedder}, gcs={gcs_host or 'real GCS'})",
          flush=True)
    from reindex.emulators.gcs import serve_until_stopped

    serve_until_stopped(emulator.stop, *([stop_gcs] if stop_gcs else []))


if __name__ == "__main__":
    main()
