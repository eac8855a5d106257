"""One example on its way through rejection sampling: its row checked, its verdicts gathered, then the row kept
(only its accepted generations, with OpenR1-Math-220k's columns) or the reason it is dropped, and its lines of the
verdict file."""

from __future__ import annotations

from collections.abc import Iterator

from distilled_plugins.core import grader
from distilled_plugins.core.errors import DataError, MissingColumn
from distilled_plugins.core.schema import (
    CORRECTNESS_COUNT_COLUMN,
    GENERATION_COLUMNS,
    JUDGED_COLUMNS,
    MESSAGES_COLUMN,
    PASS_RATE_COLUMN,
    PROMPT_COLUMN,
)
from distilled_plugins.reject_sampling import judge
from distilled_plugins.reject_sampling.config import RejectSamplingConfig


class Example:
    """An input row and the verdicts on its generations: math_verify's, and the judge's where it was asked."""

    __slots__ = ("audit_checked", "dropped", "judged", "key", "remaining", "row", "verdicts")

    def __init__(self, row: dict, key: str, n: int, dropped: str | None = None):
        self.row, self.key, self.dropped = row, key, dropped
        self.verdicts: list[grader.Verdict | None] = [None] * n
        self.judged: list[judge.JudgeVerdict | None] = [None] * n  # the judge's, where it was asked
        self.remaining = 0 if dropped else n  # verdicts still to come: math_verify's, then the judge's
        self.audit_checked = False

    def first_correct(self) -> int | None:
        """The first generation math_verify accepted, if any."""
        return next((i for i, v in enumerate(self.verdicts) if v.verdict == grader.CORRECT), None)

    def accepted(self, recover: bool) -> list[int]:
        """The generations kept: math_verify's correct ones, and with ``recover`` those the judge accepted."""
        return [
            i
            for i, (v, j) in enumerate(zip(self.verdicts, self.judged, strict=True))
            if v.verdict == grader.CORRECT or (recover and j is not None and j.verdict == judge.YES)
        ]

    def drop_reason(self, correct: list[int], cfg: RejectSamplingConfig) -> str | None:
        """Why the graded example is left out with ``correct`` accepted (a DROP_REASONS entry), or None: kept."""
        n = len(self.verdicts)
        if not correct:
            unparseable = all(v.verdict == grader.GOLD_UNPARSEABLE for v in self.verdicts)
            return "gold_unparseable" if unparseable else "no_correct_generation"
        if len(correct) < cfg.min_pass_rate * n:
            return "too_hard"
        if len(correct) > cfg.max_pass_rate * n:
            return "too_easy"
        return None

    def verdict_lines(self) -> Iterator[dict]:
        """The example's lines of the verdict file: one per generation."""
        if self.dropped:
            for i in range(len(self.row["generations"])):
                yield {"key": self.key, "index": i, "verdict": self.dropped, "reason": "example dropped before grading"}
            return
        for i, v in enumerate(self.verdicts):
            line = {"key": self.key, "index": i, "verdict": v.verdict, "reason": v.reason}
            if self.judged[i] is not None:
                line.update(judge=self.judged[i].verdict, judge_reply=self.judged[i].reply)
            yield line


def check_row(row: dict, cfg: RejectSamplingConfig, where: str) -> None:
    """Raise on a row rejection sampling cannot read; a null ``finish_reasons`` or ``api_metadata`` is removed."""
    for column in (cfg.answer_column, "generations", cfg.problem_column):
        if column not in row:
            raise (DataError if column == "generations" else MissingColumn)(
                f"{where}: missing field {column!r}; fields present: {', '.join(row)}"
            )
    generations = row["generations"]
    if not isinstance(generations, list) or not all(isinstance(g, str) for g in generations):
        raise DataError(f"{where}: field 'generations' must be a list of strings")
    for column in ("finish_reasons", "api_metadata"):
        if column in row and row[column] is None:
            del row[column]  # null means "not recorded", as if the column were absent
        if column in row and not isinstance(row[column], list):
            raise DataError(f"{where}: field {column!r} must be a list, got {type(row[column]).__name__}")
        if column in row and len(row[column]) != len(generations):
            raise DataError(f"{where}: {column!r} has {len(row[column])} entries for {len(generations)} generations")


def reasoning_complete(generation: str, finish_reason: str | None) -> bool:
    """Whether the generation's reasoning ended: not cut at max_tokens, and a ``<think>`` it opens is closed."""
    return finish_reason != "length" and ("<think>" not in generation or "</think>" in generation)


def judge_says(verdict: judge.JudgeVerdict | None) -> bool | None:
    """``correctness_judge``: yes is True, no and an unparseable reply False, not asked (or failed) None."""
    if verdict is None or verdict.verdict == judge.ERROR:
        return None
    return verdict.verdict == judge.YES


def kept_row(example: Example, problem_column: str, correct: list[int]) -> dict:
    """The output row: only the ``correct`` generations (and their aligned columns), OpenR1-Math-220k's
    correctness columns, and ``messages`` = the user prompt + the last correct generation."""
    row = dict(example.row)
    generations = example.row["generations"]
    reasons = example.row.get("finish_reasons") or [None] * len(generations)
    for column in GENERATION_COLUMNS:
        if column in row:
            row[column] = [row[column][i] for i in correct]
    mv_column, judge_column, complete_column = JUDGED_COLUMNS
    row[mv_column] = [example.verdicts[i].verdict == grader.CORRECT for i in correct]
    row[judge_column] = [judge_says(example.judged[i]) for i in correct]
    row[complete_column] = [reasoning_complete(generations[i], reasons[i]) for i in correct]
    row[CORRECTNESS_COUNT_COLUMN] = len(correct)
    row[PASS_RATE_COLUMN] = round(len(correct) / len(generations), 6)
    prompt = row.get(PROMPT_COLUMN) or row[problem_column]
    row[MESSAGES_COLUMN] = [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": generations[correct[-1]]},
    ]
    return row
