"""Decontamination: drop training problems that share a word 8-gram with an evaluation problem."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from distilled_plugins.core.io import load_rows

NGRAM = 8
_SPACE = re.compile(r"\s+")


def ngrams(text: str, n: int = NGRAM) -> list[str]:
    """Word n-grams of the lower-cased, whitespace-normalised text, in text order; a shorter text is one gram.

    >>> ngrams("What  is\\n1 + 1?", n=3)
    ['what is 1', 'is 1 +', '1 + 1?']
    """
    words = _SPACE.sub(" ", str(text).lower()).strip().split(" ")
    if len(words) < n:
        return [" ".join(words)] if words != [""] else []
    return [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]


class Decontaminator:
    """Holds the n-grams of the evaluation problems; ``match(problem)`` returns the first shared gram or None."""

    def __init__(self, eval_sets: Iterable[str | Path], problem_column: str = "problem"):
        self.sources = [str(p) for p in eval_sets]
        self.grams: set[str] = set()
        for path in self.sources:
            rows = load_rows(path)
            if rows and problem_column not in rows[0]:
                raise ValueError(f"{path}: evaluation set lacks column {problem_column!r}; columns: {list(rows[0])}")
            for row in rows:
                self.grams.update(ngrams(row[problem_column]))

    def match(self, problem: str) -> str | None:
        return next((gram for gram in ngrams(problem) if gram in self.grams), None)
