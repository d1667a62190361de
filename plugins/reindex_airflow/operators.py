"""Operators: hold state, submit and defer."""

from __future__ import annotations

from datetime import timedelta
from functools import cached_property
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException

STATE_KEY = "vertex_job_names"


class SubmitVertexBatchOperator(BaseOperator):
    """Write the batch's request JSONL to GCS, submit Vertex batch jobs and wait for them, deferred.

    Never submits twice: each job has a deterministic display name (``reindex-<batch>-jobNNNN``);
    its name is recorded in the task state store and on the batch row before the task defers, and
    a retry, worker crash or triggerer restart re-attaches to the recorded (or found) jobs. A daily
    quota refusal on create defers until the quota window reopens, then submits again. ``on_kill``
    cancels the jobs. Returns ``{"batch_id", "jobs": [...], "output_dirs": [...], "job_failed"}``.
    """

    template_fields = ("manifest",)
    ui_color = "#e8f0fe"

    def __init__(self, *, manifest: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.manifest = manifest

    @cached_property
    def settings(self):
        from reindex.vertex.settings import VertexSettings

        return VertexSettings.from_env()

    @cached_property
    def hook(self):
        from reindex_airflow.hooks import VertexBatchHook

        s = self.settings
        return VertexBatchHook(s.gcp_conn_id, s.endpoint, s.project)

    def _recorded(self, context, store, batch_id: str) -> list[str]:
        from reindex.store.batches import get_batch

        state = context.get("task_state_store")
        names = state.get(STATE_KEY) if state is not None else None
        if not names:
            batch = get_batch(store, batch_id) or {}
            names = (batch.get("details") or {}).get("vertex_jobs")
        return list(names or [])

    def _record(self, context, store, batch_id: str, names: list[str]) -> None:
        from reindex.store.batches import record_jobs

        state = context.get("task_state_store")
        if state is not None:
            state.set(STATE_KEY, names)
        record_jobs(store, batch_id, names)

    def execute(self, context) -> Any:
        from reindex.config import ReindexConfig
        from reindex_airflow.failures import terminal_errors
        from reindex_airflow.hooks import PgVectorHook
        from reindex_airflow.triggers import VertexBatchJobsTrigger

        m = self.manifest
        batch_id = m["batch_id"]
        with terminal_errors():  # no task retry can fix configuration
            cfg = ReindexConfig.from_mapping(m["config"])
            s = self.settings
        with PgVectorHook().store() as store:
            names = self._recorded(context, store, batch_id)
            if names:
                self.log.info("re-attaching to recorded Vertex job(s) of batch %s: %s", batch_id, names)
            else:
                if not m.get("pending"):
                    self.log.info("batch %s has nothing to embed: no job submitted", batch_id)
                    return {"batch_id": batch_id, "jobs": [], "output_dirs": [], "job_failed": False}
                try:
                    self._submit(context, store, cfg, s, batch_id, names)
                except Exception as e:  # noqa: BLE001 - a submit error is recorded on the batch, see below
                    if not self._give_up(context, e):
                        raise  # transient (5xx, connection): the task's own retry submits again
                    return self._submit_failed(store, batch_id, e)
        self.defer(trigger=VertexBatchJobsTrigger(names, s.endpoint, s.gcp_conn_id, s.poll_interval),
                   method_name="execute_complete")

    def _submit(self, context, store, cfg, s, batch_id: str, names: list[str]) -> None:
        """Write the request JSONL and create the jobs not created yet (found by display name), recording each."""
        from reindex.vertex import jobs
        from reindex.vertex.batch import batch_prefix, write_requests
        from reindex.vertex.formats import family_for

        prefix = batch_prefix(s.prefix, cfg.corpus, batch_id)
        job_inputs = write_requests(store, self.hook.storage_client(), s.bucket, prefix,
                                    batch_id, family_for(cfg.model),
                                    output_dimensionality=cfg.output_dimensionality)
        client = self.hook.job_client()
        for job in job_inputs:
            display = f"reindex-{batch_id}-job{job['index']:04d}"
            name = jobs.find_job(client, project=s.project, location=s.location, display_name=display)
            if name is None:
                try:
                    name = jobs.create_job(
                        client, project=s.project, location=s.location, display_name=display,
                        model=cfg.model, input_uris=job["input_uris"],
                        output_prefix=f"gs://{s.bucket}/{prefix}/output/job-{job['index']:04d}",
                        output_dimensionality=cfg.output_dimensionality,
                        labels={"corpus": cfg.corpus, "batch": batch_id.replace("_", "-")[:63]})
                except Exception as e:  # noqa: BLE001 - classified below
                    if self._is_daily_quota(e):
                        self.log.warning("daily quota exhausted (%s); waiting %.0f s for the window",
                                         e, s.quota_reset_seconds)
                        from airflow.providers.standard.triggers.temporal import TimeDeltaTrigger

                        self.defer(trigger=TimeDeltaTrigger(timedelta(seconds=s.quota_reset_seconds)),
                                   method_name="execute")
                    raise
                self.log.info("submitted %s (%d lines) as %s", display, job["lines"], name)
            names.append(name)
            self._record(context, store, batch_id, names)

    def _give_up(self, context, e: Exception) -> bool:
        """A submit error is final when retrying cannot help (4xx other than 429: configuration, permission,
        an unknown model) or when this is the task's last try."""
        from reindex.classify import classify_exception
        from reindex.errors import ErrorCode

        kind = classify_exception(e)
        if kind not in (ErrorCode.RATE_LIMITED, ErrorCode.UNAVAILABLE):
            return True
        ti = context.get("ti")
        return ti is None or ti.try_number > (self.retries or 0)

    def _submit_failed(self, store, batch_id: str, e: Exception) -> dict:
        """Record why the batch could not be submitted: every pending chunk FAILED ``SUBMIT_FAILED`` with the
        error, the batch's details keep it; the run then closes the batch FAILED and fails with that reason."""
        from reindex.errors import ErrorCode
        from reindex.store.batches import mark_missing, update_details

        message = f"batch job submit failed: {type(e).__name__}: {e}"[:2000]
        self.log.error("%s", message)
        with store.conn.transaction():
            n = mark_missing(store, batch_id, code=ErrorCode.SUBMIT_FAILED, message=message)
            update_details(store, batch_id, {"submit_error": message})
        self.log.error("batch %s: %d chunk(s) FAILED SUBMIT_FAILED", batch_id, n)
        return {"batch_id": batch_id, "jobs": [], "output_dirs": [], "job_failed": True, "submit_error": message}

    @staticmethod
    def _is_daily_quota(e: Exception) -> bool:
        from reindex.classify import classify_exception
        from reindex.errors import ErrorCode

        return classify_exception(e) == ErrorCode.QUOTA_EXCEEDED

    def execute_complete(self, context, event: dict) -> dict:
        from reindex.store.batches import update_details
        from reindex.vertex.jobs import FAILED_STATES
        from reindex_airflow.hooks import PgVectorHook

        if event.get("status") != "done":
            raise AirflowException(f"waiting for Vertex jobs failed: {event.get('message')}")
        infos = event["jobs"]
        job_failed = bool(infos) and all(i["state"] in FAILED_STATES for i in infos)
        batch_id = self.manifest["batch_id"]
        waited = max((i.get("wait_seconds") or 0.0 for i in infos), default=0.0)
        with PgVectorHook().store() as store:
            from reindex.store.batches import add_stage_seconds

            update_details(store, batch_id, {"jobs": infos, "job_failed": job_failed})
            add_stage_seconds(store, batch_id, "vertex_wait", waited)
        from reindex_airflow.tasks import _metrics

        _metrics().vertex_jobs_waited(waited, infos, corpus=self.manifest["config"]["corpus"], batch_id=batch_id)
        for i in infos:
            self.log.info("job %s ended %s: %s%s", i["name"], i["state"], i["completion_stats"],
                          f" error {i['error']}" if i["error"] else "")
        return {"batch_id": batch_id, "jobs": infos, "job_failed": job_failed,
                "output_dirs": [i["output_dir"] for i in infos if i["output_dir"]]}

    def on_kill(self) -> None:
        from reindex.vertex.jobs import cancel_job
        from reindex_airflow.hooks import PgVectorHook

        with PgVectorHook().store() as store:
            from reindex.store.batches import get_batch

            names = ((get_batch(store, self.manifest["batch_id"]) or {}).get("details") or {}).get("vertex_jobs", [])
        client = self.hook.job_client()
        for name in names:
            self.log.info("cancelling Vertex job %s", name)
            cancel_job(client, name)
