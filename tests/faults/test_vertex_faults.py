"""Faults of the Google batch path, end to end through ``dag.test()`` against the offline emulators:
the triggerer restarted mid-wait (fault 3), a job FAILED after partial output (fault 5), a 429 storm that
clears and one that never does (fault 6), result lines truncated, NaN or of the wrong dimension (fault 7)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import orjson
import pytest
from psycopg import sql

from reindex.vertex.formats import content_key
from tests.faults.conftest import (
    VERTEX,
    batch_row,
    check_invariants,
    last_batch,
    ti_states,
    triggered_retry_conf,
)

pytestmark = [pytest.mark.faults, pytest.mark.e2e]


def _jsonl(root, corpus: str, texts: list[str]) -> list[str]:
    ids = [f"{corpus}-{i:03d}" for i in range(len(texts))]
    (root / "docs.jsonl").write_text("".join(json.dumps({"id": d, "text": t}) + "\n" for d, t in zip(ids, texts,
                                                                                                     strict=True)),
                                     encoding="utf-8")
    return ids


def _chunks(store, corpus: str) -> list[tuple]:
    return store.execute(sql.SQL("""SELECT doc_id, embedding_status, error_code, error_message, retry_count
        FROM {} WHERE corpus = %s ORDER BY doc_id""").format(store.t("chunks")), (corpus,)).fetchall()


# --- fault 3: the triggerer restarted while the job runs ------------------------------------------------


def _first_life(trigger, emu, timeout: float = 60.0) -> list:
    """Run the trigger as a triggerer would until it has polled the job while it was RUNNING, then stop it as a
    crashed triggerer stops: its coroutine is gone. Returns the events it yielded (none: the job runs on)."""
    (name,) = trigger.job_names

    async def life() -> list:
        events: list = []

        async def consume() -> None:
            async for event in trigger.run():
                events.append(event)

        task = asyncio.create_task(consume())
        gets_before = emu.stats()["get_calls"]
        deadline = time.monotonic() + timeout
        while not (emu.job(name)["state"] == "JOB_STATE_RUNNING" and emu.stats()["get_calls"] > gets_before):
            assert not task.done(), f"the trigger ended before the crash: {events}"
            assert time.monotonic() < deadline, "the job was never seen RUNNING by the trigger"
            await asyncio.sleep(0.05)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return events

    return asyncio.run(life())


def test_a_triggerer_restart_mid_wait_reattaches_to_the_one_job(corpus_dag, vertex_env, store_conn, tmp_path,
                                                                  monkeypatch):
    """The triggerer dies while the job is RUNNING; the restarted triggerer rebuilds the trigger from its
    serialized form and waits on the same job: one job created, one job in the batch, every chunk READY."""
    from airflow.sdk._shared.module_loading import import_string
    from airflow.sdk.definitions import dag as dag_module

    from reindex_airflow.triggers import VertexBatchJobsTrigger

    corpus = "fault_v_reattach"
    ids = _jsonl(tmp_path, corpus, [f"reef survey {i}: corals, sponges and {i} parrotfish" for i in range(30)])
    vertex_env.configure(embedder="hash", hash_dim=768, running_delay_s=4)
    run_inline = dag_module._run_inline_trigger
    lives: list = []

    def triggerer(trigger, ti):
        if isinstance(trigger, VertexBatchJobsTrigger) and not lives:
            lives.append(_first_life(trigger, vertex_env))
            classpath, kwargs = trigger.serialize()  # what the trigger row in the metadata DB holds
            trigger = import_string(classpath)(**kwargs)
            lives.append(trigger.job_names)
        return run_inline(trigger, ti)

    monkeypatch.setattr(dag_module, "_run_inline_trigger", triggerer)
    dr = corpus_dag.test(corpus=corpus, corpus_uri=str(tmp_path), **VERTEX)
    assert dr.state == "success", ti_states(dr)
    assert ti_states(dr)["done"] == "success"
    assert len(lives) == 2 and lives[0] == [], "the first triggerer must die before the job ended"
    stats = vertex_env.stats()
    assert (stats["create_calls"], stats["jobs"], stats["jobs_by_state"]) == (1, 1, {"JOB_STATE_SUCCEEDED": 1})
    batch = last_batch(store_conn, corpus)
    assert batch_row(store_conn, batch["batch_id"])["job_names"] == lives[1]
    assert (batch["status"], batch["total"], batch["ready"]) == ("COMPLETED", 30, 30)
    assert check_invariants(store_conn, corpus, good_docs=ids) == {
        "documents": {"OK": 30, "FAILED": 0}, "failed_documents": {},
        "chunks": {"READY": 30, "PENDING": 0, "FAILED": 0}, "failed_chunks": {}, "vectors": 30}


# --- fault 5: a job FAILED after writing part of its output ----------------------------------------------


def test_a_job_failed_after_partial_output_is_healed_by_the_retry_run(corpus_dag, vertex_env, store_conn, tmp_path,
                                                                        dagbag):
    corpus = "fault_v_partial"
    ids = _jsonl(tmp_path, corpus, [f"harbour log {i}: three trawlers and a ferry" for i in range(50)])
    vertex_env.configure(embedder="hash", hash_dim=768, outcome="FAILED", fail_after_lines=20, lines_per_file=10)
    dr = corpus_dag.test(corpus=corpus, corpus_uri=str(tmp_path), **VERTEX)
    assert dr.state == "success" and ti_states(dr)["trigger_retry"] == "success", ti_states(dr)
    first = last_batch(store_conn, corpus)
    assert (first["status"], first["ready"], first["counts_by_reason"]) == (
        "COMPLETED_WITH_ERRORS", 20, {"JOB_FAILED": 30})
    # between the runs the store is consistent: 20 with their vectors, 30 failed with the job's error
    assert check_invariants(store_conn, corpus) == {
        "documents": {"OK": 50, "FAILED": 0}, "failed_documents": {},
        "chunks": {"READY": 20, "PENDING": 0, "FAILED": 30}, "failed_chunks": {"JOB_FAILED": 30}, "vectors": 20}
    messages = {r[3] for r in _chunks(store_conn, corpus) if r[1] == "FAILED"}
    (message,) = messages
    assert message.startswith("job projects/emulator/locations/us-central1/batchPredictionJobs/")
    assert message.endswith(" ended FAILED: Internal error occurred (injected by the emulator).")

    vertex_env.configure(outcome="auto")
    retry = dagbag.get_dag("reindex_retry").test(run_conf=triggered_retry_conf(first["batch_id"]))
    assert retry.state == "success" and ti_states(retry)["done"] == "success", ti_states(retry)
    second = last_batch(store_conn, corpus)
    assert (second["kind"], second["status"], second["total"], second["ready"]) == ("retry", "COMPLETED", 30, 30)
    stats = vertex_env.stats()
    assert (stats["create_calls"], stats["lines_processed"]) == (2, 50)  # only the 30 were sent again
    assert check_invariants(store_conn, corpus, good_docs=ids) == {
        "documents": {"OK": 50, "FAILED": 0}, "failed_documents": {},
        "chunks": {"READY": 50, "PENDING": 0, "FAILED": 0}, "failed_chunks": {}, "vectors": 50}
    assert {r[4] for r in _chunks(store_conn, corpus) if r[0] in ids} == {0, 1}


# --- fault 6: 429 storms ----------------------------------------------------------------------------------


def test_a_429_storm_that_clears_on_the_second_attempt(corpus_dag, vertex_env, store_conn, tmp_path, dagbag):
    """Every line answered 429 once: the batch is FAILED (nothing READY) but retriable, so the retry run
    resubmits all of it — and every chunk is READY after one retry."""
    corpus = "fault_v_429_clears"
    ids = _jsonl(tmp_path, corpus, [f"storm note {i}: gusts of {40 + i} knots" for i in range(5)])
    vertex_env.configure(embedder="hash", hash_dim=768, error_rates={"rate_limited": 1.0}, transient_max_failures=1)
    dr = corpus_dag.test(corpus=corpus, corpus_uri=str(tmp_path), **VERTEX)
    assert dr.state == "success" and ti_states(dr)["trigger_retry"] == "success", ti_states(dr)
    first = last_batch(store_conn, corpus)
    assert (first["status"], first["ready"], first["counts_by_reason"]) == ("FAILED", 0, {"RATE_LIMITED": 5})
    assert check_invariants(store_conn, corpus)["failed_chunks"] == {"RATE_LIMITED": 5}

    retry = dagbag.get_dag("reindex_retry").test(run_conf=triggered_retry_conf(first["batch_id"]))
    assert retry.state == "success" and ti_states(retry)["done"] == "success", ti_states(retry)
    second = last_batch(store_conn, corpus)
    assert (second["kind"], second["status"], second["total"], second["ready"]) == ("retry", "COMPLETED", 5, 5)
    assert vertex_env.stats()["create_calls"] == 2
    assert check_invariants(store_conn, corpus, good_docs=ids) == {
        "documents": {"OK": 5, "FAILED": 0}, "failed_documents": {},
        "chunks": {"READY": 5, "PENDING": 0, "FAILED": 0}, "failed_chunks": {}, "vectors": 5}
    assert [r[4] for r in _chunks(store_conn, corpus)] == [1] * 5


def test_a_429_storm_that_never_clears_spends_the_attempts_then_fails_the_run(corpus_dag, vertex_env, store_conn,
                                                                                tmp_path, dagbag):
    """429 on every line, always: the batch and three retry runs (backoff 0.2, 0.4, 0.8 s) each submit one
    job; the third retry run fails in fail_batch with every chunk FAILED RATE_LIMITED after 3 retries."""
    corpus = "fault_v_429_storm"
    _jsonl(tmp_path, corpus, [f"gale warning {i} for the shipping area" for i in range(4)])
    vertex_env.configure(embedder="hash", hash_dim=768, error_rates={"rate_limited": 1.0})
    dr = corpus_dag.test(corpus=corpus, corpus_uri=str(tmp_path), **VERTEX)
    assert dr.state == "success" and ti_states(dr)["trigger_retry"] == "success", ti_states(dr)
    batch = last_batch(store_conn, corpus)
    chain = [batch["batch_id"]]
    for attempt in (1, 2, 3):
        retry = dagbag.get_dag("reindex_retry").test(run_conf=triggered_retry_conf(batch["batch_id"]))
        batch = last_batch(store_conn, corpus)
        chain.append(batch["batch_id"])
        assert (batch["kind"], batch["status"], batch["total"], batch["counts_by_reason"]) == (
            "retry", "FAILED", 4, {"RATE_LIMITED": 4}), attempt
        branch = "trigger_retry" if attempt < 3 else "fail_batch"
        assert ti_states(retry)[branch] == ("success" if attempt < 3 else "failed"), (attempt, ti_states(retry))
        assert retry.state == ("success" if attempt < 3 else "failed"), attempt
    assert len(set(chain)) == 4
    assert vertex_env.stats()["create_calls"] == 4  # the batch's job and one per retry run: no more
    assert check_invariants(store_conn, corpus) == {
        "documents": {"OK": 4, "FAILED": 0}, "failed_documents": {},
        "chunks": {"READY": 0, "PENDING": 0, "FAILED": 4}, "failed_chunks": {"RATE_LIMITED": 4}, "vectors": 0}
    rows = _chunks(store_conn, corpus)
    assert {(r[1], r[2], r[4]) for r in rows} == {("FAILED", "RATE_LIMITED", 3)}
    assert all("rate limit" in r[3] for r in rows)
    from reindex.store.search import corpus_status

    assert corpus_status(store_conn, corpus)["lease"] is None


# --- fault 7: bad lines in the job's output ----------------------------------------------------------------


def _corrupt_output(storage_client, output_dirs: list[str], markers: dict[str, str]) -> dict[str, str]:
    """Rewrite the job's predictions file as a broken service might have written it: the line of the text
    containing marker ``nan`` gets a NaN value (protobuf JSON writes it as the string "NaN"), the one of
    ``dim`` loses its last value. Returns marker → content hash of the line changed, plus ``"truncated"``: the
    content hash of the last line (the emulator cut it in half)."""
    from google.cloud.storage import Blob

    from reindex.vertex.gcs import list_result_files

    (uri,) = [u for d in output_dirs for u, _ in list_result_files(storage_client, d) if "/predictions" in u]
    blob = Blob.from_uri(uri, client=storage_client)
    data = blob.download_as_bytes()
    assert not data.endswith(b"\n"), "the emulator should have cut the last line (truncate_last_line)"
    lines = data.split(b"\n")
    last = lines[-1]
    changed = {"truncated": content_key(json.loads(b'"' + last.split(b'"content":"', 1)[1].split(b'"', 1)[0] + b'"'))}
    for i, raw in enumerate(lines[:-1]):
        obj = orjson.loads(raw)
        content = obj["instance"]["content"]
        values = obj["predictions"][0]["embeddings"]["values"]
        if markers["nan"] in content:
            values[5] = "NaN"
        elif markers["dim"] in content:
            del values[-1]
        else:
            continue
        changed[next(k for k, m in markers.items() if m in content)] = content_key(content)
        lines[i] = orjson.dumps(obj)
    assert set(changed) == {"truncated", "nan", "dim"}, "a marked line is the truncated one: change the texts"
    blob.upload_from_string(b"\n".join(lines), content_type="application/jsonl")
    return changed


def test_bad_result_lines_fail_only_their_chunks(corpus_dag, vertex_env, store_conn, tmp_path, monkeypatch):
    """400 lines, of which the last is cut in half (the job still SUCCEEDED), one carries a NaN and one 767
    values: exactly those three chunks fail — MALFORMED_OUTPUT, NON_FINITE, DIMENSION_MISMATCH, each message
    naming the file and the line's byte offset — and the other 397 are READY. 3 of 400 is within
    max_failed_ratio=0.01 and none is retriable: the run ends in done."""
    from reindex.vertex import batch as vertex_batch

    corpus = "fault_v_bad_lines"
    markers = {"nan": "zz-nan-marker", "dim": "zz-dim-marker"}
    texts = [f"tide gauge {i} reads {i % 17} metres" for i in range(400)]
    texts[7] += " " + markers["nan"]
    texts[300] += " " + markers["dim"]
    ids = _jsonl(tmp_path, corpus, texts)
    vertex_env.configure(embedder="hash", hash_dim=768, truncate_last_line=True)
    plan = vertex_batch.plan_result_ranges
    changed: dict[str, str] = {}

    def corrupted_then_planned(storage_client, output_dirs, **kw):
        changed.update(_corrupt_output(storage_client, output_dirs, markers))
        return plan(storage_client, output_dirs, **kw)

    monkeypatch.setattr(vertex_batch, "plan_result_ranges", corrupted_then_planned)
    dr = corpus_dag.test(corpus=corpus, corpus_uri=str(tmp_path), **VERTEX)
    assert dr.state == "success" and ti_states(dr)["done"] == "success", ti_states(dr)
    batch = last_batch(store_conn, corpus)
    assert (batch["status"], batch["total"], batch["ready"], batch["counts_by_reason"]) == (
        "COMPLETED_WITH_ERRORS", 400, 397, {"MALFORMED_OUTPUT": 1, "NON_FINITE": 1, "DIMENSION_MISMATCH": 1})
    failed = {r[0]: (r[1], r[2]) for r in store_conn.execute(sql.SQL("""SELECT content_sha256, error_code,
        error_message FROM {} WHERE corpus = %s AND embedding_status = 'FAILED'""").format(store_conn.t("chunks")),
        (corpus,)).fetchall()}
    expected = {"truncated": "MALFORMED_OUTPUT", "nan": "NON_FINITE", "dim": "DIMENSION_MISMATCH"}
    assert {changed[k]: code for k, code in expected.items()} == {sha: code for sha, (code, _) in failed.items()}
    msg = {code: m for code, m in failed.values()}
    assert msg["NON_FINITE"] == "vector contains NaN or infinite values"
    assert msg["DIMENSION_MISMATCH"].endswith(": vector has 767 values, expected 768")
    assert "malformed or truncated JSON" in msg["MALFORMED_OUTPUT"]
    for code in ("DIMENSION_MISMATCH", "MALFORMED_OUTPUT"):
        assert "/predictions_0001.jsonl byte " in msg[code], msg[code]
    good = [d for d, t in zip(ids, texts, strict=True) if content_key(t) not in failed]
    assert len(good) == 397
    assert check_invariants(store_conn, corpus, good_docs=good) == {
        "documents": {"OK": 400, "FAILED": 0}, "failed_documents": {},
        "chunks": {"READY": 397, "PENDING": 0, "FAILED": 3},
        "failed_chunks": {"DIMENSION_MISMATCH": 1, "MALFORMED_OUTPUT": 1, "NON_FINITE": 1}, "vectors": 397}
