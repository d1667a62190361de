"""The emulator's behaviour: ``EmulatorConfig`` (validated) and the per-line fault kinds it can inject."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from reindex.emulators.vertex.jobs import CODE_INTERNAL
from reindex.vertex.formats import (
    CLASSIC_MAX_PROMPTS_PER_JOB,
    GEMINI_MAX_BYTES_PER_JOB,
    GEMINI_MAX_ROWS_PER_JOB,
    MAX_TOKENS_PER_TEXT,
)

CONFIG_ENV = "VERTEX_EMULATOR_CONFIG"

# Fault kinds that can be injected per line: (HTTP-style code, message template).
FAULT_KINDS: dict[str, tuple[int, str]] = {
    "too_long": (400, "Text too long: {tokens} tokens > {limit}"),
    "invalid_characters": (400, "Invalid characters in content"),
    "rate_limited": (429, "Resource exhausted: rate limit of requests per minute for this base model "
                          "reached; retry later. RESOURCE_EXHAUSTED"),
    "unavailable": (503, "The service is currently unavailable. UNAVAILABLE"),
}
TRANSIENT_KINDS = frozenset({"rate_limited", "unavailable"})


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
    max_input_tokens: int = MAX_TOKENS_PER_TEXT
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
    max_instances_classic: int | None = CLASSIC_MAX_PROMPTS_PER_JOB
    max_instances_gemini: int | None = GEMINI_MAX_ROWS_PER_JOB
    max_input_bytes_gemini: int | None = GEMINI_MAX_BYTES_PER_JOB
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
