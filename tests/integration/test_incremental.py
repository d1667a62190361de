"""Incremental reindexing with the real bundled model and a real store (no Airflow): only new and
changed documents are chunked and embedded, deleted ones lose their rows, unchanged vectors stay
byte-for-byte, and a chunk whose text already has a vector reuses it."""

from __future__ import annotations

import threading

import pytest
from psycopg import sql

from reindex import pipeline
from reindex.chunking import TokenChunker
from reindex.config import ReindexConfig
from reindex.store import leases
from reindex.store.leases import CorpusBusyError

TOPICS = [
    "Glaciers carve U-shaped valleys as they slowly grind down mountain slopes over thousands of years.",
    "Honey bees pollinate apple blossoms and communicate the location of flowers with a waggle dance.",
    "The Baltic Sea is brackish: rivers bring so much fresh water that its salinity stays low.",
    "Lighthouses once used clockwork to rotate their lenses so ships could identify each light.",
    "Sourdough bread rises thanks to wild yeast and lactic acid bacteria living in the starter.",
    "Байкал — самое глубокое озеро на Земле, его глубина больше полутора километров.",
    "Северное сияние возникает, когда заряженные частицы солнечного ветра сталкиваются с атмосферой.",
    "Chess engines search millions of positions per second and evaluate them with learned functions.",
    "Coral reefs are built by tiny animals that secrete calcium carbonate skeletons in warm seas.",
    "The printing press let books be copied quickly, which spread literacy across Europe.",
]


class CountingEncoder:
    """The real encoder, counting every text it is asked to encode."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.spec = inner.spec
        self.texts: list[str] = []

    def encode(self, texts):
        self.texts.extend(texts)
        return self.inner.encode(texts)


def _write(root, docs: dict[str, str]) -> None:
    for p in root.glob("*.txt"):
        p.unlink()
    for name, text in docs.items():
        (root / f"{name}.txt").write_text(text, encoding="utf-8")


def _run(store, cfg, root, batch_id, encoder):
    prepared = pipeline.prepare(store, cfg)
    manifest = pipeline.chunk_corpus(store, cfg, root, batch_id=batch_id, model_checksum=prepared["model_checksum"])
    for p in pipeline.plan(store, cfg, batch_id):
        pipeline.encode_partition(store, cfg, p, model_checksum=prepared["model_checksum"], encoder=encoder)
    return manifest, pipeline.finish_batch(store, cfg, batch_id, prepared["model_checksum"])


def _vectors(store, table: str) -> dict[str, tuple[str, bytes, object]]:
    """chunk_id -> (content hash, vector text, updated_at) from the vector table."""
    rows = store.execute(sql.SQL("""SELECT c.chunk_id, e.content_sha256, e.embedding::text, e.updated_at
        FROM {emb} e JOIN {chunks} c ON c.id = e.chunk_pk""").format(
        emb=store.t(table), chunks=store.t("chunks"))).fetchall()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def _doc(chunk_id: str) -> str:
    return chunk_id.split("#")[0].removesuffix(".txt")


def _chunks(store, corpus):
    return {r[0]: r[1] for r in store.execute(sql.SQL("SELECT chunk_id, content_sha256 FROM {} WHERE corpus = %s").format(
        store.t("chunks")), (corpus,)).fetchall()}


@pytest.fixture
def docs():
    # d0..d9: one topic each; d1 and d2 long enough for several chunks.
    d = {f"d{i}": text for i, text in enumerate(TOPICS)}
    d["d1"] = " ".join([TOPICS[1]] + TOPICS[:4] * 3)
    d["d2"] = " ".join([TOPICS[2]] + TOPICS[4:8] * 3)
    return d


def test_changed_deleted_added_documents_only(store, tmp_path, encoder, docs, monkeypatch):
    cfg = ReindexConfig(corpus="inc", corpus_uri=str(tmp_path), max_tokens=64, overlap_tokens=8)
    _write(tmp_path, docs)
    enc = CountingEncoder(encoder)
    first, s1 = _run(store, cfg, tmp_path, "b1", enc)
    assert s1.status.value == "COMPLETED" and s1.encoded == first["chunks"] == len(enc.texts)
    table = first["vector_table"]
    before_chunks, before_vecs = _chunks(store, "inc"), _vectors(store, table)
    assert len(before_vecs) == len(before_chunks) > 10

    # change 3 documents (one multi-chunk at its end only), delete 1, add 2
    changed = dict(docs)
    changed["d0"] = docs["d0"].replace("thousands", "millions")
    changed["d2"] = docs["d2"] + " Tides in the Bay of Fundy are the highest in the world."
    changed["d5"] = "Озеро Байкал зимой покрывается прозрачным льдом толщиной около метра."
    del changed["d3"]
    changed["d10"] = "Owls turn their heads up to 270 degrees because their eyes cannot move in their sockets."
    changed["d11"] = "Basalt columns form when thick lava flows cool and contract into hexagonal prisms."
    _write(tmp_path, changed)
    enc = CountingEncoder(encoder)
    chunk_calls = []
    real_chunk = TokenChunker.chunk
    monkeypatch.setattr(TokenChunker, "chunk", lambda self, doc_id, text: (chunk_calls.append(doc_id),
                                                                              real_chunk(self, doc_id, text))[1])
    second, s2 = _run(store, cfg, tmp_path, "b2", enc)

    after_chunks, after_vecs = _chunks(store, "inc"), _vectors(store, table)
    new_or_changed = {cid for cid, sha in after_chunks.items() if before_chunks.get(cid) != sha}
    texts = dict(store.execute(sql.SQL("SELECT chunk_id, text FROM {} WHERE corpus = 'inc'").format(
        store.t("chunks"))).fetchall())
    # only the changed and added documents were chunked, and exactly their new chunks encoded
    assert sorted(d.removesuffix(".txt") for d in chunk_calls) == ["d0", "d10", "d11", "d2", "d5"]
    assert sorted(enc.texts) == sorted(texts[c] for c in new_or_changed)
    assert {_doc(c) for c in new_or_changed} == {"d0", "d2", "d5", "d10", "d11"}
    assert any(_doc(c) == "d2" and c not in new_or_changed for c in after_chunks)  # d2's head unchanged
    assert (second["unchanged_documents"], second["deleted_documents"]) == (6, 1)
    assert s2.encoded == len(new_or_changed) and s2.status.value == "COMPLETED"
    # the deleted document's rows are gone, vectors and chunks agree
    assert not any(_doc(c) == "d3" for c in after_chunks)
    (ndocs,) = store.one(sql.SQL("SELECT count(*) FROM {} WHERE corpus = 'inc' AND doc_id = 'd3.txt'").format(
        store.t("documents")))
    assert ndocs == 0 and set(after_vecs) == set(after_chunks)
    # everything else untouched: same vectors, not even rewritten
    for cid in set(after_chunks) - new_or_changed:
        assert after_vecs[cid] == before_vecs[cid], cid

    # zero-work run: nothing chunked, nothing encoded, and the summary says so
    chunk_calls.clear()
    enc = CountingEncoder(encoder)
    third, s3 = _run(store, cfg, tmp_path, "b3", enc)
    assert enc.texts == [] and chunk_calls == []
    assert (third["pending"], third["unchanged_documents"], s3.encoded, s3.total) == (0, 11, 0, 0)
    assert s3.status.value == "COMPLETED"
    assert s3.message.startswith("nothing to embed: 0 chunks encoded, 0 batch jobs submitted")
    assert _vectors(store, table) == after_vecs


def test_chunking_change_rechunks_and_force_reembeds(store, tmp_path, encoder, docs):
    _write(tmp_path, {k: docs[k] for k in ("d0", "d1")})
    cfg = ReindexConfig(corpus="inc", corpus_uri=str(tmp_path), max_tokens=64, overlap_tokens=8)
    first, _ = _run(store, cfg, tmp_path, "b1", CountingEncoder(encoder))
    smaller = ReindexConfig(corpus="inc", corpus_uri=str(tmp_path), max_tokens=32, overlap_tokens=8)
    enc = CountingEncoder(encoder)
    second, _ = _run(store, smaller, tmp_path, "b2", enc)
    assert second["unchanged_documents"] == 0 and second["chunks"] > first["chunks"]
    forced = ReindexConfig(corpus="inc", corpus_uri=str(tmp_path), max_tokens=32, overlap_tokens=8, force=True)
    enc = CountingEncoder(encoder)
    third, s3 = _run(store, forced, tmp_path, "b3", enc)
    assert len(enc.texts) == third["chunks"] == second["chunks"] and s3.reused == 0


def test_a_text_already_embedded_elsewhere_in_the_corpus_is_reused(store, tmp_path, encoder, docs):
    _write(tmp_path, {k: docs[k] for k in ("d0", "d4", "d7")})
    cfg = ReindexConfig(corpus="inc", corpus_uri=str(tmp_path))
    first, _ = _run(store, cfg, tmp_path, "b1", CountingEncoder(encoder))
    # a new document repeating d4's text, and d7 moved to a new id: no encode, no submission
    _write(tmp_path, {"d0": docs["d0"], "d4": docs["d4"], "copy_of_d4": docs["d4"], "d7_renamed": docs["d7"]})
    enc = CountingEncoder(encoder)
    second, s2 = _run(store, cfg, tmp_path, "b2", enc)
    assert enc.texts == []
    assert (second["pending"], second["reused_by_content"], second["deleted_documents"]) == (0, 2, 1)
    vecs = _vectors(store, first["vector_table"])
    assert vecs["copy_of_d4.txt#0"][1] == vecs["d4.txt#0"][1]
    assert set(vecs) == {"d0.txt#0", "d4.txt#0", "copy_of_d4.txt#0", "d7_renamed.txt#0"}
    assert s2.message.startswith("nothing to embed") and "2 by content" in s2.message


def test_two_runs_on_one_corpus_never_interleave(store, tmp_path, encoder, docs, monkeypatch):
    """Run A holds the corpus while it encodes (slowly); B fails at once (on_busy=fail), C waits and
    starts only after A closed its batch, then finds nothing left to do."""
    _write(tmp_path, docs)
    cfg_a = ReindexConfig(corpus="inc", corpus_uri=str(tmp_path), max_tokens=64, overlap_tokens=8)
    cfg_b = ReindexConfig(corpus="inc", corpus_uri=str(tmp_path), on_busy="fail")
    cfg_c = ReindexConfig(corpus="inc", corpus_uri=str(tmp_path), max_tokens=64, overlap_tokens=8,
                          busy_wait_seconds=120)
    encoding, go_on = threading.Event(), threading.Event()

    class SlowEncoder(CountingEncoder):
        """Holds A inside its batch (lease held) until the test has seen B refused and C waiting."""

        def encode(self, texts):
            encoding.set()
            assert go_on.wait(120), "the test never let A go on"
            return super().encode(texts)

    c_asked = threading.Event()
    real_try_acquire = leases.try_acquire

    def try_acquire(store_, corpus, batch_id, *args, **kwargs):
        holder = real_try_acquire(store_, corpus, batch_id, *args, **kwargs)
        if batch_id == "batch_c" and holder is not None:
            c_asked.set()  # C asked for the corpus and was told to wait
        return holder

    monkeypatch.setattr(leases, "try_acquire", try_acquire)

    import psycopg

    from reindex.store import Store

    results: dict[str, object] = {}

    def run(name, cfg, enc):
        with psycopg.connect(store.conn.info.dsn, autocommit=True) as conn:
            s = Store(conn, store.schema)
            try:
                results[name] = _run(s, cfg, tmp_path, f"batch_{name}", enc)
            except CorpusBusyError as e:
                results[name] = e

    a = threading.Thread(target=run, args=("a", cfg_a, SlowEncoder(encoder)))
    a.start()
    assert encoding.wait(60)
    assert leases.get_lease(store, "inc").batch_id == "batch_a"
    run("b", cfg_b, CountingEncoder(encoder))
    enc_c = CountingEncoder(encoder)
    c = threading.Thread(target=run, args=("c", cfg_c, enc_c))
    c.start()
    assert c_asked.wait(60), "C never asked for the corpus"
    go_on.set()
    a.join(120)
    c.join(120)
    err = results["b"]
    assert isinstance(err, CorpusBusyError)
    assert "corpus 'inc' is busy" in str(err) and "batch batch_a" in str(err) and "reindex unlock" in str(err)
    (_, s_a), (_, s_c) = results["a"], results["c"]
    assert s_a.status.value == "COMPLETED" and s_a.ready == s_a.total > 10
    assert enc_c.texts == [] and s_c.total == 0
    times = dict(store.execute(sql.SQL("SELECT batch_id, started_at FROM {}").format(store.t("batches"))).fetchall())
    (a_done,) = store.one(sql.SQL("SELECT finished_at FROM {} WHERE batch_id = 'batch_a'").format(store.t("batches")))
    assert "batch_b" not in times  # B never opened a batch
    assert times["batch_c"] >= a_done  # C's writes began after A's batch closed
    assert leases.get_lease(store, "inc").free
