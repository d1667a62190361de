"""``python -m reindex.emulators.embedding_service``: serve the reference embedding service.

Settings: the ``ServiceConfig`` defaults, then ``REINDEX_SERVICE_*`` variables (``ServiceConfig.from_env``;
the API key best comes from ``REINDEX_SERVICE_API_KEY``, not the command line, where ``ps`` shows it),
then the flags. Prints ``embedding service listening on http://<host>:<port>`` once serving, and
runs until SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from reindex.emulators.embedding_service.config import (
    EMBEDDERS,
    SEED_RATE_LIMIT,
    SEED_RATE_LIMIT_BATCH,
    ServiceConfig,
)
from reindex.emulators.embedding_service.faults import Faults
from reindex.emulators.embedding_service.server import EmbeddingService


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m reindex.emulators.embedding_service",
                                description="Offline reference embedding service (protocols seed004 and openai).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8090, help="0: a free port (printed)")
    p.add_argument("--embedder", choices=EMBEDDERS, default=None,
                   help="model (bundled MiniLM, default), hash (TESTS ONLY) or noop (constant vectors)")
    p.add_argument("--api-key", default=None, help="required key (default: $REINDEX_SERVICE_API_KEY; none: open)")
    p.add_argument("--dim", type=int, default=None, help="dimensions of the hash/noop embedders (384)")
    p.add_argument("--model-name", default=None)
    p.add_argument("--model-version", default=None)
    p.add_argument("--max-batch-size", type=int, default=None)
    p.add_argument("--max-text-length", type=int, default=None)
    p.add_argument("--max-concurrent-requests", type=int, default=None)
    p.add_argument("--encode-timeout", type=float, default=None, help="seconds (encode_timeout_seconds)")
    p.add_argument("--encode-delay", type=float, default=None, help="extra seconds per encode call")
    p.add_argument("--rate-limit", default=None, help="single /embed, e.g. 100/minute ('none': off)")
    p.add_argument("--rate-limit-batch", default=None, help="batch endpoints, e.g. 20/minute ('none': off)")
    p.add_argument("--seed-limits", action="store_true",
                   help=f"the real service's rate limits ({SEED_RATE_LIMIT}, batch {SEED_RATE_LIMIT_BATCH})")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--faults", default=None, help="JSON object of fault fields (see faults.Faults)")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> ServiceConfig:
    """Environment first, flags over it (``ValueError`` names a bad value)."""
    overrides: dict[str, Any] = {}
    if args.seed_limits:
        overrides.update(rate_limit=SEED_RATE_LIMIT, rate_limit_batch=SEED_RATE_LIMIT_BATCH)
    for name in ("embedder", "api_key", "dim", "model_name", "model_version", "max_batch_size", "max_text_length",
                 "max_concurrent_requests"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.encode_timeout is not None:
        overrides["encode_timeout_seconds"] = args.encode_timeout
    if args.encode_delay is not None:
        overrides["encode_delay_seconds"] = args.encode_delay
    for name in ("rate_limit", "rate_limit_batch"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = None if value.lower() in ("none", "off") else value
    if args.no_cache:
        overrides["cache_enabled"] = False
    if args.faults:
        overrides["faults"] = Faults.from_mapping(json.loads(args.faults))
    return ServiceConfig.from_env(**overrides)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"embedding service: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    service = EmbeddingService(config, host=args.host, port=args.port).start()
    logging.getLogger(__name__).info("configuration: %s", json.dumps(config.describe()))
    print(f"embedding service listening on http://{args.host}:{service.port}", flush=True)
    from reindex.emulators.gcs import serve_until_stopped

    serve_until_stopped(service.stop)
