"""The quality gate of ``reindex_model_upgrade``: the new store against the old one before ``switch_model``.

``quality_gate`` measures (``reindex.quality.evaluate_switch``), records the figures on the upgrade batch
(``details.quality``; its one line is appended to the batch's ``message``, so the run note and the batch's
views show it) and returns them. ``after_gate`` routes: passed → ``quality_passed`` → ``switch_model``;
below the bar, by ``quality_below``: ``switch`` → ``quality_passed`` (switched anyway, recorded), ``wait`` →
``approve_switch`` (a human approves or rejects in Airflow's Required Actions, the figures in the request),
``fail`` → ``below_bar`` → ``quality_failed``. ``quality_failed`` gives the corpus back and fails the run: the old model keeps
serving.
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.providers.standard.operators.hitl import HITLBranchOperator
from airflow.sdk.exceptions import AirflowFailException

from reindex_airflow import tasks as t
from reindex_airflow.failures import task_outcome, terminal_errors
from reindex_airflow.hooks import PgVectorHook

log = logging.getLogger(__name__)

QUALITY_PARAMS = ("quality_below", "quality_max_drop", "quality_min_agreement", "quality_sample", "quality_queries")
APPROVE, REJECT = "Approve", "Reject"


def _without_gate(params: dict | None) -> dict:
    return {k: v for k, v in (params or {}).items() if k not in QUALITY_PARAMS}


def prepare_upgrade(params: dict | None = None, dag_run=None) -> dict:
    """``tasks.prepare_upgrade`` with the gate's Params checked here and kept out of the run configuration."""
    from reindex.quality import GateSettings

    with terminal_errors():
        GateSettings.from_params(params or {})  # a bad gate setting fails the run before anything is embedded
    return t.prepare_upgrade(params=_without_gate(params), dag_run=dag_run)


def choose_upgrade_step(summary: dict, params: dict | None = None) -> str:
    """As ``tasks.choose_upgrade_step``, with the quality gate before ``switch_model``."""
    step = t.choose_upgrade_step(summary, params)
    return "quality_gate" if step == "switch_model" else step


def _encoders(store, manifest: dict):
    """Query encoders of the old store (its registered run configuration) and of the new one (this run's)."""
    from reindex.quality import query_encoder, registered_model

    corpus, old = manifest["corpus"], manifest.get("previous_model_checksum")
    row = registered_model(store, old) if old else None
    old_config = ((row or {}).get("details") or {}).get("config") or (
        {"model": row["model_id"], "backend": row["backend"]} if row else {})
    encode_old, why_old = query_encoder(corpus, old, old_config) if row else (None, "the corpus had no model")
    encode_new, why_new = query_encoder(corpus, manifest["model_checksum"], manifest["config"])
    return encode_old, encode_new, "; ".join(w for w in (why_old and f"old: {why_old}", why_new and f"new: {why_new}")
                                             if w)


@task_outcome
def quality_gate(manifest: dict, summary: dict, params: dict | None = None) -> dict:
    """Measure the new store against the old one, record the figures on the batch, say what comes next.

    Returns the figures (``reindex.quality.SwitchFigures``) with ``batch_id``, ``below`` (the action when below
    the bar), ``line`` (the one-line summary) and ``approval_text`` (the request a human answers).
    """
    from reindex.quality import GateSettings, evaluate_switch, same_weights
    from reindex.store.batches import add_stage_seconds, get_batch, update_details

    with terminal_errors():
        settings = GateSettings.from_params(params or {})
    batch_id, corpus = manifest["batch_id"], manifest["corpus"]
    old, new = manifest.get("previous_model_checksum"), manifest["model_checksum"]
    with PgVectorHook().store() as store:
        if not old:
            figures = None
        else:
            encode_old, encode_new, why = _encoders(store, manifest)
            figures = evaluate_switch(store, corpus, old, new, encode_old, encode_new, settings,
                                      same_weights=same_weights(store, old, new), not_measured=why)
        out = figures.to_dict() if figures else {"not_measured": "the corpus had no model to compare with",
                                                  "passed": True, "reasons": []}
        line = figures.line() if figures else "quality gate: not measured (the corpus had no model to compare with)"
        out.update(batch_id=batch_id, corpus=corpus, below=settings.below, line=line,
                   thresholds={"max_drop": settings.max_drop, "min_agreement": settings.min_agreement})
        message = (get_batch(store, batch_id) or {}).get("details", {}).get("message") or ""
        update_details(store, batch_id, {"quality": out, "message": _with_line(message, line)})
        add_stage_seconds(store, batch_id, "quality", out.get("seconds") or 0.0)
    out["approval_text"] = approval_text(out, manifest)
    (log.info if out["passed"] else log.warning)("%s", line)
    return out


def _with_line(message: str, line: str) -> str:
    """The batch message with the gate's line (replacing an earlier gate line of a rerun)."""
    kept = [part for part in message.split(" | ") if part and not part.startswith("quality gate:")]
    return " | ".join([*kept, line])


def approval_text(gate: dict, manifest: dict) -> str:
    """The human-in-the-loop request's body (Markdown): what is switched and the figures."""
    model = manifest.get("model") or {}
    rows = [("queries", f"{gate.get('queries', 0)} {gate.get('source', '')}".strip()),
            ("own document in top 10, old → new", f"{_pct(gate.get('hit_rate_old'))} → {_pct(gate.get('hit_rate_new'))}"),
            ("top-10 agreement (exact search)", _pct(gate.get("agreement"))),
            ("new index recall@10", _pct(gate.get("index_recall"))),
            ("cosine of each query's two vectors, min / mean",
             "n/a" if gate.get("min_cosine") is None else f"{gate['min_cosine']:.4f} / {gate['mean_cosine']:.4f}")]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    reasons = "\n".join(f"- {r}" for r in gate.get("reasons") or []) or "- none"
    return (f"Corpus **{manifest['corpus']}**: switch from model `{manifest.get('previous_model_checksum')}` to "
            f"`{manifest['model_checksum']}` ({model.get('model_id')}, {model.get('dim')}-d, "
            f"{model.get('runtime', 'torch')} {model.get('precision', 'fp32')}, {model.get('storage', 'vector')})?\n\n"
            f"| figure | value |\n|---|---|\n{table}\n\nBelow the bar because:\n{reasons}\n\n"
            "**Approve** switches the corpus to the new store now. **Reject** keeps the old model serving and fails "
            "the run (a rerun measures again; rows already embedded are kept).")


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def after_gate(gate: dict) -> str:
    """Passed → quality_passed; below the bar: by ``quality_below`` (switch / wait / fail)."""
    if gate.get("passed"):
        return "quality_passed"
    return {"switch": "quality_passed", "wait": "approve_switch"}.get(gate.get("below"), "below_bar")


def switch_model(params: dict | None = None, ti=None) -> dict:
    """``tasks.switch_model`` after ``quality_passed`` or an approval. The manifest is pulled, not passed: an
    argument would make ``prepare_upgrade`` an upstream, and its success alone would run the switch when
    both ways to it were skipped."""
    return t.switch_model(ti.xcom_pull(task_ids="prepare_upgrade"), params)


@task_outcome
def quality_failed(ti=None) -> None:
    """Give the corpus back and fail the run with the figures: the old model keeps serving. (Inputs pulled, as
    in ``switch_model``: the task runs only by the ``below_bar`` or ``approve_switch`` way.)"""
    from reindex.store.leases import release

    gate, manifest = ti.xcom_pull(task_ids="quality_gate"), ti.xcom_pull(task_ids="prepare_upgrade")
    with PgVectorHook().store() as store:
        release(store, manifest["corpus"], manifest["batch_id"])
    decision = gate.get("decision") or _decision(manifest["batch_id"])
    how = f" and the switch was rejected by {decision}" if decision else ""
    raise AirflowFailException(
        f"upgrade batch {manifest['batch_id']} not switched: the new store is below the quality bar{how}. "
        f"{gate.get('line')}. The corpus still serves its previous model {manifest.get('previous_model_checksum')}; "
        "rerun with quality_below=switch to switch anyway, or quality_below=wait to decide by hand.")


def _decision(batch_id: str) -> str:
    from reindex.store.batches import get_batch

    with PgVectorHook().store() as store:
        quality = ((get_batch(store, batch_id) or {}).get("details") or {}).get("quality") or {}
    d = quality.get("decision") or {}
    return (d.get("by") or "a human") if d.get("choice") == REJECT else ""


def record_switch_anyway(gate: dict) -> dict:
    """``quality_passed``: note on the batch when the switch goes ahead below the bar (quality_below=switch)."""
    if not gate.get("passed"):
        from reindex.store.batches import update_details

        log.warning("switching below the quality bar (quality_below=%s): %s", gate.get("below"), gate.get("line"))
        with PgVectorHook().store() as store:
            update_details(store, gate["batch_id"], {"quality": {**_strip(gate), "decision": {
                "choice": "switch anyway", "by": "quality_below=switch"}}})
    return {"passed": gate.get("passed"), "line": gate.get("line")}


def _strip(gate: dict) -> dict:
    return {k: v for k, v in gate.items() if k != "approval_text"}


class QualityApprovalOperator(HITLBranchOperator):
    """A human approves (→ ``switch_model``) or rejects (→ ``quality_failed``) a switch below the quality bar.

    Airflow 3's human-in-the-loop: the task waits in ``awaiting_input`` (no worker slot, no triggerer) until
    someone answers in the UI's Required Actions (or the HITL REST API); the request's body has the figures.
    The answer (who, when, which) is recorded on the upgrade batch (``details.quality.decision``).
    """

    def __init__(self, *, gate_task_id: str = "quality_gate", **kwargs: Any) -> None:
        super().__init__(
            options=[APPROVE, REJECT],
            options_mapping={APPROVE: "switch_model", REJECT: "quality_failed"},
            defaults=[REJECT],  # no answer within response_timeout: the old model keeps serving
            subject="Switch corpus {{ ti.xcom_pull(task_ids='" + gate_task_id + "')['corpus'] }} to its new model "
                    "below the quality bar?",
            body="{{ ti.xcom_pull(task_ids='" + gate_task_id + "')['approval_text'] }}",
            **kwargs)
        self.gate_task_id = gate_task_id

    def execute_complete(self, context, event: dict[str, Any]) -> Any:
        from reindex.store.batches import get_batch, update_details

        chosen = list(event.get("chosen_options") or [])
        by = event.get("responded_by_user") or {}
        gate = context["ti"].xcom_pull(task_ids=self.gate_task_id) or {}
        if gate.get("batch_id") and "error" not in event:
            with PgVectorHook().store() as store:
                quality = ((get_batch(store, gate["batch_id"]) or {}).get("details") or {}).get("quality") or {}
                responded = event.get("responded_at")
                update_details(store, gate["batch_id"], {"quality": {**quality, "decision": {
                    "choice": chosen[0] if chosen else None,
                    "by": (by.get("name") or by.get("id")) if isinstance(by, dict) else str(by),
                    "at": responded.isoformat() if hasattr(responded, "isoformat") else responded}}})
        return super().execute_complete(context, event)
