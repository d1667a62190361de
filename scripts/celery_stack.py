"""Airflow with the CeleryExecutor on one host, no Docker: api-server, scheduler, dag-processor, triggerer and
N Celery workers (default 2), from the repository's own files, on the embedded PostgreSQL (docs/scale-out.md).

Usage:
  make airflow-celery [CELERY_ARGS="--workers 3 --concurrency 4"]
        = .venv/bin/python scripts/devenv.py airflow -- .venv/bin/python scripts/celery_stack.py ARGS
  .venv/bin/python scripts/celery_stack.py [--workers 2] [--concurrency 2] [--api-port 8080] [--host 127.0.0.1]
        [--log-port 8793] [--queues default,reindex_gpu] [--skip-migrate]

The Airflow environment (metadata DB, DAG and plugin folders, the ``reindex_pg`` connection) is the one this
process gets — ``make airflow-celery`` runs it under ``scripts/devenv.py``, which starts the embedded server —
or, when ``AIRFLOW__DATABASE__SQL_ALCHEMY_CONN`` is not set, ``devenv.setup()``'s. On top of it every
component gets:

- ``AIRFLOW__CORE__EXECUTOR=CeleryExecutor``;
- the broker ``AIRFLOW__CELERY__BROKER_URL``: ``$REINDEX_CELERY_BROKER`` (e.g. ``redis://localhost:6379/0``)
  when set, else Celery's SQLAlchemy transport on the metadata database (``sqla+postgresql…``: tables
  ``kombu_queue``/``kombu_message``, polled — no extra service; it has no broadcast, so the workers run
  ``--without-mingle --without-gossip`` and ``airflow celery inspect``-style commands see no worker);
- the result backend ``AIRFLOW__CELERY__RESULT_BACKEND``: ``db+`` the metadata database;
- one JWT secret (``AIRFLOW__API_AUTH__JWT_SECRET``, random per start unless set) shared by the api-server
  that issues task tokens and the workers' tasks that present them, and
  ``AIRFLOW__CORE__EXECUTION_API_SERVER_URL`` pointing at this api-server.

Values already in the environment win (an explicit ``AIRFLOW__CELERY__BROKER_URL`` over
``REINDEX_CELERY_BROKER``), except the executor and the execution-API URL. Worker ``i`` (1-based) is Celery
hostname ``worker{i}@<host>``, serves its logs on the ``i``-th free port from ``--log-port`` (8793, 8795, … by
default: the triggerer's log server keeps ``[logging] trigger_log_server_port``, 8794) and records ``worker{i}@<host>`` as
``task_instance.hostname`` (``AIRFLOW__CORE__HOSTNAME_CALLABLE=reindex.settings.worker_hostname``), so the UI and
the metadata DB say which worker ran a task. Workers listen on Airflow's default queue plus
``$REINDEX_ENCODE_QUEUE`` when that is set (``--queues`` overrides). Logs: ``<logs>/celery-stack/NAME.log``.

Stopping: SIGINT (Ctrl-C) or SIGTERM stops the components in dependency order — the scheduler, dag-processor
and triggerer first (no new work), then the workers (Celery's warm shutdown: running tasks finish), then the
api-server the finishing tasks report to — each SIGKILLed (its whole process group) if still there
``--grace`` seconds after the stop began. A second signal kills everything at once. Every component gets
SIGTERM from the kernel if this process dies (``devenv._die_with_parent``). Under ``make airflow-celery`` the
launcher (``devenv.run``) turns Ctrl-C into one SIGINT to this process and SIGKILLs it after its own grace.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # devenv, beside this file
import devenv  # noqa: E402

from reindex import settings  # noqa: E402

READY = "celery stack ready:"  # the line printed once every component is started and the api-server answers

# Run once, before any component, in the stack's environment: the result backend's tables, and — on the
# SQLAlchemy transport — its tables and one row per queue. Each would otherwise be created on first use by
# whichever process comes first, and the others fail ("relation kombu_queue already exists", a duplicate queue).
_PREPARE = """
import sys
from airflow.providers.celery.executors.celery_executor import app
if hasattr(app.backend, "ResultSession"):
    app.backend.ResultSession().close()
if app.conf.broker_url.startswith(("sqla+", "sqlalchemy+")):
    with app.connection_for_write() as conn:
        for queue in sys.argv[1].split(","):
            conn.default_channel.queue_declare(queue=queue, durable=True)
"""


@dataclass
class Component:
    name: str
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    stop_phase: int = 0  # stopped in ascending phase order: 0 scheduling, 1 workers, 2 api-server
    proc: subprocess.Popen | None = None
    log: Path | None = None


def broker_urls(env: dict[str, str]) -> tuple[str, str]:
    """(broker URL, result backend URL) for ``env``: its own ``AIRFLOW__CELERY__*`` values if set; else
    ``REINDEX_CELERY_BROKER`` or the SQLAlchemy transport on the metadata DB, and ``db+`` that DB."""
    db = env.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "")
    if not db.startswith("postgresql"):
        raise SystemExit(f"celery_stack: the metadata database must be PostgreSQL (the broker and result backend "
                         f"live there unless REINDEX_CELERY_BROKER is set); AIRFLOW__DATABASE__SQL_ALCHEMY_CONN="
                         f"{db!r}")
    broker = env.get("AIRFLOW__CELERY__BROKER_URL") or settings.celery_broker() or f"sqla+{db}"
    return broker, env.get("AIRFLOW__CELERY__RESULT_BACKEND") or f"db+{db}"


def stack_env(base: dict[str, str], *, host: str, api_port: int) -> dict[str, str]:
    """The environment shared by every component (see the module docstring)."""
    env = dict(base)
    broker, backend = broker_urls(env)
    env.update({
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CELERY__BROKER_URL": broker,
        "AIRFLOW__CELERY__RESULT_BACKEND": backend,
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://{_client_host(host)}:{api_port}/execution/",
    })
    env.setdefault("AIRFLOW__API_AUTH__JWT_SECRET", secrets.token_urlsafe(32))
    if broker.startswith(("redis://", "rediss://")):
        # Redis redelivers a task unacknowledged this long; an encode partition must finish well within it.
        env.setdefault("AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT", "86400")
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    return env


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


def default_queues(env: dict[str, str]) -> str:
    """Airflow's default queue, plus the encode queue (``REINDEX_ENCODE_QUEUE``) when one is configured."""
    queue = env.get("AIRFLOW__OPERATORS__DEFAULT_QUEUE") or "default"
    return ",".join(dict.fromkeys(q for q in (queue, settings.encode_queue()) if q))


def trigger_log_port(env: dict[str, str]) -> int:
    return int(env.get("AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT") or 8794)


def worker_log_ports(first: int, workers: int, env: dict[str, str]) -> list[int]:
    """One log-server port per worker from ``first`` up, skipping the triggerer's (both servers share the host)."""
    ports: list[int] = []
    port = first
    while len(ports) < workers:
        if port != trigger_log_port(env):
            ports.append(port)
        port += 1
    return ports


def components(args: argparse.Namespace, env: dict[str, str]) -> list[Component]:
    airflow = [sys.executable, "-m", "airflow"]
    sqla = env["AIRFLOW__CELERY__BROKER_URL"].startswith(("sqla+", "sqlalchemy+"))
    host = socket.gethostname()
    out = [Component("api-server", [*airflow, "api-server", "--host", args.host, "--port", str(args.api_port),
                                    "--workers", str(args.api_workers)], stop_phase=2),
           Component("scheduler", [*airflow, "scheduler"]),
           Component("dag-processor", [*airflow, "dag-processor"]),
           Component("triggerer", [*airflow, "triggerer"])]
    for i, log_port in enumerate(worker_log_ports(args.log_port, args.workers, env), start=1):
        name = f"worker{i}@{host}"
        cmd = [*airflow, "celery", "worker", "--celery-hostname", name, "--queues", args.queues or default_queues(env),
               "--concurrency", str(args.concurrency)]
        if sqla:  # mingle and gossip are broadcasts, which the SQLAlchemy transport does not have
            cmd += ["--without-mingle", "--without-gossip"]
        out.append(Component(f"worker{i}", cmd, stop_phase=1, env={
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(log_port),
            "REINDEX_WORKER_HOSTNAME": name,
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "reindex.settings.worker_hostname",
        }))
    return out


class Stack:
    """The started components; ``stop`` ends them in phase order (module docstring, "Stopping")."""

    def __init__(self, parts: list[Component], env: dict[str, str], log_dir: Path, grace: float) -> None:
        self.parts, self.env, self.log_dir, self.grace = parts, env, log_dir, grace
        self.stopping = False

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for c in self.parts:
            c.log = self.log_dir / f"{c.name}.log"
            with open(c.log, "w") as out:
                c.proc = subprocess.Popen(c.args, env={**self.env, **c.env}, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True,
                                          preexec_fn=devenv._die_with_parent(signal.SIGTERM))

    def exited(self) -> Component | None:
        """A component that ended on its own (the stack is then broken), if any."""
        return next((c for c in self.parts if c.proc is not None and c.proc.poll() is not None), None)

    def kill(self) -> None:
        for c in self.parts:
            if c.proc is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(c.proc.pid, signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM phase by phase (each waits for its components), SIGKILL what is left at the grace deadline;
        then kill each component's process group (children a clean stop left behind, none normally)."""
        self.stopping = True
        deadline = time.monotonic() + self.grace
        for phase in sorted({c.stop_phase for c in self.parts}):
            group = [c for c in self.parts if c.stop_phase == phase and c.proc is not None]
            for c in group:
                with contextlib.suppress(ProcessLookupError):
                    c.proc.send_signal(signal.SIGTERM)  # the main process: Celery's warm shutdown, Airflow's exit
            for c in group:
                try:
                    c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    print(f"celery_stack: {c.name} did not stop within {self.grace:.0f} s: SIGKILL", flush=True)
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(c.proc.pid, signal.SIGKILL)
                    c.proc.wait()
        self.kill()


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="scripts/celery_stack.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2, help="Celery workers (default 2)")
    ap.add_argument("--concurrency", type=int, default=2, help="task slots per worker (default 2)")
    ap.add_argument("--api-port", type=int, default=int(os.environ.get("AIRFLOW__API__PORT") or 8080))
    ap.add_argument("--api-workers", type=int, default=1, help="api-server worker processes (default 1)")
    ap.add_argument("--host", default="127.0.0.1", help="the api-server's bind address (default 127.0.0.1)")
    ap.add_argument("--log-port", type=int, default=8793,
                    help="worker 1's log server port; the next workers take the next ports but the triggerer's")
    ap.add_argument("--queues", default="", help="queues every worker listens on (default: default queue, "
                                                 "plus $REINDEX_ENCODE_QUEUE)")
    ap.add_argument("--grace", type=float, default=45.0, help="seconds a stop may take before SIGKILL (default 45)")
    ap.add_argument("--skip-migrate", action="store_true", help="the metadata DB is already migrated")
    args = ap.parse_args(argv)
    for name in ("workers", "concurrency", "api_workers"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")

    base = dict(os.environ)
    if not base.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"):
        base.update(devenv.setup())
    env = stack_env(base, host=args.host, api_port=args.api_port)
    log_ports = worker_log_ports(args.log_port, args.workers, env)
    ports = [args.api_port, trigger_log_port(env), *log_ports]
    if busy := [p for p in ports if devenv._port_taken(p)]:
        raise SystemExit(f"celery_stack: port(s) {busy} in use (api-server {args.api_port}, triggerer log server "
                         f"{trigger_log_port(env)} = AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT, worker log servers "
                         f"{log_ports}): stop what listens there or choose others (--api-port, --log-port)")
    if not args.skip_migrate:
        subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
    home = Path(env.get("AIRFLOW_HOME") or Path.home() / "airflow")
    log_dir = Path(env.get("AIRFLOW__LOGGING__BASE_LOG_FOLDER") or home / "logs") / "celery-stack"
    parts = components(args, env)
    queues = {q for c in parts if c.stop_phase == 1 for q in c.args[c.args.index("--queues") + 1].split(",")}
    subprocess.run([sys.executable, "-c", _PREPARE, ",".join(sorted(queues))], env=env, check=True)
    stack = Stack(parts, env, log_dir, args.grace)
    stop_signal: dict[str, int] = {}

    def request_stop(signum, _frame) -> None:
        if stack.stopping:
            print("celery_stack: stopping now (SIGKILL)", flush=True)
            stack.kill()
            return
        stop_signal["signum"] = signum
        raise KeyboardInterrupt  # leaves the wait below wherever it is; the finally stops the stack

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, request_stop)
    broken: Component | None = None
    try:
        stack.start()
        api = stack.parts[0]
        devenv._wait_ready(api.proc, f"http://{_client_host(args.host)}:{args.api_port}/api/v2/monitor/health",
                           api.log, timeout=180.0)
        workers = [c for c in stack.parts if c.stop_phase == 1]
        print(f"{READY} UI http://{_client_host(args.host)}:{args.api_port} (login 'admin', password in "
              f"{env.get('AIRFLOW_HOME', '~/airflow')}/simple_auth_manager_passwords.json.generated); broker "
              f"{_redact(env['AIRFLOW__CELERY__BROKER_URL'])}; workers "
              f"{' '.join(c.env['REINDEX_WORKER_HOSTNAME'] for c in workers)} on queue(s) "
              f"{workers[0].args[workers[0].args.index('--queues') + 1]}; logs in {log_dir}; pids "
              f"{' '.join(f'{c.name}={c.proc.pid}' for c in stack.parts)}", flush=True)
        while (broken := stack.exited()) is None:
            time.sleep(1.0)
        print(f"celery_stack: {broken.name} exited with {broken.proc.returncode}; stopping the rest "
              f"(log {broken.log})", flush=True)
    except KeyboardInterrupt:
        print(f"celery_stack: stopping ({signal.Signals(stop_signal.get('signum', signal.SIGINT)).name}; "
              f"again to kill at once)", flush=True)
    finally:
        stack.stopping = True  # from here a signal kills at once instead of interrupting the stop
        stack.stop()
    if broken is not None:
        return 1
    return 0


def _redact(url: str) -> str:
    """A broker URL without its password (``redis://:secret@host`` → ``redis://:***@host``)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@", 1)
    return url


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
