"""Triggers: async waits only (no rows written, no worker slot held)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent


class VertexBatchJobsTrigger(BaseTrigger):
    """Polls Vertex batch prediction jobs until every one is terminal.

    Terminal: SUCCEEDED, PARTIALLY_SUCCEEDED, FAILED, CANCELLED, EXPIRED (the stock provider trigger
    polls forever on the last two). The event carries each job's state, output directory and
    ``completion_stats``: ``{"status": "done", "jobs": [...]}``, or ``{"status": "error", "message"}``.
    """

    def __init__(self, job_names: list[str], api_endpoint: str, gcp_conn_id: str = "google_cloud_default",
                 poll_interval: float = 30.0) -> None:
        super().__init__()
        self.job_names = list(job_names)
        self.api_endpoint = api_endpoint
        self.gcp_conn_id = gcp_conn_id
        self.poll_interval = poll_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "reindex_airflow.triggers.VertexBatchJobsTrigger",
            {"job_names": self.job_names, "api_endpoint": self.api_endpoint, "gcp_conn_id": self.gcp_conn_id,
             "poll_interval": self.poll_interval},
        )

    def _poll(self, client) -> list[dict]:
        from reindex.vertex.jobs import job_info

        return [job_info(client, name) for name in self.job_names]

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from reindex.vertex.jobs import TERMINAL_STATES
        from reindex_airflow.hooks import VertexBatchHook

        try:
            client = await asyncio.to_thread(
                lambda: VertexBatchHook(self.gcp_conn_id, self.api_endpoint).job_client())
            while True:
                infos = await asyncio.to_thread(self._poll, client)
                waiting = [i["name"] for i in infos if i["state"] not in TERMINAL_STATES]
                if not waiting:
                    yield TriggerEvent({"status": "done", "jobs": infos})
                    return
                self.log.info("%d of %d Vertex job(s) still running: %s", len(waiting), len(infos),
                              {i["name"]: i["state"] for i in infos})
                await asyncio.sleep(self.poll_interval)
        except Exception as e:  # noqa: BLE001 - surfaced to the operator, which fails the task
            yield TriggerEvent({"status": "error", "message": f"{type(e).__name__}: {e}"})
