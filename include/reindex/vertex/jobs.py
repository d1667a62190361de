"""Vertex AI BatchPredictionJob calls through ``aiplatform_v1.JobServiceClient`` (any transport).

The client is passed in: Google's regional endpoint in production, the project's emulator offline
(``client_options.api_endpoint = "http://127.0.0.1:PORT"``, REST transport).
"""

from __future__ import annotations

from typing import Any

TERMINAL_STATES = {"SUCCEEDED", "PARTIALLY_SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED"}
FAILED_STATES = {"FAILED", "CANCELLED", "EXPIRED"}


def make_job_client(endpoint: str, credentials=None):
    from google.api_core.client_options import ClientOptions
    from google.cloud import aiplatform_v1

    transport = "rest" if endpoint.startswith(("http://", "https://")) else "grpc"
    return aiplatform_v1.JobServiceClient(credentials=credentials, transport=transport,
                                          client_options=ClientOptions(api_endpoint=endpoint))


def short_state(state: Any) -> str:
    """``JobState.JOB_STATE_SUCCEEDED`` (or its name / number) → ``"SUCCEEDED"``."""
    from google.cloud.aiplatform_v1 import JobState

    name = JobState(state).name if not isinstance(state, str) else state
    return name.removeprefix("JOB_STATE_")


def parent_of(project: str, location: str) -> str:
    return f"projects/{project}/locations/{location}"


def create_job(client, *, project: str, location: str, display_name: str, model: str, input_uris: list[str],
               output_prefix: str, output_dimensionality: int | None = None, labels: dict | None = None) -> str:
    """Create one batch embedding job (``autoTruncate`` off: over-long input must be an error). Returns its name."""
    from google.cloud import aiplatform_v1
    from google.protobuf import json_format, struct_pb2

    params: dict[str, Any] = {"autoTruncate": False}
    if output_dimensionality:
        params["outputDimensionality"] = output_dimensionality
    model_parameters = json_format.ParseDict(params, struct_pb2.Value())
    model_path = model if model.startswith("publishers/") else f"publishers/google/models/{model}"
    job = aiplatform_v1.BatchPredictionJob(
        display_name=display_name,
        model=model_path,
        model_parameters=model_parameters,
        input_config=aiplatform_v1.BatchPredictionJob.InputConfig(
            instances_format="jsonl", gcs_source=aiplatform_v1.GcsSource(uris=input_uris)),
        output_config=aiplatform_v1.BatchPredictionJob.OutputConfig(
            predictions_format="jsonl",
            gcs_destination=aiplatform_v1.GcsDestination(output_uri_prefix=output_prefix)),
        labels=labels or {},
    )
    return client.create_batch_prediction_job(parent=parent_of(project, location),
                                              batch_prediction_job=job).name


def find_job(client, *, project: str, location: str, display_name: str) -> str | None:
    """The newest job named ``display_name`` — how a re-run finds a job it created but never recorded."""
    from google.cloud import aiplatform_v1

    request = aiplatform_v1.ListBatchPredictionJobsRequest(
        parent=parent_of(project, location), filter=f'display_name="{display_name}"')
    found = [j for j in client.list_batch_prediction_jobs(request=request) if j.display_name == display_name]
    if not found:
        return None
    return max(found, key=lambda j: j.create_time).name


def job_info(client, name: str) -> dict:
    """A JSON-able summary: state, output directory, completion stats, error."""
    job = client.get_batch_prediction_job(name=name)
    stats = job.completion_stats

    def seconds(a, b) -> float | None:
        try:
            return round((b - a).total_seconds(), 3) if a and b else None
        except (TypeError, AttributeError):
            return None

    return {
        "name": job.name,
        "display_name": job.display_name,
        "state": short_state(job.state),
        "output_dir": job.output_info.gcs_output_directory or None,
        "completion_stats": {"successful": int(stats.successful_count), "failed": int(stats.failed_count),
                             "incomplete": int(stats.incomplete_count)},
        "error": {"code": job.error.code, "message": job.error.message} if job.error.message else None,
        # how long the job took from creation to its end (None while it runs or when not reported)
        "wait_seconds": seconds(getattr(job, "create_time", None), getattr(job, "end_time", None)),
    }


def cancel_job(client, name: str) -> None:
    client.cancel_batch_prediction_job(name=name)
