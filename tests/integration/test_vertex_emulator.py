"""The Vertex AI batch-prediction emulator, driven through the real ``aiplatform_v1`` REST client
and real google-cloud-storage against an in-process GCS emulator."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
import uuid

import numpy as np
import pytest
from google.api_core import exceptions as gexc
from google.auth.credentials import AnonymousCredentials
from google.cloud import aiplatform_v1 as aip

from reindex.emulators.gcs import anonymous_client, free_port, gcs_emulator
from reindex.emulators.vertex import TERMINAL_STATES, EmulatorConfig, VertexEmulator

PARENT = "projects/test-project/locations/us-central1"
BUCKET = "rx-emulator-test"
CLASSIC = "publishers/google/models/text-embedding-005"
GEMINI = "publishers/google/models/gemini-embedding-001"
BASE = EmulatorConfig(embedder="hash", hash_dim=16, pending_delay_s=0.05)
State = aip.JobState


@pytest.fixture(scope="module")
def gcs_url():
    with gcs_emulator(buckets=[BUCKET], set_env=False) as url:
        yield url


@pytest.fixture(scope="module")
def gcs(gcs_url):
    return anonymous_client(gcs_url)


@pytest.fixture(scope="module")
def server(gcs_url):
    with VertexEmulator(BASE, gcs_host=gcs_url) as emu:
        yield emu


@pytest.fixture
def emu(server):
    """The module's emulator with a fresh job list, counters and the base configuration."""
    server.reset(config=True)
    yield server
    server.reset(config=True)


@pytest.fixture(scope="module")
def client(server):
    return aip.JobServiceClient(transport="rest", client_options={"api_endpoint": server.endpoint},
                                credentials=AnonymousCredentials())


# ------------------------------------------------------------------------------------------ helpers


def upload(gcs, rows, *, raw_lines=()) -> str:
    """Write rows (and raw extra lines) as one JSONL object; return its gs:// URI."""
    path = f"in/{uuid.uuid4().hex}.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in rows) + "".join(line + "\n" for line in raw_lines)
    gcs.bucket(BUCKET).blob(path).upload_from_string(text.encode("utf-8"))
    return f"gs://{BUCKET}/{path}"


def job_spec(uris, *, model=CLASSIC, params=None, labels=None, name="emulator-test") -> aip.BatchPredictionJob:
    job = aip.BatchPredictionJob(
        display_name=name, model=model, labels=labels or {},
        input_config=aip.BatchPredictionJob.InputConfig(instances_format="jsonl",
                                                        gcs_source=aip.GcsSource(uris=list(uris))),
        output_config=aip.BatchPredictionJob.OutputConfig(
            predictions_format="jsonl",
            gcs_destination=aip.GcsDestination(output_uri_prefix=f"gs://{BUCKET}/out/{uuid.uuid4().hex}")),
    )
    if params:
        job.model_parameters = params
    return job


def create(client, uris, **kw) -> aip.BatchPredictionJob:
    return client.create_batch_prediction_job(parent=PARENT, batch_prediction_job=job_spec(uris, **kw))


def wait(client, name, timeout=15.0) -> aip.BatchPredictionJob:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get_batch_prediction_job(name=name)
        if job.state.name in TERMINAL_STATES or time.monotonic() > deadline:
            return job
        time.sleep(0.03)


def outputs(gcs, job, stem) -> tuple[list[str], list[str]]:
    """(object names, lines) of the job's ``<stem>_NNNN.jsonl`` files, in file order."""
    prefix = job.output_info.gcs_output_directory.removeprefix(f"gs://{BUCKET}/") + "/"
    blobs = sorted((b for b in gcs.list_blobs(BUCKET, prefix=prefix) if b.name.rsplit("/", 1)[1].startswith(stem)),
                   key=lambda b: b.name)
    lines = [line for b in blobs for line in b.download_as_text().split("\n") if line]
    return [b.name.rsplit("/", 1)[1] for b in blobs], lines


def admin(server, path, payload=None):
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(server.endpoint + path, data=data, method="POST" if data else "GET",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())


def stats(job) -> tuple[int, int, int]:
    s = job.completion_stats
    return s.successful_count, s.failed_count, s.incomplete_count


# -------------------------------------------------------------------------------------------- tests


def test_classic_job_round_trip(emu, client, gcs):
    emu.configure(lines_per_file=64)
    rows = [{"id": f"c{i}", "content": f"Document {i}, about topic {i % 7}."} for i in range(200)]
    for i, row in enumerate(rows):
        if i % 2 == 0:
            row["task_type"] = "RETRIEVAL_DOCUMENT"
        if i % 5 == 0:
            row["title"] = f"title {i}"
    uri = upload(gcs, rows)

    created = create(client, [uri], params={"outputDimensionality": 32, "autoTruncate": False},
                     labels={"corpus": "docs"})
    assert created.state == State.JOB_STATE_PENDING
    assert created.name.startswith(f"{PARENT}/batchPredictionJobs/")
    job = wait(client, created.name)

    assert job.state == State.JOB_STATE_SUCCEEDED
    assert stats(job) == (200, 0, 0)
    assert not job.error.message
    out_dir = job.output_info.gcs_output_directory
    assert re.fullmatch(rf"gs://{BUCKET}/out/\w+/prediction-text-embedding-005-\d{{4}}_\d\d_\d\dT[\d_]+Z", out_dir)
    assert job.create_time <= job.start_time <= job.end_time <= job.update_time
    assert job.model_parameters["outputDimensionality"] == 32

    names, lines = outputs(gcs, job, "predictions")
    assert names == [f"predictions_000{i}.jsonl" for i in range(1, 5)]  # 64 + 64 + 64 + 8
    assert outputs(gcs, job, "errors") == ([], [])
    by_id = {}
    for line in lines:
        rec = json.loads(line)
        assert rec["status"] == ""
        (pred,) = rec["predictions"]
        values = np.array(pred["embeddings"]["values"])
        assert values.shape == (32,) and abs(np.linalg.norm(values) - 1) < 1e-5
        assert pred["embeddings"]["statistics"]["token_count"] > 0
        assert pred["embeddings"]["statistics"]["truncated"] is False
        by_id[rec["instance"]["id"]] = rec["instance"]
    assert by_id == {r["id"]: r for r in rows}  # every instance echoed exactly, joined by its content

    listed = [j.name for j in client.list_batch_prediction_jobs(
        request={"parent": PARENT, "filter": 'state=JOB_STATE_SUCCEEDED AND labels.corpus="docs"'})]
    assert listed == [job.name]
    assert list(client.list_batch_prediction_jobs(request={"parent": PARENT, "filter": "state=JOB_STATE_RUNNING"})) == []
    with pytest.raises(gexc.NotFound):
        client.get_batch_prediction_job(name=f"{PARENT}/batchPredictionJobs/42")
    counters = admin(emu, "/emulator/stats")
    assert counters["create_calls"] == 1 and counters["creates_accepted"] == 1
    assert counters["lines_processed"] == 200


def test_per_line_errors_of_each_kind(emu, client, gcs):
    emu.configure(seed=7, lines_per_file=100, partial_state="PARTIALLY_SUCCEEDED",
                  error_rates={"too_long": 0.05, "invalid_characters": 0.05, "rate_limited": 0.05,
                               "unavailable": 0.05})
    rows = [{"id": f"r{i}", "content": f"plain text number {i}"} for i in range(400)]
    rows += [{"id": "ctl0", "content": "nul \x00 inside"}, {"id": "ctl1", "content": "bell \x07"},
             {"id": "ctl2", "content": "carriage\rreturn"}, {"id": "ok-tab", "content": "tab\tand\nnewline"},
             {"id": "long", "content": "word " * 3000}]
    uri = upload(gcs, rows, raw_lines=['{"content": "not json'])
    params = {"autoTruncate": False}
    first = wait(client, create(client, [uri], params=params).name)

    assert first.state == State.JOB_STATE_PARTIALLY_SUCCEEDED
    ok, failed, incomplete = stats(first)
    assert ok + failed == 406 and incomplete == 0
    _, pred_lines = outputs(gcs, first, "predictions")
    err_names, err_lines = outputs(gcs, first, "errors")
    assert len(pred_lines) == ok and len(err_lines) == failed
    assert err_names[0] == "errors_0001.jsonl"
    errors = [json.loads(line) for line in err_lines]
    kinds = {}
    for rec in errors:
        code, message = rec["error"]["code"], rec["error"]["message"]
        assert rec["status"] == message != ""
        kind = ("too_long" if message.startswith("Text too long") else
                "invalid_characters" if message == "Invalid characters in content" else
                "rate_limited" if "RESOURCE_EXHAUSTED" in message else
                "unavailable" if "UNAVAILABLE" in message else "invalid_json" if "JSON" in message else "?")
        assert (kind, code) in {("too_long", 400), ("invalid_characters", 400), ("rate_limited", 429),
                                ("unavailable", 503), ("invalid_json", 400)}
        kinds.setdefault(kind, []).append(rec["instance"])
    assert set(kinds) == {"too_long", "invalid_characters", "rate_limited", "unavailable", "invalid_json"}
    bad_chars = {i["id"] for i in kinds["invalid_characters"] if isinstance(i, dict)}
    assert {"ctl0", "ctl1", "ctl2"} <= bad_chars and "ok-tab" not in bad_chars
    long_errors = [e for e in errors if isinstance(e["instance"], dict) and e["instance"]["id"] == "long"]
    assert long_errors[0]["error"]["message"] == "Text too long: 3000 tokens > 2048"
    assert kinds["invalid_json"] == ['{"content": "not json']
    for kind in ("too_long", "rate_limited", "unavailable"):  # injected at roughly 5 % each
        assert 5 <= len(kinds[kind]) <= 45

    # the same input and seed fail the same lines the same way
    second = wait(client, create(client, [uri], params=params).name)
    assert stats(second) == stats(first)
    assert sorted(outputs(gcs, second, "errors")[1]) == sorted(err_lines)


def test_auto_truncation_and_transient_cap(emu, client, gcs):
    emu.configure(error_rates={"rate_limited": 1.0}, transient_max_failures=1)
    rows = [{"content": f"short text {i}"} for i in range(10)] + [{"content": "long " * 2500}]
    uri = upload(gcs, rows)
    first = wait(client, create(client, [uri]).name)  # no autoTruncate: Vertex's default (true)
    assert first.state == State.JOB_STATE_SUCCEEDED and stats(first) == (0, 11, 0)
    assert {json.loads(line)["error"]["code"] for line in outputs(gcs, first, "errors")[1]} == {429}

    second = wait(client, create(client, [uri]).name)  # each line got its one transient failure
    assert stats(second) == (11, 0, 0)
    preds = [json.loads(line)["predictions"][0]["embeddings"] for line in outputs(gcs, second, "predictions")[1]]
    truncated = [p["statistics"] for p in preds if p["statistics"]["truncated"]]
    assert truncated == [{"token_count": 2048, "truncated": True}]


def test_gemini_round_trip_joined_by_key(emu, client, gcs):
    emu.configure(force_errors={"POISON": "unavailable"})
    rows = [{"key": f"k{i}", "request": {"content": {"parts": [{"text": f"passage {i}"}]},
                                         "embed_content_config": {"output_dimensionality": 24,
                                                                  "task_type": "RETRIEVAL_DOCUMENT"}}}
            for i in range(60)]
    rows[3]["request"]["content"]["parts"][0]["text"] = "POISON pill"
    rows[4]["request"]["embed_content_config"]["output_dimensionality"] = 5000
    job = wait(client, create(client, [upload(gcs, rows)], model=GEMINI).name)

    assert job.state == State.JOB_STATE_SUCCEEDED and stats(job) == (58, 2, 0)
    assert "/prediction-gemini-embedding-001-" in job.output_info.gcs_output_directory
    _, lines = outputs(gcs, job, "predictions")
    assert outputs(gcs, job, "errors") == ([], [])
    results = {}
    for line in lines:
        rec = json.loads(line)
        assert rec["key"] not in results
        results[rec["key"]] = rec
    inputs = {r["key"]: r for r in rows}
    assert set(results) == set(inputs)
    for key, rec in results.items():
        assert rec["request"] == inputs[key]["request"]
        if key in ("k3", "k4"):
            assert "response" not in rec
        else:
            values = rec["response"]["embedding"]["values"]
            assert len(values) == 24 and abs(np.linalg.norm(values) - 1) < 1e-5
    assert results["k3"]["status"]["code"] == 503
    assert results["k4"]["status"]["code"] == 400 and "output_dimensionality" in results["k4"]["status"]["message"]


def test_failed_and_expired_jobs(emu, client, gcs):
    uri = upload(gcs, [{"content": f"text {i}"} for i in range(20)])
    emu.configure(outcome="FAILED", fail_message="boom")
    failed_early = create(client, [uri]).name
    emu.configure(fail_after_lines=5, embed_block_size=4)
    failed_late = create(client, [uri]).name
    emu.configure(outcome="EXPIRED")
    expired = create(client, [uri]).name
    emu.configure(outcome="auto", max_instances_classic=10)
    too_many = create(client, [uri]).name
    missing = create(client, [f"gs://{BUCKET}/in/does-not-exist.jsonl"]).name

    job = wait(client, failed_early)
    assert job.state == State.JOB_STATE_FAILED and job.error.code == 13 and job.error.message == "boom"
    assert stats(job) == (0, 0, 20)
    job = wait(client, failed_late)
    assert job.state == State.JOB_STATE_FAILED and stats(job) == (5, 0, 15)
    assert len(outputs(gcs, job, "predictions")[1]) == 5
    job = wait(client, expired)
    assert job.state == State.JOB_STATE_EXPIRED and job.error.code == 4
    assert not job.output_info.gcs_output_directory and not job.start_time
    job = wait(client, too_many)
    assert job.state == State.JOB_STATE_FAILED and job.error.code == 3 and "at most 10" in job.error.message
    job = wait(client, missing)
    assert job.state == State.JOB_STATE_FAILED and job.error.code == 5 and "not found" in job.error.message


def test_cancel(emu, client, gcs):
    uri = upload(gcs, [{"content": f"text {i}"} for i in range(300)])
    emu.configure(line_delay_s=0.01, embed_block_size=10)
    running = create(client, [uri]).name
    emu.configure(pending_delay_s=30)
    pending = create(client, [uri]).name
    deadline = time.monotonic() + 10
    while client.get_batch_prediction_job(name=running).completion_stats.successful_count < 20:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    client.cancel_batch_prediction_job(name=running)
    client.cancel_batch_prediction_job(name=pending)

    job = wait(client, running)
    assert job.state == State.JOB_STATE_CANCELLED and job.error.code == 1
    ok, failed, incomplete = stats(job)
    assert ok >= 20 and failed == 0 and incomplete > 0 and ok + incomplete == 300
    assert len(outputs(gcs, job, "predictions")[1]) == ok
    job = wait(client, pending, timeout=3)
    assert job.state == State.JOB_STATE_CANCELLED and not job.start_time
    with pytest.raises(gexc.BadRequest, match="cannot be cancelled"):
        client.cancel_batch_prediction_job(name=running)
    assert emu.stats()["cancel_calls"] == 3


def test_truncated_final_line(emu, client, gcs):
    emu.configure(lines_per_file=20, truncate_last_line=True)
    job = wait(client, create(client, [upload(gcs, [{"content": f"text {i}"} for i in range(30)])]).name)
    assert job.state == State.JOB_STATE_SUCCEEDED and stats(job) == (30, 0, 0)
    names, _ = outputs(gcs, job, "predictions")
    assert names == ["predictions_0001.jsonl", "predictions_0002.jsonl"]
    prefix = job.output_info.gcs_output_directory.removeprefix(f"gs://{BUCKET}/")
    first = gcs.bucket(BUCKET).blob(f"{prefix}/predictions_0001.jsonl").download_as_text()
    last = gcs.bucket(BUCKET).blob(f"{prefix}/predictions_0002.jsonl").download_as_text()
    assert len([json.loads(line) for line in first.splitlines()]) == 20
    *whole, broken = last.split("\n")
    assert len(whole) == 9 and all(json.loads(line) for line in whole)
    with pytest.raises(json.JSONDecodeError):
        json.loads(broken)


def test_create_quota_errors_and_stats(emu, client, gcs):
    uri = upload(gcs, [{"content": "one"}])
    emu.configure(create_quota=1)
    first = create(client, [uri])
    with pytest.raises(gexc.TooManyRequests, match=r"Quota exceeded.*per day"):
        create(client, [uri])
    assert admin(emu, "/emulator/config", {"create_quota": None, "create_errors": [503]})["create_quota"] is None
    with pytest.raises(gexc.ServiceUnavailable):
        create(client, [uri])
    second = create(client, [uri])
    with pytest.raises(gexc.NotFound):
        create(client, [uri], model="publishers/google/models/not-an-embedding-model")
    with pytest.raises(gexc.BadRequest, match="outputDimensionality"):
        create(client, [uri], params={"outputDimensionality": 1000})
    counters = admin(emu, "/emulator/stats")
    assert counters["create_calls"] == 6
    assert counters["creates_accepted"] == 2 and counters["creates_rejected"] == 4
    assert wait(client, first.name).state == wait(client, second.name).state == State.JOB_STATE_SUCCEEDED


def test_large_hash_job_is_fast(emu, client, gcs):
    emu.configure(hash_dim=8, lines_per_file=5000, pending_delay_s=0)
    uri = upload(gcs, [{"content": f"chunk number {i} of a large corpus"} for i in range(12_000)])
    job = wait(client, create(client, [uri]).name, timeout=30)
    assert job.state == State.JOB_STATE_SUCCEEDED and stats(job) == (12_000, 0, 0)
    elapsed = (job.end_time - job.start_time).total_seconds()
    assert elapsed < 3.0, f"12,000-line hash job took {elapsed:.2f} s"
    assert outputs(gcs, job, "predictions")[0] == [f"predictions_000{i}.jsonl" for i in (1, 2, 3)]


def test_real_model_small_job(emu, client, gcs):
    emu.configure(embedder="model")
    texts = ["The cat sat on the mat.", "A cat was sitting on a rug.", "Stock markets fell sharply today.",
             "Photosynthesis turns sunlight into chemical energy.", "Volcanoes erupt molten rock."] + \
            [f"Sentence number {i} about the weather." for i in range(10)]
    uri = upload(gcs, [{"content": t} for t in texts])
    job = wait(client, create(client, [uri]).name, timeout=60)
    mismatch = wait(client, create(client, [uri], params={"outputDimensionality": 768}).name, timeout=60)

    assert job.state == State.JOB_STATE_SUCCEEDED and stats(job) == (15, 0, 0)
    vectors = {}
    for line in outputs(gcs, job, "predictions")[1]:
        rec = json.loads(line)
        emb = rec["predictions"][0]["embeddings"]
        vectors[rec["instance"]["content"]] = np.array(emb["values"])
        assert emb["statistics"]["token_count"] > 0
    assert all(v.shape == (384,) and abs(np.linalg.norm(v) - 1) < 1e-4 for v in vectors.values())
    cat, rug, stocks = (vectors[t] for t in texts[:3])
    assert cat @ rug > cat @ stocks
    assert mismatch.state == State.JOB_STATE_FAILED and mismatch.error.code == 3
    assert "384" in mismatch.error.message and "768" in mismatch.error.message


def test_command_line_service():
    port, gcs_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "reindex.emulators.vertex", "--port", str(port), "--start-gcs",
                             "--gcs-port", str(gcs_port), "--embedder", "hash", "--log-level", "WARNING"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        banner = proc.stdout.readline() + proc.stdout.readline()
        assert f"http://127.0.0.1:{port}" in banner and "embedder=hash" in banner
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/emulator/health", timeout=5) as resp:
            assert json.loads(resp.read()) == {"ok": True}
    finally:
        proc.terminate()
        proc.wait(timeout=10)
