"""docker-compose.yaml: the Compose specification, the production shape, secure defaults, the
observability profile, and the metric names shared by metrics.py, statsd-exporter and Grafana.

No Docker engine exists here, so the file is parsed, interpolated the way Compose does
(``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}``, ``$$``) with a .env made by
``scripts/gen_env.py``, and validated with jsonschema against the vendored Compose schema.
"""

from __future__ import annotations

import base64
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.conftest import ROOT

# A copy of the Compose specification's JSON schema, vendored so a fresh clone validates offline.
SPEC = ROOT / "tests" / "data" / "compose-spec.json"
COMPOSE = ROOT / "docker-compose.yaml"
DEPLOY = ROOT / "deploy"
AIRFLOW_SERVICES = {"airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
                    "airflow-worker", "airflow-worker-gpu"}
OBSERVABILITY = {"statsd-exporter", "prometheus", "grafana"}

sys.path.insert(0, str(ROOT / "scripts"))
import gen_env  # noqa: E402  (scripts/ is not a package)

_VAR = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


class MissingVariable(Exception):
    pass


def interpolate(value, env: dict[str, str]):
    """Compose's variable substitution over a parsed YAML value."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(1):
            return "$"
        name = m.group(2) or m.group(5)
        op, arg = m.group(3), m.group(4) or ""
        current = env.get(name)
        unset = current is None or (op is not None and op.startswith(":") and current == "")
        if op in (":-", "-"):
            return arg if unset else current
        if op in (":?", "?"):
            if unset:
                raise MissingVariable(f"required variable {name} is missing a value: {arg}")
            return current
        return current or ""

    return _VAR.sub(sub, value)


def parse_env(text: str) -> dict[str, str]:
    return {k.strip(): v for k, _, v in (line.partition("=") for line in text.splitlines())
            if k.strip() and not k.lstrip().startswith("#")}


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    """A .env as `python scripts/gen_env.py --observability` writes it."""
    return parse_env(gen_env.render((ROOT / ".env.example").read_text(), observability=True))


@pytest.fixture(scope="module")
def compose(raw, env) -> dict:
    return interpolate(raw, env)


def test_valid_against_the_compose_schema(raw, compose):
    validator = jsonschema.Draft7Validator(json.loads(SPEC.read_text()))
    validator.validate(raw)
    validator.validate(compose)


def test_production_shape(compose, env):
    services = compose["services"]
    assert AIRFLOW_SERVICES | {"postgres", "redis", "airflow-init"} <= set(services)
    for name in AIRFLOW_SERVICES:
        deps = services[name]["depends_on"]
        assert deps["postgres"]["condition"] == "service_healthy"
        assert deps["redis"]["condition"] == "service_healthy"
        assert deps["airflow-init"]["condition"] == "service_completed_successfully"
        e = services[name]["environment"]
        assert e["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
        assert {"./dags:/opt/airflow/dags", "./plugins:/opt/airflow/plugins",
                "./include:/opt/airflow/include"} <= set(services[name]["volumes"])
    assert services["airflow-worker"]["depends_on"]["airflow-apiserver"]["condition"] == "service_healthy"
    assert "pgvector" in services["postgres"]["image"]
    e = services["airflow-scheduler"]["environment"]
    metadata_db = e["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].rsplit("/", 1)[1]
    store = json.loads(e["AIRFLOW_CONN_REINDEX_PG"])
    assert (metadata_db, store["schema"]) == ("airflow", "reindex")  # separate databases
    assert store["password"] == env["POSTGRES_PASSWORD"] == services["postgres"]["environment"]["POSTGRES_PASSWORD"]
    assert e["AIRFLOW__CELERY__BROKER_URL"] == f"redis://:{env['REDIS_PASSWORD']}@redis:6379/0"
    init_sql = (DEPLOY / "postgres-init.sql").read_text()
    assert "CREATE DATABASE airflow" in init_sql and "CREATE DATABASE reindex" in init_sql


def test_every_service_is_health_checked_and_waits_on_what_it_needs(compose):
    services = compose["services"]
    for name, svc in services.items():
        if name != "airflow-init":  # a one-shot job: its dependants wait for it to complete
            assert "healthcheck" in svc and svc["healthcheck"]["test"], f"{name} has no healthcheck"
        for dep, spec in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            wanted = "service_completed_successfully" if dep == "airflow-init" else "service_healthy"
            assert spec["condition"] == wanted, f"{name} → {dep}: {spec['condition']}"
            if "profiles" in services[dep] and set(services[dep]["profiles"]) - set(svc.get("profiles", [])):
                assert spec.get("required") is False, f"{name} needs {dep} of an optional profile"
    assert services["prometheus"]["depends_on"] == {"statsd-exporter": {"condition": "service_healthy"}}
    assert services["grafana"]["depends_on"] == {"prometheus": {"condition": "service_healthy"}}

    def reach(start: str, seen: tuple = ()) -> None:  # no dependency cycles
        assert start not in seen, f"dependency cycle: {' → '.join((*seen, start))}"
        for dep in services[start].get("depends_on") or {}:
            reach(dep, (*seen, start))

    for name in services:
        reach(name)


def test_volumes_exist(compose):
    declared = set(compose["volumes"])
    for name, svc in compose["services"].items():
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which is not in the repository"
            else:
                assert source in declared, f"{name} uses undeclared volume {source}"


def test_no_secret_has_a_default(raw, env):
    text = "\n".join(ln for ln in COMPOSE.read_text().splitlines() if not ln.lstrip().startswith("#"))
    required = set(re.findall(r"\$\{([A-Z_]+):\?", text))
    assert required == set(gen_env.SECRETS)
    for name in gen_env.SECRETS:
        uses = re.findall(r"\$\{" + name + r"([^}]*)\}", text)
        assert uses and all(u.startswith(":?set " + name + " in .env") for u in uses), (name, uses)
        for missing in ({k: v for k, v in env.items() if k != name}, {**env, name: ""}):
            with pytest.raises(MissingVariable, match=f"required variable {name} is missing a value: set {name} in "
                                                      r"\.env \(python scripts/gen_env\.py\)"):
                interpolate(raw, missing)
    for weak in ("admin:admin", "change-me", "airflow:airflow@", '"password": "airflow"', "POSTGRES_PASSWORD: airflow",
                 "redis://:@"):
        assert weak not in text, f"docker-compose.yaml still has {weak!r}"


def test_published_ports_bind_the_configured_address(raw, compose):
    for name, svc in raw["services"].items():
        for port in svc.get("ports", []):
            assert port.startswith("${BIND_ADDRESS:-127.0.0.1}:"), f"{name} publishes {port} on every interface"
    published = {p for svc in compose["services"].values() for p in svc.get("ports", [])}
    assert published == {"127.0.0.1:5432:5432", "127.0.0.1:8080:8080", "127.0.0.1:9090:9090", "127.0.0.1:3000:3000"}


def test_ui_password_comes_from_env(compose, tmp_path):
    api = compose["services"]["airflow-apiserver"]
    e = api["environment"]
    assert e["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"] == "admin:admin"  # user admin, role admin
    assert e["AIRFLOW_ADMIN_PASSWORD"] and "AIRFLOW_ADMIN_PASSWORD" not in compose["services"]["airflow-worker"][
        "environment"]  # only the api-server sees it
    assert api["command"][-1].startswith("python /opt/reindex/deploy/airflow-passwords.py && exec airflow api-server")
    target = tmp_path / "passwords.json"
    script = DEPLOY / "airflow-passwords.py"
    base = {"PATH": os.environ["PATH"], "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(target),
            "AIRFLOW_ADMIN_USER": "ops"}
    ok = subprocess.run([sys.executable, str(script)], env={**base, "AIRFLOW_ADMIN_PASSWORD": "x" * 24},
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(target.read_text()) == {"ops": "x" * 24}
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    short = subprocess.run([sys.executable, str(script)], env={**base, "AIRFLOW_ADMIN_PASSWORD": "short"},
                           capture_output=True, text=True)
    assert short.returncode == 2
    assert "AIRFLOW_ADMIN_PASSWORD must have at least 12 characters (has 5)" in short.stderr


def test_gen_env_writes_fresh_secrets_once(tmp_path):
    from cryptography.fernet import Fernet

    out = tmp_path / ".env"
    first = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_env.py"), "--output", str(out)],
                           capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    values = parse_env(out.read_text())
    for name in gen_env.SECRETS:
        assert len(values[name]) >= 24, name
    assert len(base64.urlsafe_b64decode(values["AIRFLOW_FERNET_KEY"])) == 32
    Fernet(values["AIRFLOW_FERNET_KEY"].encode())  # a key Airflow accepts
    assert (values["COMPOSE_PROFILES"], values["AIRFLOW_METRICS_ON"], values["BIND_ADDRESS"]) == ("", "false",
                                                                                                   "127.0.0.1")
    again = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_env.py"), "--output", str(out)],
                           capture_output=True, text=True)
    assert again.returncode == 1 and "exists: keeping it" in again.stderr
    assert parse_env(out.read_text()) == values
    other = parse_env(gen_env.render((ROOT / ".env.example").read_text()))
    assert all(other[k] != values[k] for k in gen_env.SECRETS)  # fresh every time


def test_env_example_leaves_every_secret_empty():
    example = parse_env((ROOT / ".env.example").read_text())
    assert {k: example[k] for k in gen_env.SECRETS} == dict.fromkeys(gen_env.SECRETS, "")


def test_observability_profile(compose, env):
    services = compose["services"]
    for name in OBSERVABILITY:
        assert services[name]["profiles"] == ["observability"], name
    for name in AIRFLOW_SERVICES:
        assert services[name]["depends_on"]["statsd-exporter"] == {"condition": "service_healthy", "required": False}
        e = services[name]["environment"]
        assert (e["AIRFLOW__METRICS__STATSD_ON"], e["AIRFLOW__METRICS__STATSD_HOST"], e["AIRFLOW__METRICS__STATSD_PORT"],
                e["AIRFLOW__METRICS__STATSD_PREFIX"]) == ("true", "statsd-exporter", "9125", "airflow")
    exporter = " ".join(services["statsd-exporter"]["command"])
    assert "--statsd.listen-udp=:9125" in exporter and "--web.listen-address=:9102" in exporter
    assert "--statsd.mapping-config=/etc/statsd-exporter/mapping.yml" in exporter
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert "statsd-exporter:9102" in targets
    grafana = services["grafana"]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == env["GRAFANA_ADMIN_PASSWORD"]
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    ds = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert [(d["uid"], d["url"]) for d in ds["datasources"]] == [("prometheus", "http://prometheus:9090")]
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "reindex.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    assert "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana["volumes"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (DEPLOY / "grafana" / "dashboards" / Path(home).name).exists()


# --- one set of metric names: metrics.py → statsd-exporter mapping → Grafana --------------------------

def _mapping() -> list[dict]:
    return yaml.safe_load((DEPLOY / "statsd-exporter" / "mapping.yml").read_text())["mappings"]


def test_statsd_mapping_covers_exactly_the_emitted_metrics():
    from reindex_airflow.metrics import METRICS, TIMER

    by_match = {m["match"]: m for m in _mapping()}
    expected = {"airflow." + re.sub(r"<[A-Z]+>", "*", name): kind for name, kind in METRICS.items()}
    assert set(by_match) == set(expected)
    for match, kind in expected.items():
        m = by_match[match]
        assert re.fullmatch(r"reindex_[a-z_]+", m["name"]), m["name"]
        if kind == TIMER:
            assert m["name"].endswith("_seconds") and m.get("observer_type", "histogram") == "histogram"
        else:
            assert m["name"].endswith("_total"), m["name"]
        assert len(m.get("labels", {})) == match.count("*")  # the name's variable part becomes a label


def test_dashboard_queries_only_emitted_metrics():
    from reindex_airflow.metrics import TIMER

    timers = {m["name"] for m in _mapping() if m["match"].removeprefix("airflow.") in _timer_matches(TIMER)}
    exported = {m["name"] for m in _mapping() if m["name"] not in timers}
    exported |= {f"{t}_{suffix}" for t in timers for suffix in ("bucket", "sum", "count")}
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "reindex.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    used = {name for e in exprs for name in re.findall(r"\breindex_[a-z_]+\b", e)}
    assert used and used <= exported, sorted(used - exported)
    # and every metric has a panel
    assert {re.sub(r"_(bucket|sum|count)$", "", u) for u in used} == {m["name"] for m in _mapping()}
    assert all(p["datasource"]["uid"] == "prometheus" for p in dashboard["panels"])
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def _timer_matches(timer_kind: str) -> set[str]:
    from reindex_airflow.metrics import METRICS

    return {re.sub(r"<[A-Z]+>", "*", n) for n, k in METRICS.items() if k == timer_kind}


def test_offline_emulators_are_services(compose):
    services = compose["services"]
    for name in ("gcs-emulator", "vertex-emulator"):
        assert services[name]["profiles"] == ["offline"] and "healthcheck" in services[name]
    assert "reindex.emulators.vertex" in services["vertex-emulator"]["command"]
    assert services["vertex-emulator"]["depends_on"]["gcs-emulator"]["condition"] == "service_healthy"


def test_image_installs_the_pinned_requirements():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "apache/airflow:3.3.2" in dockerfile
    assert "-r requirements.txt -c constraints.txt" in dockerfile
    assert Path(ROOT / "requirements.txt").read_text().count("-e .") == 1


# --- scale-out (docs/scale-out.md): the GPU worker, the shared corpus volume, the fan-out settings ----------

def test_gpu_worker_profile_takes_the_encode_queue_on_a_gpu(raw, compose, env):
    gpu, cpu = compose["services"]["airflow-worker-gpu"], compose["services"]["airflow-worker"]
    assert gpu["profiles"] == ["gpu"] and "profiles" not in cpu
    assert gpu["command"] == ["celery", "worker", "--queues", "reindex_gpu", "--concurrency", "1"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": "1", "capabilities": ["gpu"]}]
    assert gpu["build"]["args"]["TORCH_INDEX_URL"].startswith("https://download.pytorch.org/whl/cu")
    assert gpu["image"] != cpu["image"]  # the CUDA build is its own image; the CPU one stays as it is
    # the same broker, database, store and secrets as the CPU worker; it waits for what the CPU worker waits for
    assert gpu["environment"] == cpu["environment"]
    assert gpu["depends_on"] == cpu["depends_on"] and gpu["healthcheck"]["test"] == cpu["healthcheck"]["test"]
    # one queue name for both sides: the worker listens where the DAGs (parsed with the same .env) route encodes
    routed = interpolate(raw, {**env, "REINDEX_ENCODE_QUEUE": "gpu_a100", "REINDEX_GPU_COUNT": "all"})["services"]
    assert routed["airflow-worker-gpu"]["command"][3] == "gpu_a100"
    assert routed["airflow-worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["count"] == "all"
    for name in AIRFLOW_SERVICES:
        assert routed[name]["environment"]["REINDEX_ENCODE_QUEUE"] == "gpu_a100", name
    assert "--queues" not in " ".join(cpu["command"] if isinstance(cpu["command"], list) else [cpu["command"]])


def test_fan_out_settings_reach_every_airflow_service(compose, monkeypatch):
    """Defaults equal reindex.settings' own; the values the services get are what the DAG parse reads."""
    from reindex import settings

    for name in AIRFLOW_SERVICES:
        e = compose["services"][name]["environment"]
        assert {k: e[k] for k in ("REINDEX_ENCODE_CONCURRENCY", "REINDEX_ENCODE_QUEUE", "REINDEX_ENCODE_POOL",
                                  "REINDEX_INGEST_CONCURRENCY")} == {
            "REINDEX_ENCODE_CONCURRENCY": "2", "REINDEX_ENCODE_QUEUE": "", "REINDEX_ENCODE_POOL": "",
            "REINDEX_INGEST_CONCURRENCY": "4"}, name
        for key in ("REINDEX_ENCODE_CONCURRENCY", "REINDEX_ENCODE_QUEUE", "REINDEX_ENCODE_POOL",
                    "REINDEX_INGEST_CONCURRENCY"):
            monkeypatch.setenv(key, e[key])
        assert (settings.encode_concurrency(), settings.encode_queue(), settings.encode_pool(),
                settings.ingest_concurrency()) == (2, None, None, 4)


def test_every_worker_reaches_the_corpus_and_the_store(compose):
    """Corpora live on one named volume mounted at the corpus root of every Airflow service, so a document a
    scan listed on one worker can be read by the encode task on another; the store is PostgreSQL over TCP."""
    assert "corpora" in compose["volumes"]
    for name in AIRFLOW_SERVICES:
        svc = compose["services"][name]
        e = svc["environment"]
        assert e["REINDEX_CORPUS_ROOT"] == "/opt/reindex/corpora", name
        assert "corpora:/opt/reindex/corpora" in svc["volumes"], name
        # config/corpora.yaml's relative uri include/sample_corpus resolves inside it, as it did under /opt/airflow
        assert "./include/sample_corpus:/opt/reindex/corpora/include/sample_corpus:ro" in svc["volumes"], name
        store = json.loads(e["AIRFLOW_CONN_REINDEX_PG"])
        assert (store["host"], store["port"]) == ("postgres", 5432), name
    corpora = yaml.safe_load((ROOT / "config" / "corpora.yaml").read_text())["corpora"]
    assert "include/sample_corpus" in {c["uri"] for c in corpora}


@pytest.mark.parametrize("pool,slots,expected", [
    ("gpu_pool", "3", ["db migrate", "pools set gpu_pool 3 reindex encode tasks (REINDEX_ENCODE_POOL)", "version"]),
    ("", "1", ["db migrate", "version"]),
])
def test_airflow_init_creates_the_encode_pool(compose, tmp_path, pool, slots, expected):
    """airflow-init's command, run by bash with a recording stand-in for `airflow`: the pool named by
    REINDEX_ENCODE_POOL is created (a task in a missing pool is never scheduled); none when it is empty."""
    command = compose["services"]["airflow-init"]["command"]
    assert command[:2] == ["bash", "-c"]
    record = tmp_path / "calls"
    fake = tmp_path / "bin" / "airflow"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$*" >> {record}\n')
    fake.chmod(0o755)
    script = command[2].replace("$$", "$")  # Compose's escape, as the container's bash receives it
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env={
        "PATH": f"{fake.parent}:{os.environ['PATH']}", "REINDEX_ENCODE_POOL": pool, "REINDEX_ENCODE_POOL_SLOTS": slots})
    assert done.returncode == 0, done.stderr
    assert record.read_text().splitlines() == expected
