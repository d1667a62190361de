"""Synthetic Russian + English texts of mixed lengths, built from the bundled sample corpus's sentences."""

from __future__ import annotations

import functools
import re

import numpy as np
import orjson

from benchmarks.common import ROOT

SAMPLE = ROOT / "include" / "sample_corpus"
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


@functools.lru_cache(maxsize=1)
def sentences() -> tuple[list[str], list[str]]:
    """(english, russian) sentences of the sample corpus."""
    texts: list[str] = []
    for path in sorted(SAMPLE.rglob("*")):
        if path.suffix == ".jsonl":
            texts += [orjson.loads(line).get("text", "") for line in path.read_bytes().splitlines() if line.strip()]
        elif path.suffix in (".txt", ".md") and path.name != "README.md":
            texts.append(path.read_text(encoding="utf-8"))
    en: list[str] = []
    ru: list[str] = []
    for text in texts:
        for s in _SENTENCE.split(" ".join(text.split())):
            if len(s) < 20:
                continue
            (ru if re.search("[а-яА-ЯёЁ]", s) else en).append(s)
    return en, ru


def make_texts(n: int, *, seed: int = 0, min_chars: int = 40, max_chars: int = 1200) -> list[str]:
    """``n`` distinct texts, half Russian and half English, lengths spread from ``min_chars`` to ``max_chars``
    (log-uniform: many short chunks, some long ones, like a real corpus)."""
    en, ru = sentences()
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.uniform(np.log(min_chars), np.log(max_chars), size=n)).astype(int)
    out = []
    for i, target in enumerate(lengths):
        pool = ru if i % 2 else en
        parts = [f"#{i}."]
        size = len(parts[0])
        while size < target:
            s = pool[int(rng.integers(len(pool)))]
            parts.append(s)
            size += len(s) + 1
        out.append(" ".join(parts)[: max(target, 20)])
    return out


def write_corpus(directory, docs: int, *, seed: int = 0, min_chars: int = 1500, max_chars: int = 5000,
                 per_file: int = 1000) -> int:
    """A JSONL corpus of ``docs`` documents (``{"id", "text"}``) under ``directory``; returns bytes written."""
    from pathlib import Path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    total = 0
    texts = make_texts(docs, seed=seed, min_chars=min_chars, max_chars=max_chars)
    for start in range(0, docs, per_file):
        data = b"".join(orjson.dumps({"id": f"doc{i:07d}", "text": texts[i]}) + b"\n"
                        for i in range(start, min(docs, start + per_file)))
        (directory / f"part-{start // per_file:05d}.jsonl").write_bytes(data)
        total += len(data)
    return total


def edit_corpus(directory, fraction: float, *, seed: int = 0) -> int:
    """Append a sentence to ``fraction`` of the documents (in place); returns how many were edited."""
    from pathlib import Path

    rng = np.random.default_rng(seed)
    edited = 0
    for path in sorted(Path(directory).glob("*.jsonl")):
        lines = path.read_bytes().splitlines()
        out = []
        for line in lines:
            doc = orjson.loads(line)
            if rng.random() < fraction:
                doc["text"] += f" Edited on night {seed}: the text changed here."
                edited += 1
            out.append(orjson.dumps(doc))
        path.write_bytes(b"\n".join(out) + b"\n")
    return edited
