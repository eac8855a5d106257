"""Grading the completions with stage 2's grader and the figures of the report: pass@1 with its 95% confidence
interval over problems, accuracy by level and by subject, the verdicts counted."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from distilled_plugins.core import grader
from distilled_plugins.core.errors import DataError
from distilled_plugins.core.io import dumps_line, iter_jsonl, load_rows
from distilled_plugins.core.stats import Stats
from distilled_plugins.evaluate.config import EvalConfig

# why a problem is left out of pass@1 (its denominator is the problems scored)
DROP_REASONS = ("gold_filtered", "no_completions")


@dataclass
class Scored:
    key: str
    level: str
    subject: str
    verdicts: list[str]


def rows_to_score(cfg: EvalConfig, completions: Path, problems: list[dict] | None, excluded: Stats) -> list[dict]:
    """Rows of ``{key, problem, gold, level, subject, completions, finish_reasons}`` in problem order.

    Problems that cannot be scored (an unusable gold, no completions) are left out and counted in ``excluded``.
    """
    if cfg.rescore:
        return _rescored_rows(cfg, completions, excluded)
    return _generated_rows(completions, problems, excluded)


def _rescored_rows(cfg: EvalConfig, completions: Path, excluded: Stats) -> list[dict]:
    """The rows of a file of completions made elsewhere; level and subject joined from the dataset by problem."""
    by_problem = {p["problem"]: p for p in load_rows(cfg.dataset)} if Path(cfg.dataset).exists() else {}
    rows = []
    for lineno, row in iter_jsonl(completions):
        excluded.read()
        texts = _completion_texts(cfg, completions, lineno, row)
        if grader.gold_is_filtered(row[cfg.gold_column]):
            excluded.drop("gold_filtered")  # proof / notfound / empty: nothing to check against
            continue
        if not texts:
            excluded.drop("no_completions")
            continue
        excluded.keep()
        known = by_problem.get(row[cfg.problem_column], {})
        rows.append(
            {
                "key": str(row.get("unique_id") or known.get("unique_id") or lineno),
                "problem": row[cfg.problem_column],
                "gold": str(row[cfg.gold_column]),
                "level": str(row.get("level") or known.get("level") or "unknown"),
                "subject": str(row.get("subject") or known.get("subject") or "unknown"),
                "completions": texts,
                "finish_reasons": row.get("finish_reasons") or [None] * len(texts),
            }
        )
    if not rows:
        raise DataError(f"{completions}: no completions to score ({excluded.summary()})")
    return rows


def _completion_texts(cfg: EvalConfig, completions: Path, lineno: int, row: dict) -> list[str]:
    """A rescored row's completions, its columns checked: a string is one completion."""
    for column in (cfg.problem_column, cfg.gold_column, cfg.completion_column):
        if column not in row:
            raise DataError(f"{completions}:{lineno}: missing column {column!r}; columns present: {', '.join(row)}")
    texts = row[cfg.completion_column]
    texts = [texts] if isinstance(texts, str) else texts
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise DataError(
            f"{completions}:{lineno}: {cfg.completion_column!r} must be a string or a list of strings, "
            f"got {type(texts).__name__}"
        )
    return texts


def _generated_rows(completions: Path, problems: list[dict], excluded: Stats) -> list[dict]:
    """The rows of completions made here, in the problems' order: every problem must have its line."""
    by_key = {str(r["unique_id"]): r for _, r in iter_jsonl(completions)}
    rows = []
    for p in problems:
        excluded.read()
        got = by_key.get(str(p["unique_id"]))
        if got is None:
            raise DataError(f"{completions}: no completions for problem {p['unique_id']}")
        if grader.gold_is_filtered(p["answer"]):
            excluded.drop("gold_filtered")
            continue
        excluded.keep()
        rows.append(
            {
                "key": str(p["unique_id"]),
                "problem": p["problem"],
                "gold": str(p["answer"]),
                "level": str(p["level"]),
                "subject": str(p["subject"]),
                "completions": got["generations"],
                "finish_reasons": got.get("finish_reasons") or [None] * len(got["generations"]),
            }
        )
    return rows


def score(rows: list[dict], workers: int | None, scored_path: Path) -> list[Scored]:
    samples = (
        grader.Sample((i, j), row["gold"], text, row["finish_reasons"][j])
        for i, row in enumerate(rows)
        for j, text in enumerate(row["completions"])
    )
    verdicts: dict[tuple[int, int], grader.Verdict] = {}
    with grader.GradingPool(workers) as pool:
        for verdict in pool.grade(samples):
            verdicts[verdict.id] = verdict
    scored = []
    with open(scored_path, "wb") as f:
        for i, row in enumerate(rows):
            row_verdicts = [verdicts[(i, j)] for j in range(len(row["completions"]))]
            scored.append(Scored(row["key"], row["level"], row["subject"], [v.verdict for v in row_verdicts]))
            for j, v in enumerate(row_verdicts):
                f.write(dumps_line({"key": row["key"], "sample": j, "verdict": v.verdict, "reason": v.reason}))
    return scored


def _accuracy(items: list[Scored]) -> dict:
    samples = sum(len(s.verdicts) for s in items)
    correct = sum(v == grader.CORRECT for s in items for v in s.verdicts)
    return {
        "problems": len(items),
        "samples": samples,
        "correct": correct,
        "accuracy": round(100.0 * correct / samples, 2) if samples else 0.0,
    }


def summarize(scored: list[Scored]) -> dict:
    overall = _accuracy(scored)
    per_problem = [sum(v == grader.CORRECT for v in s.verdicts) / len(s.verdicts) for s in scored if s.verdicts]
    n = len(per_problem)
    if n == 0:
        raise DataError("no problem has a completion to score")
    mean = sum(per_problem) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in per_problem) / (n - 1)) if n > 1 else 0.0
    half = 1.96 * std / math.sqrt(n) if n else 0.0
    groups = {"by_level": defaultdict(list), "by_subject": defaultdict(list)}
    for s in scored:
        groups["by_level"][s.level].append(s)
        groups["by_subject"][s.subject].append(s)
    verdict_counts = defaultdict(int)
    for s in scored:
        for v in s.verdicts:
            verdict_counts[v] += 1
    return {
        "pass@1": round(100.0 * mean, 2),
        "ci95": [round(100.0 * max(0.0, mean - half), 2), round(100.0 * min(1.0, mean + half), 2)],
        **{k: overall[k] for k in ("problems", "samples", "correct")},
        "truncated": verdict_counts.get(grader.TRUNCATED, 0),
        "verdicts": dict(sorted(verdict_counts.items())),
        "by_level": {k: _accuracy(v) for k, v in sorted(groups["by_level"].items())},
        "by_subject": {k: _accuracy(v) for k, v in sorted(groups["by_subject"].items())},
    }
