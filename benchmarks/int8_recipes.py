"""The int8 recipes tried for ``encoder`` (issue: an int8 runtime is offered only if its top-10 agreement with fp32
torch is ≥ 0.97 on the benchmark texts): what each keeps of the fp32 vectors, and how fast it runs.

    python -m benchmarks.int8_recipes [--dir /tmp/rx-bench] [--texts 2000] [--threads 1] [--only id,...]
    python -m benchmarks.int8_recipes --versus-bf16 --only only-attn_out,only-qk-attn_out,all [--rounds 3]

Same texts and reference as ``benchmarks/runtimes.py``: ``corpus_texts(2000)`` (real chunks of the sample corpus)
encoded by plain ``SentenceTransformer.encode()`` (fp32 torch), every text a query over the other 1,999
(``reindex.quality.vector_agreement``). Calibration: the 300 chunks after the measured ones in the same seeded
permutation (``calibration_texts``), one text per sample (no padding in the statistics). The model is the bundled
MiniLM-L6, from the project's own fp32 export (``LocalEncoder(encoder="openvino")``, cached under
``<dir>/int8/encoders``). Each recipe's graph runs through OpenVINO (ONNX Runtime for the ``ort`` rows) on
``--threads`` threads, token-length-sorted batches of 64 as ``LocalEncoder`` makes them.

Recipes (``RECIPES``):

* int8 **weights only** (NNCF ``compress_weights``, per-channel; activations stay float) — the upper bound of any
  int8 recipe's agreement: a W8A8 recipe rounds these same weights, and its activations too;
* NNCF **static** post-training quantisation (``nncf.quantize``: ``ModelType.TRANSFORMER``, preset MIXED,
  SmoothQuant α 0.95 by default, fast bias correction) of all MatMuls, of all but the sensitive ones, and of one
  kind of MatMul at a time (the others in float), once with SmoothQuant off; the embedding tables stay float
  except in the row that says otherwise (NNCF rounds them to int8 by default);
* ONNX Runtime **static** QDQ quantisation (per-channel int8 weights, uint8 activations, MinMax calibration), the
  attention MatMuls and the FFN output projections excluded.

The speed column is texts/s on ``--threads`` threads over the 2,000 texts, one run; on a shared machine it is
only a rough guide (``load_before`` is recorded with each row). The comparison that decides is ``--versus-bf16``:
``openvino-bf16`` (the runtime offered) and the chosen recipes with bf16 for what they leave float, in one
process, interleaved ``--rounds`` times, the fastest run of each kept (``versus_bf16`` in the results file).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from benchmarks.common import ROOT, bench_dir

log = logging.getLogger("benchmarks.int8_recipes")

CALIBRATION = 300
BATCH = 64
# MatMul kinds of the exported BERT graph (node names from torch.onnx.export of the sentence-transformers model).
# NNCF matches ignored-scope patterns with re.match (a prefix match): each one ends with "$", or "…/self/MatMul"
# would take "…/self/MatMul_1" along.
KINDS = {
    "qkv": r".*attention/self/(query|key|value)/MatMul$",
    "qk": r".*attention/self/MatMul$",
    "pv": r".*attention/self/MatMul_1$",
    "attn_out": r".*attention/output/dense/MatMul$",
    "ffn_in": r".*intermediate/dense/MatMul$",
    "ffn_out": r".*layer\.\d+/output/dense/MatMul$",
}
# nncf.quantize with ModelType.TRANSFORMER also rounds the embedding tables (the Gather weights) to int8: that alone
# costs 3 points of top-10 agreement here (0.9675 with every MatMul in float), so the static recipes leave them in
# float unless they say otherwise.
EMBEDDINGS = ["Gather"]


def _only(*kinds: str) -> dict:
    """An NNCF ignored scope that leaves the embeddings and every MatMul kind but ``kinds`` in float."""
    return {"patterns": [p for k, p in KINDS.items() if k not in kinds], "types": EMBEDDINGS}


# id → (what it is, kind of recipe, settings, inference precision of what stays float)
RECIPES: dict[str, tuple[str, str, dict, str]] = {
    "w8-sym": ("int8 weights only (sym, per-channel), embeddings too", "weights", {"mode": "INT8_SYM"}, "f32"),
    "w8-sym-emb-float": ("int8 weights only (sym, per-channel)", "weights",
                         {"mode": "INT8_SYM", "ignore_types": EMBEDDINGS}, "f32"),
    "w8-asym-emb-float": ("int8 weights only (asym, per-channel)", "weights",
                          {"mode": "INT8_ASYM", "ignore_types": EMBEDDINGS}, "f32"),
    "all-and-embeddings": ("static, all MatMuls and the embeddings (NNCF's default)", "static", {}, "f32"),
    "all": ("static, all MatMuls", "static", {"ignored": {"types": EMBEDDINGS}}, "f32"),
    "all-bf16": ("static, all MatMuls; bf16 for the rest", "static", {"ignored": {"types": EMBEDDINGS}}, "bf16"),
    "no-ffn-out": ("static, FFN output projections in float", "static",
                   {"ignored": {"patterns": [KINDS["ffn_out"]], "types": EMBEDDINGS}}, "f32"),
    "linear-only": ("static, FFN output projections and attention MatMuls in float", "static",
                    {"ignored": _only("qkv", "attn_out", "ffn_in")}, "f32"),
    **{f"only-{kind}": (f"static, only the {kind} MatMuls", "static", {"ignored": _only(kind)}, "f32")
       for kind in KINDS},
    "only-qk-attn_out": ("static, only the qk and attn_out MatMuls", "static", {"ignored": _only("qk", "attn_out")},
                         "f32"),
    "only-qkv-sq-off": ("static, only the qkv MatMuls, SmoothQuant off", "static",
                        {"ignored": _only("qkv"), "sq": -1}, "f32"),
    "ort-static": ("ONNX Runtime static QDQ, FFN output projections and attention MatMuls in float", "ort", {},
                   "f32"),
}


def _data(work: Path, n_texts: int) -> dict:
    """Token-sorted batches of the measured texts, the calibration samples, the fp32 reference vectors, the
    exported fp32 graphs (cached under ``work``)."""
    from benchmarks.runtimes import calibration_texts, corpus_texts
    from reindex.embeddings.local import LocalEncoder

    texts = corpus_texts(n_texts)
    enc = LocalEncoder("default", encoder="openvino", batch_size=BATCH)
    enc.encode(texts[:1])  # exports (or finds) the fp32 graphs
    model = enc._runtime[0]
    ref_path = work / f"reference-{n_texts}.npy"
    if not ref_path.exists():
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(enc.path), device="cpu", local_files_only=True)
        np.save(ref_path, st.encode(texts, batch_size=BATCH, normalize_embeddings=True, convert_to_numpy=True,
                                    show_progress_bar=False).astype(np.float32))

    def feats(batch: list[str]) -> dict:
        f = model.preprocess(batch)
        return {k: v.numpy() for k, v in f.items() if hasattr(v, "numpy")}

    order = np.argsort(-enc.token_lengths(texts), kind="stable")
    batches = [(order[i:i + BATCH], feats([texts[j] for j in order[i:i + BATCH]])) for i in range(0, len(texts), BATCH)]
    return {"batches": batches, "calib": [feats([t]) for t in calibration_texts(CALIBRATION, n_texts)],
            "reference": np.load(ref_path), "onnx": enc.export.onnx, "openvino": enc.export.openvino,
            "dim": enc.spec.dim}


def _quantized(kind: str, settings: dict, data: dict, out: Path):
    """The recipe's model: an OpenVINO model, or the path of an ONNX file (``ort``)."""
    import nncf
    import openvino as ov

    if kind == "weights":
        ignored = nncf.IgnoredScope(types=settings["ignore_types"]) if settings.get("ignore_types") else None
        # compress_weights rounds every weight it finds (MatMul and embedding tables) to int8, per output channel
        return nncf.compress_weights(ov.Core().read_model(str(data["openvino"])),
                                     mode=getattr(nncf.CompressWeightsMode, settings["mode"]), ignored_scope=ignored)
    if kind == "static":
        from nncf.quantization.advanced_parameters import (
            AdvancedQuantizationParameters,
            AdvancedSmoothQuantParameters,
        )
        from nncf.quantization.range_estimator import RangeEstimatorParametersSet

        adv = {}
        if "sq" in settings:
            adv["smooth_quant_alphas"] = AdvancedSmoothQuantParameters(matmul=settings["sq"])
        if "ranges" in settings:
            adv["activations_range_estimator_params"] = getattr(RangeEstimatorParametersSet, settings["ranges"])
        return nncf.quantize(ov.Core().read_model(str(data["openvino"])), nncf.Dataset(data["calib"]),
                             subset_size=len(data["calib"]), preset=nncf.QuantizationPreset.MIXED,
                             model_type=nncf.ModelType.TRANSFORMER, fast_bias_correction=True,
                             ignored_scope=nncf.IgnoredScope(**settings["ignored"]) if settings.get("ignored") else None,
                             advanced_parameters=AdvancedQuantizationParameters(**adv))
    if kind == "ort":
        import onnx
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        class Reader(CalibrationDataReader):
            def __init__(self, items: list[dict]) -> None:
                self.items = iter(items)

            def get_next(self):
                return next(self.items, None)

        names = [n.name for n in onnx.load(str(data["onnx"])).graph.node if n.op_type == "MatMul"]
        exclude = [n for n in names if "/attention/" not in n and "/output/dense/" in n]  # FFN output projections
        exclude += [n for n in names if n.endswith(("self/MatMul", "self/MatMul_1"))]  # the attention MatMuls
        target = out / "ort-static.onnx"
        quantize_static(str(data["onnx"]), str(target), Reader(data["calib"]), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["MatMul"], nodes_to_exclude=exclude,
                        calibrate_method=CalibrationMethod.MinMax)
        return target
    raise ValueError(kind)


def _forward(model, precision: str, threads: int):
    """``features -> vectors`` of a recipe's model."""
    if isinstance(model, Path):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        return lambda f: session.run(None, {n: f[n] for n in names})[0]
    import openvino as ov

    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                      "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads})
    request = compiled.create_infer_request()
    names = [i.get_any_name() for i in compiled.inputs]
    return lambda f: np.array(request.infer({n: f[n] for n in names})[0], dtype=np.float32, copy=True)


_MADE: dict[str, object] = {}


def _encode(forward, data: dict) -> tuple[np.ndarray, float]:
    """The measured texts through ``forward`` (after a warm-up batch): unit vectors in text order, seconds."""
    forward(data["batches"][-1][1])  # warm-up (a short batch)
    vectors = np.empty((len(data["reference"]), data["dim"]), dtype=np.float32)
    t0 = time.perf_counter()
    for idx, feats in data["batches"]:
        vectors[idx] = forward(feats)
    seconds = time.perf_counter() - t0
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12), seconds


def _model(name: str, data: dict, work: Path):
    """A recipe's quantised model, made once per process (recipes that differ only in the precision of the
    rest share it)."""
    _, kind, settings, _ = RECIPES[name]
    key = json.dumps([kind, settings], sort_keys=True)
    if key not in _MADE:
        _MADE[key] = _quantized(kind, settings, data, work)
    return _MADE[key]


def measure(name: str, data: dict, work: Path, threads: int) -> dict:
    """One recipe: quantise (timed), encode the texts (timed), agreement with the fp32 reference."""
    from reindex.quality import vector_agreement

    label, kind, _, precision = RECIPES[name]
    t0 = time.perf_counter()
    model = _model(name, data, work)
    quantize_s = time.perf_counter() - t0
    load = os.getloadavg()[0]
    vectors, seconds = _encode(_forward(model, precision, threads), data)
    a = vector_agreement(data["reference"], vectors, k=10)
    return {"recipe": name, "label": label, "kind": kind, "precision_rest": precision,
            "top10_agreement": round(a.top_k_agreement, 4), "min_cosine": round(a.min_cosine, 6),
            "mean_cosine": round(a.mean_cosine, 6), "texts_per_s": round(len(vectors) / seconds, 1),
            "quantize_s": round(quantize_s, 1), "threads": threads, "load_before": round(load, 2),
            "passes": a.top_k_agreement >= 0.97}


def versus_bf16(names: list[str], data: dict, work: Path, threads: int, rounds: int) -> list[dict]:
    """The speed that decides: ``openvino-bf16`` (the fp32 export at bf16) and each OpenVINO recipe with bf16 for
    what it leaves float, in one process, interleaved ``rounds`` times; the fastest run of each kept."""
    from reindex.quality import vector_agreement

    contenders = [("openvino-bf16", str(data["openvino"]))] + [(n, _model(n, data, work)) for n in names]
    runs: dict[str, list[float]] = {n: [] for n, _ in contenders}
    agreement: dict[str, float] = {}
    loads = []
    for _ in range(rounds):
        for name, model in contenders:
            loads.append(os.getloadavg()[0])
            vectors, seconds = _encode(_forward(model, "bf16", threads), data)
            runs[name].append(round(len(vectors) / seconds, 1))
            agreement[name] = round(vector_agreement(data["reference"], vectors, k=10).top_k_agreement, 4)
    return [{"recipe": n, "precision_rest": "bf16", "texts_per_s": max(runs[n]), "runs_texts_per_s": runs[n],
             "top10_agreement": agreement[n], "threads": threads,
             "load_range": [round(min(loads), 2), round(max(loads), 2)]} for n, _ in contenders]


def table(rows: list[dict]) -> str:
    out = ["| recipe (id) | top-10 agreement | min cosine | mean cosine | texts/s | load before | ≥ 0.97 |",
           "|---|---:|---:|---:|---:|---:|:---:|"]
    out += [f"| {r['label']} (`{r['recipe']}`) | {r['top10_agreement']:.4f} | {r['min_cosine']:.6f} | {r['mean_cosine']:.6f} | "
            f"{r['texts_per_s']:.1f} | {r['load_before']:.1f} | {'yes' if r['passes'] else 'no'} |" for r in rows]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.int8_recipes", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=None, help="bench dir (default $REINDEX_BENCH_DIR or /tmp/rx-bench)")
    ap.add_argument("--texts", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="", help="comma-separated recipe ids (default: all)")
    ap.add_argument("--versus-bf16", action="store_true",
                    help="instead: openvino-bf16 against the --only recipes with bf16 for the rest, interleaved")
    ap.add_argument("--rounds", type=int, default=3, help="--versus-bf16: interleaved rounds (the fastest kept)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "int8_recipes.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("nncf", "openvino"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(RECIPES)
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown recipe(s) {unknown}: choose from {list(RECIPES)}")
    if args.versus_bf16 and (not args.only or any(RECIPES[n][1] == "ort" for n in names)):
        raise SystemExit("--versus-bf16 needs --only with OpenVINO recipe ids (ONNX Runtime has no bf16 here)")
    work = bench_dir(args.dir) / "int8"
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("REINDEX_ENCODER_CACHE", str(work / "encoders"))
    data = _data(work, args.texts)
    out = Path(args.out)
    if args.versus_bf16:
        # the interleaved speed comparison, merged into the results of the recipes run
        result = json.loads(out.read_text()) if out.exists() else {}
        result["versus_bf16"] = versus_bf16(names, data, work, args.threads, args.rounds)
        out.write_text(json.dumps(result, indent=1) + "\n")
        for r in result["versus_bf16"]:
            print(f"{r['recipe']}: {r['texts_per_s']} texts/s (runs {r['runs_texts_per_s']}), top-10 agreement "
                  f"{r['top10_agreement']}")
        return 0
    rows = []
    for name in names:
        rows.append(measure(name, data, work, args.threads))
        log.info("%s", json.dumps(rows[-1]))
    out.write_text(json.dumps({"texts": args.texts, "calibration": CALIBRATION, "threads": args.threads,
                               "model": "MiniLM-L6 (bundled)", "rows": rows}, indent=1) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
