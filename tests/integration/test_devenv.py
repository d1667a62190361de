"""`make airflow BACKEND=vertex` (scripts/devenv.py airflow --backend vertex): the emulators start with
the command, the Params form's Vertex defaults work against them, and they stop with the command —
when it ends, when the launcher gets SIGTERM, and when the launcher is killed outright."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from psycopg import sql

from tests.conftest import ROOT

DEVENV = ROOT / "scripts" / "devenv.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait(condition, what: str, timeout: float = 60.0, diagnose=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; {diagnose()}")
        time.sleep(0.1)


def _ps(pids: list[int]) -> str:
    """State, signal masks and threads of ``pids`` (what a stuck process is doing)."""
    out = []
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            continue
        keep = [ln for ln in status.splitlines() if ln.split(":")[0] in ("Name", "State", "SigBlk", "SigIgn",
                                                                         "SigCgt", "Threads", "PPid")]
        out.append(f"pid {pid}: {Path(f'/proc/{pid}/cmdline').read_text().replace(chr(0), ' ')} {keep}")
    return "; ".join(out) or "no such processes"


SLEEPER = [sys.executable, "-c", "import os, time; print('up', os.getpid(), flush=True); time.sleep(600)"]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def _read_until_up(proc: subprocess.Popen) -> tuple[int, list[int]]:
    """Read the launcher's output until its command printed 'up <pid>' (the emulators answered before
    that): the command's pid and the emulators' pids (from the launcher's banner)."""
    seen: list[str] = []
    for line in proc.stdout:
        if line.startswith("up "):
            banner = next(ln for ln in seen if ln.startswith("Vertex emulator "))
            return int(line.split()[1]), [int(p) for p in banner.rsplit("pids ", 1)[1].split()]
        seen.append(line)
    raise AssertionError(f"launcher ended (rc {proc.wait()}) before its command started: {''.join(seen)[-3000:]}")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """REINDEX_DATA_DIR of the launcher: the emulator model is built here once for the module."""
    return tmp_path_factory.mktemp("devenv")


def _launcher(data_dir: Path, ports: tuple[int, int], command: list[str], **popen) -> subprocess.Popen:
    env = {**os.environ, "REINDEX_DATA_DIR": str(data_dir), "REINDEX_VERTEX_POLL_SECONDS": "0.5",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("VERTEX_EMULATOR_CONFIG", None)
    return subprocess.Popen([sys.executable, str(DEVENV), "airflow", "--backend", "vertex", "--no-db",
                             "--gcs-port", str(ports[0]), "--vertex-port", str(ports[1]), "--", *command],
                            env=env, cwd=ROOT, start_new_session=True, **popen)


CHILD = """
import json, os, sys
from airflow.dag_processing.dagbag import DagBag
dag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"]).get_dag("reindex_corpus")
# The form's defaults, except where the corpus is: backend=vertex, model and output_dimensionality empty.
dr = dag.test(run_conf={"corpus": "devenv_vertex", "corpus_uri": sys.argv[1], "backend": "vertex"})
print("RESULT " + json.dumps({"state": str(dr.state), "env": {k: os.environ[k] for k in (
    "REINDEX_VERTEX_ENDPOINT", "STORAGE_EMULATOR_HOST", "REINDEX_GCS_BUCKET", "REINDEX_VERTEX_PROJECT",
    "AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT")}}), flush=True)
"""

DOCS = {"photo": "Green plants use chlorophyll to turn sunlight, water and carbon dioxide into sugar.",
        "leaves": "Leaves capture light energy and make food for the plant through photosynthesis.",
        "train": "The Trans-Siberian Railway links Moscow with Vladivostok across Siberia.",
        "baikal": "Байкал — самое глубокое озеро в мире."}


def test_form_defaults_run_on_the_emulators_and_keep_minilm_neighbours(airflow_db, data_dir, tmp_path, store_conn,
                                                                       encoder):
    for name, text in DOCS.items():
        (tmp_path / f"{name}.txt").write_text(text, encoding="utf-8")
    ports = (_free_port(), _free_port())
    proc = _launcher(data_dir, ports, [sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE,
                     stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-5000:]
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    assert result["state"] == "success", out[-5000:]
    assert result["env"] == {
        "REINDEX_VERTEX_ENDPOINT": f"http://127.0.0.1:{ports[1]}", "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{ports[0]}",
        "REINDEX_GCS_BUCKET": "reindex-batches", "REINDEX_VERTEX_PROJECT": "emulator",
        "AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT": json.dumps({"conn_type": "google_cloud_platform",
                                                         "extra": {"is_anonymous": True, "project": "emulator"}})}
    assert not _listening(ports[0]) and not _listening(ports[1])  # stopped with the command

    model_id, dim, table = store_conn.one(sql.SQL("""SELECT m.model_id, m.dim, s.table_name FROM {stores} s
        JOIN {models} m USING (model_checksum) WHERE s.corpus = 'devenv_vertex' AND s.status = 'ACTIVE'""").format(
        stores=store_conn.t("embedding_stores"), models=store_conn.t("models")))
    assert (model_id, dim) == ("text-embedding-005", 768)
    rows = store_conn.execute(sql.SQL("""SELECT c.text, e.embedding::text FROM {emb} e JOIN {chunks} c ON c.id = e.chunk_pk
        WHERE c.corpus = 'devenv_vertex' ORDER BY c.doc_id""").format(
        emb=store_conn.t(table), chunks=store_conn.t("chunks"))).fetchall()
    assert len(rows) == len(DOCS)
    stored = np.array([json.loads(v) for _, v in rows], dtype=np.float32)
    assert stored.shape == (4, 768)
    minilm = encoder.encode([text for text, _ in rows])
    # The emulator's 768-d vectors are an isometry of MiniLM's: the same cosine between every pair.
    np.testing.assert_allclose(stored @ stored.T, minilm @ minilm.T, atol=1e-5)


def test_sigterm_to_the_launcher_stops_the_command_and_the_emulators(data_dir):
    ports = (_free_port(), _free_port())
    proc = _launcher(data_dir, ports, SLEEPER, stdout=subprocess.PIPE, text=True)
    try:
        pid, emulators = _read_until_up(proc)
        assert _listening(ports[0]) and _listening(ports[1]) and all(_alive(p) for p in emulators)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM  # as a shell reports a SIGTERMed command
        assert not _alive(pid)  # it got SIGINT (standalone's clean stop), then its group was cleared
        assert not any(_alive(p) for p in emulators)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_a_killed_launcher_takes_the_emulators_down(data_dir):
    ports = (_free_port(), _free_port())
    proc = _launcher(data_dir, ports, SLEEPER, stdout=subprocess.PIPE, text=True)
    pid, emulators = None, []
    try:
        pid, emulators = _read_until_up(proc)
        assert _listening(ports[0]) and _listening(ports[1]) and all(_alive(p) for p in emulators)
        proc.send_signal(signal.SIGKILL)  # no cleanup code runs in the launcher
        proc.wait(timeout=30)
        _wait(lambda: not any(_alive(p) for p in emulators), "the emulators to stop (parent-death SIGTERM)",
              diagnose=lambda: _ps(emulators))
        _wait(lambda: not _alive(pid), "the command to stop (parent-death SIGINT)", diagnose=lambda: _ps([pid]))
    finally:
        for p in [pid, *emulators]:
            if p is not None and _alive(p):
                os.kill(p, signal.SIGKILL)


def test_a_taken_port_is_refused_with_the_way_out(data_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = _launcher(data_dir, (port, _free_port()), ["true"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert f"port {port} for the GCS emulator is in use: stop what listens there, or choose another " \
           "(make airflow BACKEND=vertex GCS_PORT=...)" in out
