"""Write the .env of docker-compose.yaml with fresh random secrets (from .env.example).

Usage: python scripts/gen_env.py [--observability] [--output .env] [--force] [--stdout]

Every empty ``KEY=`` of .env.example that is a known secret gets a new value; the other lines are
copied as they are. ``--observability`` sets ``COMPOSE_PROFILES=observability`` and
``AIRFLOW_METRICS_ON=true``. An existing output file is never overwritten without ``--force``
(its secrets encrypt data already stored: a new Fernet key cannot read them). The file is written
with mode 0600. Standard library only: runs before any venv exists.
"""

from __future__ import annotations

import argparse
import base64
import os
import secrets
import string
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / ".env.example"


def fernet_key() -> str:
    """A Fernet key: urlsafe base64 of 32 random bytes (what ``Fernet.generate_key()`` returns)."""
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()


def password() -> str:
    """24 letters and digits (about 143 bits): safe inside connection URLs, JSON and command lines."""
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(24))


SECRETS: dict[str, Callable[[], str]] = {
    "AIRFLOW_FERNET_KEY": fernet_key,
    "AIRFLOW_JWT_SECRET": lambda: secrets.token_hex(32),
    "AIRFLOW_API_SECRET_KEY": lambda: secrets.token_hex(32),
    "AIRFLOW_ADMIN_PASSWORD": password,
    "POSTGRES_PASSWORD": password,
    "REDIS_PASSWORD": password,
    "GRAFANA_ADMIN_PASSWORD": password,
    "REINDEX_SERVICE_API_KEY": password,
}


def render(example: str, *, observability: bool = False) -> str:
    """.env text from .env.example's text: secrets filled in, the rest kept."""
    out = []
    overrides = {"COMPOSE_PROFILES": "observability", "AIRFLOW_METRICS_ON": "true"} if observability else {}
    for line in example.splitlines():
        key, sep, value = line.partition("=")
        key = key.strip()
        if sep and not line.lstrip().startswith("#"):
            if key in SECRETS and not value.strip():
                line = f"{key}={SECRETS[key]()}"
            elif key in overrides:
                line = f"{key}={overrides[key]}"
        out.append(line)
    missing = set(SECRETS) - {ln.partition("=")[0] for ln in out if not ln.startswith("#")}
    if missing:
        raise SystemExit(f".env.example lacks {sorted(missing)}: add them (empty) so they are generated")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python scripts/gen_env.py", description=__doc__.split("\n")[0])
    ap.add_argument("--output", default=str(ROOT / ".env"))
    ap.add_argument("--observability", action="store_true",
                    help="COMPOSE_PROFILES=observability and AIRFLOW_METRICS_ON=true")
    ap.add_argument("--force", action="store_true", help="overwrite an existing output file")
    ap.add_argument("--stdout", action="store_true", help="print instead of writing a file")
    args = ap.parse_args(argv)
    text = render(EXAMPLE.read_text(encoding="utf-8"), observability=args.observability)
    if args.stdout:
        sys.stdout.write(text)
        return 0
    out = Path(args.output)
    if out.exists() and not args.force:
        print(f"{out} exists: keeping it (its Fernet key encrypts stored connections). "
              "Use --force to replace it, or --stdout to print a new one.", file=sys.stderr)
        return 1
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(out, 0o600)
    print(f"wrote {out} (mode 0600) with new secrets; start with: docker compose up -d")
    return 0


if __name__ == "__main__":
    sys.exit(main())
