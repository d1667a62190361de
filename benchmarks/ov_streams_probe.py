"""Probe (not in ``make bench``): ``encoder=openvino-bf16`` as the product runs it (``PERFORMANCE_HINT=LATENCY``,
one synchronous infer request, all threads on one batch) against the same compiled IR with
``PERFORMANCE_HINT=THROUGHPUT``, ``NUM_STREAMS`` streams and an ``AsyncInferQueue`` (one batch per stream at a
time), on the runtimes benchmark's 2,000 texts, MiniLM, batch 64. Prints texts/s and whether the vectors are
identical to the product path's.

    REINDEX_ENCODER_CACHE=/tmp/rx-bench/runtimes/encoders .venv/bin/python -m benchmarks.ov_streams_probe [streams]
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def main(streams: int = 2, batch: int = 64) -> dict:
    import openvino as ov

    from benchmarks.runtimes import corpus_texts
    from reindex.embeddings.local import LocalEncoder
    from reindex.models import offline_hub, resolve_model_path

    offline_hub()
    texts = corpus_texts(2000)
    enc = LocalEncoder(str(resolve_model_path("default")), batch_size=batch, encoder="openvino-bf16")
    enc.encode(texts[:batch])
    model = enc._runtime[0]
    compiled = ov.Core().compile_model(str(enc.export.openvino), "CPU", {
        "INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": streams})
    names = [i.get_any_name() for i in compiled.inputs]

    def streamed(block: list[str]) -> np.ndarray:
        order = np.argsort(-enc.token_lengths(block), kind="stable")
        out = np.empty((len(block), enc.spec.dim), dtype=np.float32)
        queue = ov.AsyncInferQueue(compiled, streams)
        queue.set_callback(lambda req, idx: out.__setitem__(idx, req.get_output_tensor(0).data))
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            feats = model.preprocess([block[j] for j in idx])
            queue.start_async({n: feats[n].numpy().astype(np.int64) for n in names}, idx)
        queue.wait_all()
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

    streamed(texts[:batch * 2])
    result = {"streams": streams, "batch": batch, "texts": len(texts)}
    vectors = {}
    for name, fn in (("latency (product)", enc.encode), (f"throughput, {streams} streams", streamed)) * 2:
        t0 = time.perf_counter()
        v = np.concatenate([fn(texts[i:i + 1000]) for i in range(0, len(texts), 1000)])
        rate = round(len(texts) / (time.perf_counter() - t0), 1)
        result.setdefault(name, []).append(rate)
        vectors[name] = v
    a, b = vectors.values()
    result["max_abs_difference"] = float(np.abs(a - b).max())
    return result


if __name__ == "__main__":
    sys.stdout.write(json.dumps(main(*(int(x) for x in sys.argv[1:3]))) + "\n")
