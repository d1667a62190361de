"""Local encoding with sentence-transformers (CPU, or CUDA when present).

torch and sentence-transformers are imported on first use, never at import time.

``LocalEncoder.encode`` gives the vectors of ``SentenceTransformer.encode`` (same preprocessing,
forward pass, pooling and normalisation — the model's own ``preprocess`` and ``__call__``), faster:

* batches are formed by **token** count, not character count: sentence-transformers sorts by
  characters, a poor proxy for mixed Russian/English text (Cyrillic takes several times more
  word pieces per character in an English vocabulary), so its batches pad short inputs to long
  ones. Token-sorted batches pad far less. A vector then differs from plain ``encode()`` only by
  the padding it was computed with (float rounding, max abs difference ~1e-7);
* on CUDA the next batch is tokenized in a background thread while the GPU runs the current one,
  and ``precision="fp16"`` runs the model in half precision. fp16 changes the numerics, so it is
  part of the ``ModelSpec`` (``precision``) and so of the model checksum; CPU always runs fp32.

``encoder`` chooses what runs the forward pass (``reindex.config.Encoder``): ``torch`` (the model itself), or
the model exported once to ONNX and run by ONNX Runtime or OpenVINO (``reindex.embeddings.runtimes``: the
export cache, the runtimes). Tokenization, batching, truncation and normalisation stay the same; the runtime
and its precision are in the ``ModelSpec`` (``runtime``, ``precision``) and so in the model checksum.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from reindex.config import DEFAULT_MODEL, Encoder
from reindex.errors import ConfigError
from reindex.models import ModelSpec, model_id_for, model_revision, offline_hub, resolve_model_path
from reindex.prefetch import prefetched

log = logging.getLogger(__name__)


def auto_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


PRECISIONS = ("fp32", "fp16")


@functools.lru_cache(maxsize=4)
def _load(path: str, device: str, precision: str = "fp32"):
    offline_hub()
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(path, device=device, local_files_only=True)
    if precision == "fp16":
        model.half()
    return model


@functools.lru_cache(maxsize=4)
def _load_for_runtime(path: str, encoder: str, model_id: str, normalize: bool):
    """``(model, forward, export, torch_spec)`` of an exported runtime. The sentence-transformers model keeps
    tokenizing (its own ``preprocess``); once the export exists its weights are dropped (moved to the ``meta``
    device), so the process holds them once, in the runtime. ``torch_spec`` is the fp32 torch model the export
    was made from: its checksum keys the export cache."""
    from reindex.embeddings import runtimes

    model = _load_fresh(path)
    torch_spec = spec_of(model, model_id, Path(path), normalize=normalize, precision="fp32", runtime="torch")
    runtime = runtimes.runtime_for(encoder)
    export = runtimes.ensure_export(model, torch_spec.checksum, openvino=runtime.name == "openvino")
    forward = runtimes.forward_for(runtime, export)
    model.to("meta")
    return model, forward, export, torch_spec


def _load_fresh(path: str):
    offline_hub()
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path, device="cpu", local_files_only=True)


def spec_of(model, model_id: str, path: Path, *, normalize: bool, precision: str, runtime: str) -> ModelSpec:
    """The ``ModelSpec`` of a loaded sentence-transformers ``model`` read from ``path``."""
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    dim = getter()
    if not dim:
        raise ConfigError(f"model {model_id!r} does not declare its embedding dimension")
    return ModelSpec(model_id=model_id, revision=model_revision(path), dim=int(dim), normalized=normalize,
                     backend=LocalEncoder.backend, precision=precision, max_seq_length=model.max_seq_length,
                     runtime=runtime)


def _directory_fingerprint(path: Path) -> str:
    """Every file under a model directory by name, size and modification time: what a cached spec stands for
    (a changed, added or removed file gives another fingerprint). Metadata only, nothing is read."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def spec_cache_dir() -> Path:
    """Where computed model specs are kept: ``specs/`` beside the encoder export cache (``REINDEX_ENCODER_CACHE``,
    default ``~/.cache/reindex/encoders``)."""
    from reindex.embeddings.runtimes import cache_root

    return cache_root().parent / "specs"


def cached_spec(path: Path, options: tuple, compute) -> ModelSpec:
    """``compute()`` (load the model, hash its files: seconds and hundreds of MiB) once per model directory state
    and ``options``; later calls read the spec back while every file of the directory has the size and mtime it
    had. A cache that cannot be read or written is skipped (the spec is computed)."""
    key = hashlib.sha256(json.dumps([str(path), list(options), _directory_fingerprint(path)]).encode()).hexdigest()
    file = spec_cache_dir() / f"{key[:32]}.json"
    try:
        return ModelSpec(**{k: v for k, v in json.loads(file.read_text(encoding="utf-8")).items() if k != "checksum"})
    except (OSError, ValueError, TypeError):
        pass
    spec = compute()
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(spec.to_dict()), encoding="utf-8")
        os.replace(tmp, file)
    except OSError as e:
        log.info("model spec not cached (%s): it is computed again next time", e)
    return spec


class LocalEncoder:
    """A sentence-transformers model that encodes texts into (normalised) float32 vectors."""

    backend = "local"

    def __init__(self, model: str = DEFAULT_MODEL, *, batch_size: int = 64, device: str | None = None,
                 normalize: bool = True, precision: str = "fp32", sort_by_tokens: bool = True,
                 encoder: str = Encoder.TORCH.value) -> None:
        from reindex.embeddings.runtimes import runtime_for

        self.runtime = runtime_for(encoder)
        self.encoder = Encoder(encoder)
        if self.runtime.name != "torch":
            if precision != "fp32":
                raise ConfigError(f"precision {precision!r} is torch's (CUDA); encoder={self.encoder.value} runs "
                                  f"{self.runtime.precision}")
            if device is not None and str(device) != "cpu":
                raise ConfigError(f"encoder={self.encoder.value} runs on the CPU; device {device!r} needs "
                                  "encoder=torch")
        if precision not in PRECISIONS:
            raise ConfigError(f"precision {precision!r} is not supported: choose one of {list(PRECISIONS)}")
        if precision != "fp32" and device is not None and not str(device).startswith("cuda"):
            raise ConfigError(f"precision {precision!r} needs a CUDA device; {device} runs fp32")
        self.model_name = model
        self.path = resolve_model_path(model)
        self.batch_size = batch_size
        self.device = device
        self.normalize = normalize
        self.precision = precision
        self.sort_by_tokens = sort_by_tokens

    @functools.cached_property
    def model(self):
        if self.runtime.name != "torch":
            return self._runtime[0]
        device = self.device or auto_device()
        if self.precision != "fp32" and not device.startswith("cuda"):
            raise ConfigError(f"precision {self.precision!r} needs a CUDA device; {device} runs fp32")
        log.info("loading %s from %s on %s (%s)", self.model_name, self.path, device, self.precision)
        return _load(str(self.path), device, self.precision)

    @functools.cached_property
    def _runtime(self):
        """``(tokenizing model, forward, export, torch_spec)`` of an exported runtime (exported on first use)."""
        log.info("loading %s from %s with encoder=%s", self.model_name, self.path, self.encoder.value)
        return _load_for_runtime(str(self.path), self.encoder.value, model_id_for(self.model_name), self.normalize)

    @property
    def export(self):
        """The cached export this encoder runs (``runtimes.Export``); None for ``encoder=torch``."""
        return None if self.runtime.name == "torch" else self._runtime[2]

    @functools.cached_property
    def spec(self) -> ModelSpec:
        """The model's identity. Read from the spec cache while the model directory's files are as they were
        when it was computed (see ``cached_spec``): a task that only needs the spec (``prepare``) neither loads
        the weights nor hashes them."""
        return cached_spec(self.path, (model_id_for(self.model_name), self.normalize, self.precision,
                                       self.encoder.value), self._spec)

    def _spec(self) -> ModelSpec:
        if self.runtime.name == "torch":
            return spec_of(self.model, model_id_for(self.model_name), self.path, normalize=self.normalize,
                           precision=self.precision, runtime="torch")
        torch_spec = self._runtime[3]
        return replace(torch_spec, precision=self.runtime.precision, runtime=self.runtime.name)

    def encode(self, texts: list[str]) -> np.ndarray:
        """Vectors for ``texts`` as a float32 array of shape (len(texts), dim)."""
        if not texts:
            return np.empty((0, self.spec.dim), dtype=np.float32)
        if self.runtime.name != "torch":
            return self._encode_runtime(texts)
        if not self.sort_by_tokens or len(texts) <= 1:
            vectors = self.model.encode(
                texts, batch_size=self.batch_size, normalize_embeddings=self.normalize,
                convert_to_numpy=True, show_progress_bar=False,
            )
            return np.asarray(vectors, dtype=np.float32)
        return self._encode_sorted(texts)

    def token_lengths(self, texts: list[str]) -> np.ndarray:
        """Tokens per text as the model will see them (special tokens included, truncated to its limit)."""
        tokenizer = self.model.tokenizer
        limit = self.model.max_seq_length
        enc = tokenizer(texts, add_special_tokens=True, truncation=limit is not None, max_length=limit,
                        return_attention_mask=False, return_token_type_ids=False)
        return np.fromiter((len(ids) for ids in enc["input_ids"]), dtype=np.int64, count=len(texts))

    def _encode_runtime(self, texts: list[str]) -> np.ndarray:
        """Token-length-sorted batches: the model's own preprocess, then the exported runtime's forward pass.
        A runtime with several streams (OpenVINO) runs that many batches at once while the next is tokenized
        here; fewer texts than that many batches are split so every stream has some."""
        model, forward = self._runtime[:2]
        order = np.argsort(-self.token_lengths(texts), kind="stable") if self.sort_by_tokens else np.arange(len(texts))
        resolve = getattr(model, "_resolve_prompt", None)
        prompt = resolve(None, None) if resolve else None
        dim = self.spec.dim
        out = np.empty((len(texts), dim), dtype=np.float32)
        size = max(1, min(self.batch_size, -(-len(texts) // forward.streams)))

        def batches():
            for i in range(0, len(order), size):
                idx = order[i:i + size]
                feats = model.preprocess([texts[j] for j in idx], prompt=prompt)
                yield idx, {k: v.numpy() for k, v in feats.items() if hasattr(v, "numpy")}

        filled: list[int] = []

        def put(idx, emb: np.ndarray) -> None:
            out[idx] = emb[..., :dim]  # truncate_dim, when the model has one
            filled.append(len(idx))

        forward.run_all(batches(), put)
        if sum(filled) != len(texts):  # rows left unset must never be returned as vectors
            raise RuntimeError(f"encoder={self.encoder.value} returned vectors for {sum(filled)} of {len(texts)} "
                               "texts")
        if self.normalize:
            # as torch.nn.functional.normalize: x / max(||x||, 1e-12)
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    def _encode_sorted(self, texts: list[str]) -> np.ndarray:
        """Token-length-sorted batches through the model's own preprocess → forward → pooling."""
        import torch

        model = self.model
        order = np.argsort(-self.token_lengths(texts), kind="stable")
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        device = model.device
        resolve = getattr(model, "_resolve_prompt", None)
        prompt = resolve(None, None) if resolve else None  # the model's default prompt, as encode() applies it
        truncate_dim = getattr(model, "truncate_dim", None)

        def features(idx):
            feats = model.preprocess([texts[i] for i in idx], prompt=prompt)
            return {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in feats.items()}

        out = np.empty((len(texts), self.spec.dim), dtype=np.float32)
        model.eval()
        with torch.inference_mode():
            for idx, feats in _ahead(batches, features, threaded=device.type == "cuda"):
                emb = model(feats)["sentence_embedding"]
                if truncate_dim:
                    emb = emb[..., :truncate_dim]
                if self.normalize:
                    emb = torch.nn.functional.normalize(emb, p=2, dim=1)
                out[idx] = emb.float().cpu().numpy()
        return out


def _ahead(items, prepare, *, threaded: bool):
    """``(item, prepare(item))`` in order; with ``threaded`` the next item is prepared in a background
    thread while the caller works on the current one (tokenizing ahead of the GPU)."""
    pairs = ((item, prepare(item)) for item in items)
    return prefetched(pairs, 0, name="reindex-tokenize") if threaded else pairs


