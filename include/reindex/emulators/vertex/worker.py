"""Running one emulated batch job: its life cycle, every input line checked, embedded and written out."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from reindex.emulators.vertex.config import FAULT_KINDS, TRANSIENT_KINDS, EmulatorConfig
from reindex.emulators.vertex.embedders import (
    HashEmbedder,
    ModelEmbedder,
    ModelTokenCounter,
    RegexTokenCounter,
    dim_message,
)
from reindex.emulators.vertex.jobs import (
    CODE_CANCELLED,
    CODE_DEADLINE_EXCEEDED,
    CODE_INTERNAL,
    CODE_INVALID_ARGUMENT,
    TERMINAL_STATES,
    Job,
    JobError,
)
from reindex.emulators.vertex.storage import RollingSink, folder_stamp, iter_lines, resolve_inputs
from reindex.vertex.formats import GEMINI_DIM, TASK_TYPES
from reindex.vertex.gcs import split_gs_uri

log = logging.getLogger(__name__)

_CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


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


class JobRunner:
    """Runs jobs, each in its own thread (``run``): PENDING, RUNNING, then a terminal state; reads the
    input objects, checks, embeds and writes every line.

    ``lock`` is the emulator's lock: it guards ``transient_failures`` (the injected 429/503 per line
    key, cleared by the emulator's reset) as it guards the emulator's counters, to which
    ``count(key, n)`` adds; ``storage_client(cfg)`` gives the storage client a job reads and writes with.
    """

    def __init__(self, *, lock: threading.Lock, count: Callable[[str, int], None],
                 storage_client: Callable[[EmulatorConfig], Any]) -> None:
        self._lock = lock
        self._count = count
        self._storage_client = storage_client
        self.transient_failures: dict[str, int] = {}
        self._model_embedder: ModelEmbedder | None = None
        self._model_counter: ModelTokenCounter | None = None
        self._hash_embedder = HashEmbedder()
        self._regex_counter = RegexTokenCounter()
        self._heavy_lock = threading.Lock()

    def _set(self, job: Job, state: str, *, error: dict[str, Any] | None = None) -> None:
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

    def run(self, job: Job) -> None:
        """Run ``job`` to a terminal state (its thread's target); whatever breaks ends it FAILED."""
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
            except JobError as e:
                state, error = "JOB_STATE_FAILED", {"code": e.code, "message": e.message}
            remaining = cfg.running_delay_s - (time.monotonic() - started)
            if remaining > 0 and not job.cancel.is_set():
                job.cancel.wait(remaining)
            self._set(job, state, error=error)
        except Exception as e:  # noqa: BLE001 - whatever breaks, the job must end FAILED, not hang
            log.exception("job %s crashed", job.name)
            self._set(job, "JOB_STATE_FAILED", error={"code": CODE_INTERNAL, "message": f"Internal error: {e}"})

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

    def _execute(self, job: Job) -> None:
        """Read, embed and write one job's instances; raises ``JobError`` to fail the job."""
        cfg = job.config
        body = job.body
        client = self._storage_client(cfg)
        uris = body["inputConfig"]["gcsSource"]["uris"]
        prefix = body["outputConfig"]["gcsDestination"]["outputUriPrefix"].rstrip("/")
        out_bucket, out_path = split_gs_uri(prefix + "/")
        folder = f"{out_path}prediction-{job.model_id}-{folder_stamp(job.create_time)}"
        with job.lock:
            job.output_dir = f"gs://{out_bucket}/{folder}"

        blobs = resolve_inputs(client, uris)
        total = sum(1 for _ in iter_lines(blobs))
        limit = cfg.max_instances_gemini if job.family == "gemini" else cfg.max_instances_classic
        if limit is not None and total > limit:
            raise JobError(CODE_INVALID_ARGUMENT, f"The job has {total} instances; {job.model_id} batch "
                                                   f"prediction accepts at most {limit} per job.")
        if job.family == "gemini" and cfg.max_input_bytes_gemini is not None:
            size = sum(b.size or 0 for b in blobs)
            if size > cfg.max_input_bytes_gemini:
                raise JobError(CODE_INVALID_ARGUMENT, f"The input is {size} bytes; at most "
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
                raise JobError(CODE_INVALID_ARGUMENT, dim_message(int(requested), native))
            job_dim = native
        else:
            job_dim = int(requested) if requested is not None else cfg.hash_dim
        auto_truncate = params.get("autoTruncate", params.get("auto_truncate", cfg.auto_truncate_default))

        if cfg.outcome == "FAILED" and cfg.fail_after_lines == 0:
            raise JobError(cfg.fail_code, cfg.fail_message)

        bucket = client.bucket(out_bucket)
        predictions = RollingSink(bucket, folder, "predictions", cfg.lines_per_file)
        errors = RollingSink(bucket, folder, "errors", cfg.lines_per_file)
        completed = False
        try:
            block: list[_Item] = []
            for processed, raw in enumerate(iter_lines(blobs), 1):
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
                    raise JobError(cfg.fail_code, cfg.fail_message)
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
                seen = self.transient_failures.get(item.fault_key, 0)
                if seen >= cfg.transient_max_failures:
                    kind = None
                else:
                    self.transient_failures[item.fault_key] = seen + 1
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
                                or not 1 <= dim <= GEMINI_DIM):
            item.error = (400, f"Invalid output_dimensionality {dim!r}: must be an integer in 1..3072.")
            return item
        if isinstance(embedder, ModelEmbedder):
            if dim is not None and int(dim) != embedder.dim:
                raise JobError(CODE_INVALID_ARGUMENT, dim_message(int(dim), embedder.dim))
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

    def _flush(self, job: Job, block: list[_Item], embedder, predictions: RollingSink,
               errors: RollingSink) -> None:
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
