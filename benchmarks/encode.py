"""Benchmark 2: local encoding — plain ``SentenceTransformer.encode()`` vs ``reindex``'s ``LocalEncoder``.

The same texts (Russian and English halves, 40–1,200 characters, log-uniform lengths, built from the
sample corpus's sentences) go through, each method in its own subprocess after a warm-up batch:

* ``plain``     ``SentenceTransformer(path).encode(texts, batch_size=B, normalize_embeddings=True)`` — one
                call over all texts (its best case: it length-sorts the whole list);
* ``project``   ``LocalEncoder(...).encode`` called the way ``pipeline.encode_partition`` calls it, on blocks
                of ``max(8·B, 512)`` texts;
* ``forward``   the ceiling: the model's forward pass alone on pre-tokenized (untimed), token-length-sorted
                batches of B.

With ``--device cuda`` the same three run on the GPU, plus ``project`` and ``forward`` in fp16
(``precision="fp16"``: a different ``ModelSpec.precision``, so a different model checksum).
Vectors of ``project`` are compared with ``plain`` (max abs difference; fp32 must stay ≤ 1e-5).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from benchmarks.common import bench_dir, peak_rss_mib, run_worker

log = logging.getLogger("benchmarks.encode")


def _texts(n: int, seed: int) -> list[str]:
    from benchmarks.texts import make_texts

    return make_texts(n, seed=seed, min_chars=40, max_chars=1200)


def worker(p: dict) -> dict:
    import torch

    from reindex.embeddings.local import LocalEncoder

    logging.basicConfig(level=logging.WARNING)
    texts = _texts(p["texts"], p["seed"])
    device, batch = p["device"], p["batch_size"]
    precision = p.get("precision", "fp32")
    enc = LocalEncoder(p.get("model", "default"), batch_size=batch, device=device, precision=precision)
    model = enc.model
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    warm = texts[:batch]
    out: dict = {"method": p["method"], "device": device, "precision": precision, "texts": len(texts),
                 "model_checksum": enc.spec.checksum}
    if device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(0)
    out["torch_threads"] = torch.get_num_threads()
    lengths = enc.token_lengths(texts)
    out["tokens"] = int(lengths.sum())
    if p["method"] == "plain":
        model.encode(warm, batch_size=batch, normalize_embeddings=True)
        sync()
        t0 = time.perf_counter()
        vectors = model.encode(texts, batch_size=batch, normalize_embeddings=True, convert_to_numpy=True,
                               show_progress_bar=False)
        sync()
    elif p["method"] == "project":
        enc.encode(warm)
        sync()
        block = max(batch * 8, 512)
        t0 = time.perf_counter()
        vectors = np.concatenate([enc.encode(texts[i:i + block]) for i in range(0, len(texts), block)])
        sync()
    elif p["method"] == "forward":
        order = np.argsort(-lengths, kind="stable")
        feats = []
        for i in range(0, len(order), batch):
            f = model.preprocess([texts[j] for j in order[i:i + batch]])
            feats.append({k: v.to(model.device) if hasattr(v, "to") else v for k, v in f.items()})
        vectors = None
        with torch.inference_mode():
            model(feats[-1])
            sync()
            t0 = time.perf_counter()
            for f in feats:
                model(f)["sentence_embedding"]
            sync()
    else:
        raise ValueError(p["method"])
    seconds = time.perf_counter() - t0
    out.update(seconds=round(seconds, 3), texts_per_s=round(len(texts) / seconds, 1), rss_mib=round(peak_rss_mib(), 1))
    if vectors is not None and p.get("save"):
        np.save(p["save"], np.asarray(vectors, dtype=np.float32))
    return out


def run(data_dir: Path, *, texts: int = 2000, seed: int = 1, device: str = "cpu", batch_size: int = 64,
        fp16: bool | None = None, repeat: int = 1) -> dict:
    """Each method ``repeat`` times, alternating; the fastest run of each is kept (shared machine)."""
    import os

    work = bench_dir(data_dir) / "encode"
    work.mkdir(parents=True, exist_ok=True)
    base = {"texts": texts, "seed": seed, "device": device, "batch_size": batch_size}
    cuda = device.startswith("cuda")
    plan = [("plain encode()", {"method": "plain"}),
            ("project LocalEncoder", {"method": "project"}),
            ("forward pass only (ceiling)", {"method": "forward"})]
    if fp16 if fp16 is not None else cuda:
        plan += [("project LocalEncoder fp16", {"method": "project", "precision": "fp16"}),
                 ("forward pass only fp16", {"method": "forward", "precision": "fp16"})]
    runs: dict[str, list[dict]] = {}
    saved: dict[str, Path] = {}
    for _ in range(max(1, repeat)):
        for label, extra in plan:
            save = work / f"{extra['method']}-{extra.get('precision', 'fp32')}.npy"
            load = os.getloadavg()[0]
            result = run_worker("encode", {**base, **extra, "save": str(save)})
            result["label"] = label
            result["load_before"] = round(load, 2)
            if extra["method"] != "forward":
                saved[label] = save
            log.info("encode %s: %s", label, result)
            runs.setdefault(label, []).append(result)
    rows = []
    for label, _ in plan:
        best = dict(min(runs[label], key=lambda r: r["seconds"]))
        best["runs_seconds"] = [r["seconds"] for r in runs[label]]
        rows.append(best)
    plain = np.load(saved["plain encode()"])
    plain_s = rows[0]["seconds"]
    for r in rows:
        r["x_plain"] = round(plain_s / r["seconds"], 2)
        if r["label"] in saved and r["label"] != "plain encode()":
            r["max_abs_diff_vs_plain"] = float(np.abs(np.load(saved[r["label"]]) - plain).max())
    return {"texts": texts, "device": device, "batch_size": batch_size, "tokens": rows[0]["tokens"],
            "methods": rows, "halfvec_recall_at_10": halfvec_recall(plain)}


def halfvec_recall(vectors: np.ndarray, k: int = 10) -> float:
    """Recall@k of exact cosine search over half-float copies of ``vectors`` (what a ``halfvec`` column
    stores) against the float32 originals; every vector is a query, itself excluded."""
    full = vectors.astype(np.float32)
    half = full.astype(np.float16).astype(np.float32)

    def topk(base):
        sims = full @ base.T
        np.fill_diagonal(sims, -np.inf)
        return np.argpartition(-sims, k, axis=1)[:, :k]

    exact, approx = topk(full), topk(half)
    hits = sum(len(set(a) & set(b)) for a, b in zip(exact, approx, strict=True))
    return round(hits / (k * len(full)), 5)
