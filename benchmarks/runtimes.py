"""Benchmark: local encoder runtimes (``encoder``) against plain ``SentenceTransformer.encode()``.

The texts are real: the sample corpus's documents (English and Russian) chunked by the project's own chunker
at 256, 128 and 64 tokens (no overlap), deduplicated, then a seeded sample of ``--runtime-texts`` (2,000).
Two models: the bundled MiniLM-L6 (6 layers, 384-d) and a 12-layer 768-d model built offline from it (its six
trained layers each used twice, then a seeded Dense 384 → 768 and Normalize: MiniLM's weights, twice the
depth, a 768-d output).

Each method runs in its own subprocess (its own peak RSS) after a warm-up batch; the export is made once
before (its time is the ``export s`` column: the first run's one-off cost, cached after):

* ``plain encode()``   ``SentenceTransformer.encode(texts, batch_size=B, normalize_embeddings=True)``;
* ``torch``            ``LocalEncoder(encoder="torch")`` (token-sorted batches), as the encode task calls it;
* ``onnx``, ``openvino``, ``openvino-bf16``   ``LocalEncoder(encoder=…)``, the same calls;
* tried, not offered (``--runtime-int8``): ``onnx-int8 dynamic`` (ONNX Runtime ``quantize_dynamic``, per-channel
  int8 weights) and ``openvino-int8 static`` (NNCF post-training quantisation calibrated on 300 other corpus
  chunks, transformer preset, the FFN output projections left in float — the most sensitive layers). Every int8
  recipe tried, by layer kind, with its agreement and the speed that decides: ``benchmarks/int8_recipes.py``.

Quality is measured against ``plain encode()`` (fp32 torch) on the same texts (``reindex.quality``): top-10
neighbour agreement (every text a query over the other 1,999), min / mean cosine of each text's two vectors.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path

import numpy as np

from benchmarks.common import ROOT, bench_dir, peak_rss_mib, run_worker

log = logging.getLogger("benchmarks.runtimes")

SIZES = (256, 128, 64)
OFFERED = ("torch", "onnx", "openvino", "openvino-bf16")
INT8 = ("onnx-int8 dynamic", "openvino-int8 static")


@functools.lru_cache(maxsize=2)
def corpus_texts(n: int, seed: int = 7) -> list[str]:
    """``n`` distinct chunks of the sample corpus (256/128/64-token windows), a seeded sample, Russian and English."""
    from reindex.chunking import TokenChunker, load_tokenizer
    from reindex.corpus import CorpusReader, Document
    from reindex.models import resolve_model_path

    tok = load_tokenizer(resolve_model_path("default"))
    docs = [d for d in CorpusReader(ROOT / "include" / "sample_corpus") if isinstance(d, Document)]
    seen: dict[str, None] = {}
    for size in SIZES:
        chunker = TokenChunker(tok, size, 0)
        for d in docs:
            for c in chunker.chunk(d.doc_id, d.text):
                seen.setdefault(c.text, None)
    texts = list(seen)
    if n > len(texts):
        raise ValueError(f"the sample corpus gives {len(texts)} distinct chunks; asked for {n}")
    order = np.random.default_rng(seed).permutation(len(texts))
    return [texts[i] for i in order[:n]]


def calibration_texts(n: int, exclude: int, seed: int = 7) -> list[str]:
    """``n`` other chunks than the ``exclude`` measured ones (same permutation, further on)."""
    full = corpus_texts(exclude + n, seed)
    return full[exclude:]


def build_deep_model(path: Path) -> Path:
    """The 12-layer 768-d model: MiniLM's six layers each used twice, then a seeded Dense 384 → 768 + Normalize."""
    if (path / "modules.json").exists():
        return path
    import copy

    import torch
    from sentence_transformers import SentenceTransformer, models

    from reindex.models import offline_hub, resolve_model_path

    offline_hub()
    base = SentenceTransformer(str(resolve_model_path("default")), device="cpu", local_files_only=True)
    bert = base[0].auto_model
    layers = bert.encoder.layer
    bert.encoder.layer = torch.nn.ModuleList([copy.deepcopy(layers[i // 2]) for i in range(2 * len(layers))])
    bert.config.num_hidden_layers = len(bert.encoder.layer)
    torch.manual_seed(20261130)
    dense = models.Dense(in_features=384, out_features=768, bias=False, activation_function=torch.nn.Identity())
    torch.nn.init.normal_(dense.linear.weight, std=384 ** -0.5)
    SentenceTransformer(modules=[base[0], base[1], dense, models.Normalize()], device="cpu").save(str(path))
    return path


def _int8_path(work: Path, model_path: str, method: str, n_texts: int) -> Path:
    """Quantised copies for the tried-not-offered rows (made once per model under the bench dir)."""
    from reindex.embeddings.local import LocalEncoder

    enc = LocalEncoder(model_path, encoder="onnx")
    enc.encode(["warm"])
    src = enc.export.onnx
    out = work / f"{enc._runtime[3].checksum}-int8"
    out.mkdir(parents=True, exist_ok=True)
    if method == "onnx-int8 dynamic":
        target = out / "dynamic.onnx"
        if not target.exists():
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(str(src), str(target), weight_type=QuantType.QInt8, per_channel=True)
        return target
    target = out / "nncf" / "model.xml"
    if not target.exists():
        import nncf
        import openvino as ov

        model, _ = enc._runtime[:2]
        items = []
        cal = calibration_texts(300, n_texts)
        for i in range(0, len(cal), 8):
            feats = model.preprocess(cal[i:i + 8])
            items.append({k: v.numpy() for k, v in feats.items() if hasattr(v, "numpy")})
        q = nncf.quantize(ov.Core().read_model(str(src)), nncf.Dataset(items), subset_size=len(items),
                          model_type=nncf.ModelType.TRANSFORMER,
                          ignored_scope=nncf.IgnoredScope(patterns=[r".*layer\.\d+/output/dense/MatMul"]))
        target.parent.mkdir(parents=True, exist_ok=True)
        ov.save_model(q, str(target), compress_to_fp16=False)
    return target


def worker(p: dict) -> dict:
    """One method over the texts in this process: seconds, texts/s, peak RSS; vectors saved to ``p['save']``."""
    logging.basicConfig(level=logging.WARNING)
    import torch

    from reindex.embeddings.local import LocalEncoder

    texts = corpus_texts(p["texts"])
    batch, method = p["batch_size"], p["method"]
    out: dict = {"method": method, "model": p["model_label"], "texts": len(texts),
                 "torch_threads": torch.get_num_threads()}
    block = max(batch * 8, 512)
    if method == "plain encode()":
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(p["model"], device="cpu", local_files_only=True)
        model.encode(texts[:batch], batch_size=batch, normalize_embeddings=True)
        t0 = time.perf_counter()
        vectors = model.encode(texts, batch_size=batch, normalize_embeddings=True, convert_to_numpy=True,
                               show_progress_bar=False)
    elif method in OFFERED:
        enc = LocalEncoder(p["model"], batch_size=batch, encoder=method)
        enc.encode(texts[:batch])
        out["model_checksum"] = enc.spec.checksum
        out["tokens"] = int(enc.token_lengths(texts).sum())
        t0 = time.perf_counter()
        vectors = np.concatenate([enc.encode(texts[i:i + block]) for i in range(0, len(texts), block)])
    elif method in INT8:
        from reindex.embeddings import runtimes

        enc = LocalEncoder(p["model"], batch_size=batch, encoder="onnx")
        enc.encode(texts[:1])
        model = enc._runtime[0]
        path = Path(p["int8_path"])
        if method == "onnx-int8 dynamic":
            forward = runtimes._make_onnx_session(path)
        else:
            forward = runtimes._openvino_model.__wrapped__(path, "fp32")
        runtime = (model, forward, enc._runtime[2], enc._runtime[3])
        enc.__dict__["_runtime"] = runtime  # the same token-sorted loop, the quantised graph's forward pass
        enc.encode(texts[:batch])
        t0 = time.perf_counter()
        vectors = np.concatenate([enc.encode(texts[i:i + block]) for i in range(0, len(texts), block)])
    else:
        raise ValueError(method)
    seconds = time.perf_counter() - t0
    out.update(seconds=round(seconds, 3), texts_per_s=round(len(texts) / seconds, 1), rss_mib=round(peak_rss_mib(), 1))
    np.save(p["save"], np.asarray(vectors, dtype=np.float32))
    return out


def _prepare(p: dict) -> dict:
    """Exports (timed: the first run's one-off cost) and the int8 copies, in a process of their own."""
    from reindex.embeddings.local import LocalEncoder

    out = {}
    for method in OFFERED[1:]:
        enc = LocalEncoder(p["model"], encoder=method)
        t0 = time.perf_counter()
        enc.encode(["warm"])
        out[method] = {"export_s": round(time.perf_counter() - t0, 2) if enc.export.exported else 0.0,
                       "exported": enc.export.exported}
    for method in p.get("int8", []):
        try:
            t0 = time.perf_counter()
            path = _int8_path(Path(p["work"]), p["model"], method, p["texts"])
            out[method] = {"int8_path": str(path), "export_s": round(time.perf_counter() - t0, 2)}
        except ImportError as e:  # nncf is not a project dependency: the row is left out where it is missing
            out[method] = {"skipped": f"{type(e).__name__}: {e}"}
    return out


def run(data_dir: Path, *, texts: int = 2000, batch_size: int = 64, repeat: int = 1, int8: bool = True,
        models: tuple[str, ...] = ("minilm", "deep")) -> dict:
    """Every method × model ``repeat`` times, alternating; the fastest run of each kept. Exports go to a cache
    under the bench dir (``REINDEX_ENCODER_CACHE``), made fresh for this run so their time is measured."""
    import shutil

    from reindex.models import resolve_model_path
    from reindex.quality import vector_agreement

    work = bench_dir(data_dir) / "runtimes"
    cache = work / "encoders"
    shutil.rmtree(cache, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    env = {"REINDEX_ENCODER_CACHE": str(cache)}
    paths = {"minilm": ("MiniLM-L6, 6 layers, 384-d", str(resolve_model_path("default"))),
             "deep": ("12 layers (MiniLM's, twice), 768-d", str(build_deep_model(work / "deep-768")))}
    sections = []
    for key in models:
        label, path = paths[key]
        prep = run_worker("runtimes-prepare", {"model": path, "work": str(work), "texts": texts,
                                               "int8": list(INT8) if int8 else []}, env=env)
        plan = ["plain encode()", *OFFERED] + [m for m in (INT8 if int8 else ()) if "int8_path" in prep.get(m, {})]
        runs: dict[str, list[dict]] = {}
        for _ in range(max(1, repeat)):
            for method in plan:
                save = work / f"{key}-{method.replace(' ', '_').replace('()', '')}.npy"
                load = os.getloadavg()[0]
                result = run_worker("runtimes", {"model": path, "model_label": label, "method": method, "texts": texts,
                                                 "batch_size": batch_size, "save": str(save),
                                                 "int8_path": prep.get(method, {}).get("int8_path")}, env=env)
                result.update(label=method, load_before=round(load, 2), save=str(save))
                log.info("runtimes %s %s: %s", key, method, result)
                runs.setdefault(method, []).append(result)
        rows = []
        reference = np.load(runs["plain encode()"][0]["save"])
        plain_s = min(r["seconds"] for r in runs["plain encode()"])
        for method in plan:
            best = dict(min(runs[method], key=lambda r: r["seconds"]))
            best["runs_seconds"] = [r["seconds"] for r in runs[method]]
            vectors = np.load(best["save"])
            a = vector_agreement(reference, vectors, k=10)
            best.update(x_plain=round(plain_s / best["seconds"], 2), top10_agreement=round(a.top_k_agreement, 4),
                        min_cosine=round(a.min_cosine, 6), mean_cosine=round(a.mean_cosine, 7),
                        one_minus_min_cosine=float(1 - a.min_cosine),
                        max_abs_diff=float(np.abs(vectors - reference).max()),
                        offered=method in OFFERED or method == "plain encode()",
                        **{k: v for k, v in prep.get(method, {}).items() if k != "int8_path"})
            rows.append(best)
        tokens = next((r["tokens"] for r in rows if r.get("tokens")), None)
        sections.append({"model": label, "key": key, "texts": texts, "tokens": tokens, "methods": rows})
    return {"texts": texts, "batch_size": batch_size, "device": "cpu", "models": sections,
            "gpu": "not measured: no GPU on this machine"}


def table(r: dict) -> str:
    """Markdown: one table per model."""
    out = []
    for s in r["models"]:
        out += [f"**Encoder runtimes** on cpu, {s['texts']:,} real chunks of the sample corpus (Russian + English, "
                f"{s['tokens'] or 0:,} tokens), {s['model']}, batch {r['batch_size']}; quality against plain "
                "encode() (fp32 torch) on the same texts:", "",
                "| encoder | seconds | texts/s | × plain encode() | top-10 agreement | min cosine | 1 − min cosine | "
                "peak RSS MiB | export s (once) | offered |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|"]
        for m in s["methods"]:
            out.append(f"| {m['label']} | {m['seconds']:,.2f} | {m['texts_per_s']:,.1f} | {m['x_plain']:.2f} | "
                       f"{m['top10_agreement']:.4f} | {m['min_cosine']:.6f} | {m['one_minus_min_cosine']:.1e} | "
                       f"{m['rss_mib']:,.0f} | {m.get('export_s', '–')} | {'yes' if m['offered'] else 'no'} |")
        out.append("")
    out.append(f"GPU rows: {r.get('gpu')}.")
    return "\n".join(out)
