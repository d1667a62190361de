"""``python -m reindex.emulators.vertex``: serve the emulator (optionally with an in-process GCS emulator)."""

from __future__ import annotations

import json
import logging
import os

from reindex.emulators.vertex.config import CONFIG_ENV, EmulatorConfig
from reindex.emulators.vertex.server import VertexEmulator


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m reindex.emulators.vertex",
                                     description="Vertex AI batch-prediction emulator for embedding jobs.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8790)
    parser.add_argument("--gcs-host", default=None,
                        help="storage endpoint, e.g. http://127.0.0.1:9023 (default: $STORAGE_EMULATOR_HOST)")
    parser.add_argument("--start-gcs", action="store_true",
                        help="also start an in-memory GCS emulator in this process (on --gcs-port)")
    parser.add_argument("--gcs-port", type=int, default=9023)
    parser.add_argument("--embedder", choices=["model", "hash"], default=None,
                        help="'model' (bundled local model, default) or 'hash' (tests only)")
    parser.add_argument("--hash-dim", type=int, default=None)
    parser.add_argument("--config", default=None,
                        help=f"JSON object or JSON file of EmulatorConfig fields (default: ${CONFIG_ENV})")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    config = EmulatorConfig.from_env()
    if args.config:
        raw = args.config
        if not raw.lstrip().startswith("{"):
            with open(raw, encoding="utf-8") as f:
                raw = f.read()
        config = config.merged(json.loads(raw))
    overrides = {k: v for k, v in (("embedder", args.embedder), ("hash_dim", args.hash_dim)) if v is not None}
    config = config.merged(overrides)

    stop_gcs = None
    gcs_host = args.gcs_host or os.environ.get("STORAGE_EMULATOR_HOST")
    if args.start_gcs:
        from reindex.emulators.gcs import start_gcs_emulator

        gcs_host, stop_gcs = start_gcs_emulator(args.host, args.gcs_port, set_env=False)
        print(f"GCS emulator on {gcs_host}", flush=True)
    emulator = VertexEmulator(config, host=args.host, port=args.port, gcs_host=gcs_host).start()
    print(f"Vertex emulator on {emulator.endpoint} (embedder={config.embedder}, gcs={gcs_host or 'real GCS'})",
          flush=True)
    from reindex.emulators.gcs import serve_until_stopped

    serve_until_stopped(emulator.stop, *([stop_gcs] if stop_gcs else []))
