"""Write the SimpleAuthManager passwords file from the environment (run by the api-server container
before ``airflow api-server``; docker-compose.yaml).

The user list comes from ``AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS`` (``<user>:<role>``); this gives
``$AIRFLOW_ADMIN_USER`` the password ``$AIRFLOW_ADMIN_PASSWORD`` in
``$AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE`` (mode 0600), so Airflow never generates
and prints one. Exits 2 with the reason when a variable is missing or the password is short.
"""

from __future__ import annotations

import json
import os
import sys

MIN_PASSWORD_LENGTH = 12


def main() -> int:
    env = os.environ
    user = env.get("AIRFLOW_ADMIN_USER", "admin").strip()
    password = env.get("AIRFLOW_ADMIN_PASSWORD", "")
    path = env.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE", "")
    if not path:
        print("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE is not set", file=sys.stderr)
        return 2
    if len(password) < MIN_PASSWORD_LENGTH:
        print(f"AIRFLOW_ADMIN_PASSWORD must have at least {MIN_PASSWORD_LENGTH} characters (has {len(password)}); "
              "generate one with: python scripts/gen_env.py", file=sys.stderr)
        return 2
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({user: password}, f)
        f.write("\n")
    os.chmod(path, 0o600)  # an existing file keeps its mode through O_CREAT
    print(f"SimpleAuthManager: password of user {user!r} set from AIRFLOW_ADMIN_PASSWORD in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
