"""reindex.quality: the retrieval-agreement measure on tiny fixed examples with known answers, and the gate's
settings and verdict."""

from __future__ import annotations

import json

import numpy as np
import pytest

from reindex.errors import ConfigError
from reindex.quality import (
    GateSettings,
    SwitchFigures,
    exact_top_k,
    gate_verdict,
    known_item_query,
    load_queries,
    overlap_at_k,
    vector_agreement,
)


def _angles(*degrees: float) -> np.ndarray:
    r = np.radians(degrees)
    return np.stack([np.cos(r), np.sin(r)], axis=1).astype(np.float32)


def test_overlap_at_k_known_values():
    assert overlap_at_k([["a", "b"], ["c", "d"]], [["b", "a"], ["c", "x"]], k=2) == pytest.approx(0.75)
    # a reference list shorter than k counts against its own length; an empty one is left out
    assert overlap_at_k([["a"], []], [["a", "z"], ["q"]], k=2) == 1.0
    assert overlap_at_k([["a", "b", "c"]], [["c", "q", "a"]], k=2) == 0.0  # only the first k of each count
    with pytest.raises(ValueError, match="2 reference result lists against 1"):
        overlap_at_k([["a"], ["b"]], [["a"]])


def test_exact_top_k_orders_by_cosine_and_excludes_self():
    base = _angles(0, 10, 30, 90, 180)
    top = exact_top_k(base, base, k=2, exclude_self=True)
    assert top.tolist() == [[1, 2], [0, 2], [1, 0], [2, 1], [3, 2]]
    assert exact_top_k(_angles(85), base, k=3).tolist() == [[3, 2, 1]]
    assert exact_top_k(base * 7.0, base, k=1).tolist() == [[0], [1], [2], [3], [4]]  # lengths do not matter


def test_vector_agreement_known_answers():
    """Five texts on a circle; the candidate moves text 3 from 90° to 5°. Neighbours (k=2, self excluded):
    reference 0:{1,2} 1:{0,2} 2:{1,0} 3:{2,1} 4:{3,2}; candidate 0:{3,1} 1:{3,0} 2:{1,3} 3:{0,1} 4:{2,1}.
    Overlaps: 1/2, 1/2, 1/2, 1/2, 1/2 → 0.5. Cosines: 1, 1, 1, cos 85°, 1."""
    ref = _angles(0, 10, 30, 90, 180)
    cand = _angles(0, 10, 30, 5, 180)
    a = vector_agreement(ref, cand, k=2)
    assert a.texts == 5 and a.k == 2
    assert a.top_k_agreement == pytest.approx(0.5)
    assert a.min_cosine == pytest.approx(np.cos(np.radians(85)), abs=1e-6)
    assert a.mean_cosine == pytest.approx((4 + np.cos(np.radians(85))) / 5, abs=1e-6)
    same = vector_agreement(ref, ref.copy(), k=2)
    assert same.top_k_agreement == 1.0 and same.min_cosine == pytest.approx(1.0)


def test_vector_agreement_with_queries_and_other_dimensions():
    ref = _angles(0, 10, 30, 90, 180)
    cand = np.hstack([ref, np.zeros((5, 1), np.float32)])  # the same geometry in 3 dimensions
    query = np.array([[np.cos(np.radians(20)), np.sin(np.radians(20)), 0]])
    a = vector_agreement(ref, cand, k=2, reference_queries=_angles(20), candidate_queries=query)
    assert a.top_k_agreement == 1.0 and a.texts == 5
    assert a.min_cosine is None and a.mean_cosine is None  # no cosine between vectors of different dimensions
    with pytest.raises(ValueError, match="give the queries encoded by both sides"):
        vector_agreement(ref, cand, reference_queries=_angles(1))
    with pytest.raises(ValueError, match="5 reference vectors against 4"):
        vector_agreement(ref, cand[:4])


def test_gate_settings_validated_with_names():
    assert GateSettings.from_params({"quality_below": None}).below == "fail"
    with pytest.raises(ConfigError, match=r"quality_below 'later' is not supported: choose one of \['fail', 'switch', 'wait'\]"):
        GateSettings.from_params({"quality_below": "later"})
    with pytest.raises(ConfigError, match="quality_max_drop=1.5 is out of range"):
        GateSettings.from_params({"quality_max_drop": 1.5})
    with pytest.raises(ConfigError, match="quality_sample=0 is out of range"):
        GateSettings.from_params({"quality_sample": 0})


def test_load_queries_from_list_text_file_and_jsonl(tmp_path):
    assert load_queries(None) == [] and load_queries([]) == []
    assert load_queries(["  first ", {"query": "second", "doc_id": "d2"}]) == [("first", None), ("second", "d2")]
    (tmp_path / "q.txt").write_text("one\n\n two \n", encoding="utf-8")
    assert load_queries(str(tmp_path / "q.txt")) == [("one", None), ("two", None)]
    (tmp_path / "q.jsonl").write_text(json.dumps({"query": "три", "doc_id": "ru-1"}) + "\n", encoding="utf-8")
    assert load_queries(str(tmp_path / "q.jsonl")) == [("три", "ru-1")]
    (tmp_path / "bad.jsonl").write_text('{"query": "ok"}\nnot json\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="bad.jsonl: line 2 is not JSON"):
        load_queries(str(tmp_path / "bad.jsonl"))
    with pytest.raises(ConfigError, match="is not a file"):
        load_queries(str(tmp_path / "missing.txt"))
    with pytest.raises(ConfigError, match="is not a query"):
        load_queries([{"text": "no query key"}])


def test_known_item_query_takes_the_middle_span():
    words = [f"w{i}" for i in range(100)]
    assert known_item_query(" ".join(words), words=4) == "w48 w49 w50 w51"
    assert known_item_query("short  text", words=4) == "short text"


def test_gate_verdict():
    s = GateSettings(max_drop=0.02, min_agreement=0.97)
    ok = SwitchFigures(queries=100, source="sampled chunks", hit_rate_old=0.90, hit_rate_new=0.89, agreement=0.5)
    assert gate_verdict(ok, s) == (True, [])  # another model: agreement is shown, not judged
    worse = SwitchFigures(queries=100, hit_rate_old=0.90, hit_rate_new=0.85, agreement=0.5)
    passed, reasons = gate_verdict(worse, s)
    assert not passed and reasons == ["own-document hit rate fell 5.0% (90.0% → 85.0%), more than "
                                      "quality_max_drop=2.0%"]
    same = SwitchFigures(queries=100, source="sampled chunks", same_weights=True, hit_rate_old=0.9, hit_rate_new=0.9,
                         agreement=0.96, index_recall=1.0, min_cosine=0.99871, mean_cosine=0.99995)
    passed, reasons = gate_verdict(same, s)
    assert not passed and reasons[0].startswith("top-10 agreement 96.0% with the old store is below "
                                                "quality_min_agreement=97.0%")
    same.passed, same.reasons = passed, reasons
    assert same.line() == ("quality gate: 100 sampled chunks, own document in top 10 90.0% → 90.0% (old → new), "
                           "top-10 agreement 96.0%, index recall@10 100.0%, cosine min 0.9987 mean 1.0000 — BELOW "
                           "THRESHOLD: " + reasons[0])
    assert SwitchFigures(not_measured="backend vertex").line() == "quality gate: not measured (backend vertex)"


def test_recorded_gate_is_what_the_views_of_a_batch_show():
    from reindex.quality import RECORDED_GATE_KEYS, recorded_gate

    assert recorded_gate(None) is None and recorded_gate({}) is None and recorded_gate({"quality": {}}) is None
    figures = SwitchFigures(queries=40, source="user queries", hit_rate_old=0.5, hit_rate_new=0.75, agreement=0.25)
    shown = recorded_gate({"message": "x", "quality": {**figures.to_dict(), "line": figures.line(), "below": "fail"}})
    assert tuple(shown) == RECORDED_GATE_KEYS  # every key present: a template may read any of them
    assert (shown["queries"], shown["agreement"], shown["hit_rate_new"], shown["below"]) == (40, 0.25, 0.75, "fail")
    assert shown["index_recall"] is None and shown["decision"] is None and shown["reasons"] == []
    assert shown["line"] == ("quality gate: 40 user queries, own document in top 10 50.0% → 75.0% (old → new), "
                             "top-10 agreement 25.0% — passed")
    # figures recorded without their line (by hand, or an older gate): the line is made from them
    bare = recorded_gate({"quality": {"queries": 3, "source": "sampled chunks", "index_recall": 0.9, "passed": False,
                                      "reasons": ["r"], "decision": {"choice": "Approve", "by": "ann"}}})
    assert bare["line"] == "quality gate: 3 sampled chunks, index recall@10 90.0% — BELOW THRESHOLD: r"
    assert bare["decision"] == {"choice": "Approve", "by": "ann"}
