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
  {"code", "message"}}``. *Choice:* the Google facts this project relies on document only the input; like Vertex's Gemini
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

Layout: ``config`` (``EmulatorConfig``, fault kinds), ``jobs`` (job states, ``google.rpc`` codes, the
job resource, which models are served), ``embedders`` (embedders and token counters), ``storage``
(input objects read as lines, output files written in rolls), ``worker`` (``JobRunner``: one job's
life cycle and its lines), ``server`` (``VertexEmulator`` and its HTTP front), ``cli`` (the command).
The Vertex model tables, task types and job limits come from ``reindex.vertex.formats``.
"""

from __future__ import annotations

from reindex.emulators.vertex.config import CONFIG_ENV, FAULT_KINDS, TRANSIENT_KINDS, EmulatorConfig
from reindex.emulators.vertex.embedders import (
    HashEmbedder,
    ModelEmbedder,
    ModelTokenCounter,
    RegexTokenCounter,
)
from reindex.emulators.vertex.jobs import JOB_STATES, TERMINAL_STATES
from reindex.emulators.vertex.server import VertexEmulator

__all__ = [
    "CONFIG_ENV",
    "FAULT_KINDS",
    "JOB_STATES",
    "TERMINAL_STATES",
    "TRANSIENT_KINDS",
    "EmulatorConfig",
    "HashEmbedder",
    "ModelEmbedder",
    "ModelTokenCounter",
    "RegexTokenCounter",
    "VertexEmulator",
]
