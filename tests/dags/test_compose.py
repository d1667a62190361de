"""docker-compose.yaml against the Compose specification (no Docker engine exists here)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.conftest import ROOT

# A copy of ../shared/data/compose-spec.json, vendored so a fresh clone validates offline.
SPEC = ROOT / "tests" / "data" / "compose-spec.json"
AIRFLOW_SERVICES = {"airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
                    "airflow-worker"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yaml").read_text())


def test_valid_against_the_compose_schema(compose):
    schema = json.loads(SPEC.read_text())
    jsonschema.Draft7Validator(schema).validate(compose)


def test_production_shape(compose):
    services = compose["services"]
    assert AIRFLOW_SERVICES | {"postgres", "redis", "airflow-init"} <= set(services)
    for name in AIRFLOW_SERVICES | {"postgres", "redis"}:
        assert "healthcheck" in services[name], f"{name} has no healthcheck"
    for name in AIRFLOW_SERVICES:
        deps = services[name]["depends_on"]
        assert deps["postgres"]["condition"] == "service_healthy"
        assert deps["redis"]["condition"] == "service_healthy"
        env = services[name]["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
        assert {"./dags:/opt/airflow/dags", "./plugins:/opt/airflow/plugins",
                "./include:/opt/airflow/include"} <= set(services[name]["volumes"])
    assert "pgvector" in services["postgres"]["image"]
    env = services["airflow-scheduler"]["environment"]
    metadata_db = env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].rsplit("/", 1)[1]
    store_db = json.loads(env["AIRFLOW_CONN_REINDEX_PG"])["schema"]
    assert (metadata_db, store_db) == ("airflow", "reindex")  # separate databases
    init_sql = (ROOT / "deploy" / "postgres-init.sql").read_text()
    assert "CREATE DATABASE airflow" in init_sql and "CREATE DATABASE reindex" in init_sql


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
