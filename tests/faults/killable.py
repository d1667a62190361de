"""Stage code run in a child process that a test kills with SIGKILL at a point it waits for.

``python -m tests.faults.killable '<json>'`` runs the real pipeline stages (``reindex.pipeline``) on the
store named in the JSON, with one hook that stops the process at a chosen point — inside an open
transaction — writes the ``marker`` file and sleeps until it is killed:

- ``hang: "merge"``: after ``CorpusWriter.merge`` ran every statement of the scan's merge, before its
  transaction commits (``chunk_corpus`` merges and claims in one transaction);
- ``hang: "load_block", block: N``: in the transaction of the N-th vector block of ``encode_partition``,
  after its chunks were flipped READY (and their old vectors deleted), before its COPY;
- ``hang: "shard_merge"``: after a scan shard's merge (ownership, documents and chunks upserted), before its
  transaction commits.

Steps (``steps``, in order): ``chunk`` (``pipeline.chunk_corpus``), ``shard`` (``scan.scan_shard`` of shard
``shard`` of a listed batch), ``encode`` (``pipeline.plan`` then ``pipeline.encode_partition`` of each partition
with ``HashEncoder``). The child never loads torch: it
starts in about a second. Reaching the end without being killed exits with status 3.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from reindex.models import ModelSpec

# A model for tests that need no model: vectors from each text's hash (the stages only check the spec).
HASH_SPEC = ModelSpec(model_id="fault-hash-encoder", revision="1", dim=32, normalized=True, backend="local")


class HashEncoder:
    """Deterministic unit vectors from each text's sha256, under ``spec`` (its checksum is what a batch is
    planned for). Cheap and torch-free: the faults, not the model, are under test here."""

    def __init__(self, spec: ModelSpec = HASH_SPEC) -> None:
        self.spec = spec

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.empty((len(texts), self.spec.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
            v = np.random.default_rng(seed).standard_normal(self.spec.dim)
            out[i] = v / np.linalg.norm(v)
        return out


def spec_from_dict(d: dict) -> ModelSpec:
    return ModelSpec(**{k: v for k, v in d.items() if k != "checksum"})


def _hang(marker: str) -> None:
    """Say where we are, then wait to be killed (the test's SIGKILL ends this)."""
    Path(marker).write_text(str(os.getpid()), encoding="utf-8")
    while True:
        time.sleep(60)


def _install_hook(args: dict) -> None:
    if args["hang"] == "merge":
        from reindex.store.documents import CorpusWriter

        merge = CorpusWriter.merge

        def merge_then_hang(self, *a, **kw):
            merge(self, *a, **kw)
            _hang(args["marker"])

        CorpusWriter.merge = merge_then_hang
    elif args["hang"] == "load_block":
        from reindex.store import vectors

        payload = vectors.copy_binary_payload
        calls = [0]

        def payload_or_hang(*a, **kw):  # called inside the block's transaction, before its COPY
            calls[0] += 1
            if calls[0] == args["block"]:
                _hang(args["marker"])
            return payload(*a, **kw)

        vectors.copy_binary_payload = payload_or_hang
    elif args["hang"] == "shard_merge":
        from reindex.store import scan as scan_store

        merge_shard = scan_store.merge_shard

        def merge_shard_then_hang(*a, **kw):
            merge_shard(*a, **kw)
            _hang(args["marker"])

        scan_store.merge_shard = merge_shard_then_hang
    else:
        raise SystemExit(f"unknown hang point {args['hang']!r}")


def main(raw: str) -> int:
    import psycopg

    from reindex import pipeline
    from reindex.config import ReindexConfig
    from reindex.store import Store

    args = json.loads(raw)
    _install_hook(args)
    cfg = ReindexConfig.from_mapping(args["config"])
    spec = spec_from_dict(args["spec"])
    with psycopg.connect(args["dsn"], autocommit=True, application_name=args["app"]) as conn:
        store = Store(conn, args["schema"])
        for step in args["steps"]:
            if step == "chunk":
                pipeline.chunk_corpus(store, cfg, Path(cfg.corpus_uri), batch_id=args["batch_id"],
                                      model_checksum=spec.checksum, dag_run_id=args.get("run_id"),
                                      dag_id=args.get("dag_id"))
            elif step == "shard":
                from reindex import scan

                scan.scan_shard(store, cfg, Path(cfg.corpus_uri), batch_id=args["batch_id"], shard=args["shard"])
            elif step == "encode":
                for part in pipeline.plan(store, cfg, args["batch_id"]):
                    pipeline.encode_partition(store, cfg, part, model_checksum=spec.checksum,
                                              encoder=HashEncoder(spec))
            else:
                raise SystemExit(f"unknown step {step!r}")
    print("the stages finished: the test meant to kill this process first", file=sys.stderr)
    return 3


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
