"""Stage 2: keep the generations whose final answer math_verify proves equal to the gold answer.

Usage:
    python -m distilled_plugins.reject_sampling --src generations.jsonl --dst filtered.jsonl

Writes ``--dst`` (the tutorial's schema: kept examples with only their correct ``generations``,
``finish_reasons`` and ``api_metadata``, still aligned, and ``messages`` = user prompt + last correct
generation), ``<dst stem>.verdicts.jsonl`` (one verdict per generation, for audit) and ``<dst stem>.stats.json``.
Examples whose problem shares a word 8-gram with an evaluation problem (MATH-500 by default) are dropped.
Output rows keep input order, and a rerun writes byte-identical files (written to a temporary name, renamed).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path

from distilled_plugins import cli, configs, grader
from distilled_plugins.decontaminate import Decontaminator
from distilled_plugins.io import DataError, atomic_path, count_rows, dumps_line, iter_jsonl, write_json
from distilled_plugins.progress import Progress
from distilled_plugins.schema import GENERATION_COLUMNS, MESSAGES_COLUMN, PROMPT_COLUMN, row_key, sibling_path
from distilled_plugins.settings import DATA, from_args, setting
from distilled_plugins.stats import Stats

logger = logging.getLogger(__name__)

DEFAULT_EVAL_SETS = [str(configs.SHARED_DATA / "math500" / "test.jsonl")]


@dataclass
class RejectSamplingConfig:
    src: str = setting(help="JSONL of stage 1 (generations)", required=True)
    dst: str = setting(help="JSONL of kept examples", required=True)
    answer_column: str = setting(
        "answer", help="column holding the gold answer", title="Gold answer column", section=DATA
    )
    problem_column: str = setting("problem", help="column holding the problem text", section=DATA)
    uuid_column: str | None = setting(None, help="column keying the verdict file (default: the problem column)")
    workers: int | None = setting(None, help="grading processes (default: one per core)", minimum=1)
    parse_timeout: int = setting(5, help="math_verify's parse timeout, whole seconds", minimum=1)
    verify_timeout: int = setting(5, help="math_verify's verify timeout, whole seconds", minimum=1)
    sample_timeout: float = setting(
        30.0, help="hard wall-clock limit per generation; past it the grading worker is replaced", minimum=1
    )
    eval_sets: list[str] = setting(
        help="evaluation sets (with a 'problem' column) to decontaminate against; 'none' to skip",
        factory=lambda: list(DEFAULT_EVAL_SETS),
    )
    progress_interval: float = setting(5.0, help="seconds between progress lines", minimum=0)

    def __post_init__(self):
        self.uuid_column = self.uuid_column or self.problem_column
        if [str(s).lower() for s in self.eval_sets] == ["none"]:
            self.eval_sets = []
        for path in self.eval_sets:
            if not Path(path).exists():
                raise DataError(f"evaluation set {path} not found (give --eval-sets, or --eval-sets none to skip)")


# why an example is left out (an example is kept when one of its generations is correct)
DROP_REASONS = ("gold_filtered", "contaminated", "gold_unparseable", "no_generations", "no_correct_generation")


@dataclass
class RejectSamplingResult:
    output: Path
    verdicts: Path
    stats_file: Path
    stats: dict


class _Example:
    __slots__ = ("dropped", "key", "remaining", "row", "verdicts")

    def __init__(self, row: dict, key: str, n: int, dropped: str | None = None):
        self.row, self.key, self.dropped = row, key, dropped
        self.verdicts: list[grader.Verdict | None] = [None] * n
        self.remaining = 0 if dropped else n


def _check_row(row: dict, cfg: RejectSamplingConfig, where: str) -> None:
    for column in (cfg.answer_column, "generations", cfg.problem_column):
        if column not in row:
            raise DataError(f"{where}: missing field {column!r}; fields present: {', '.join(row)}")
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


def _kept_row(example: _Example, problem_column: str) -> dict | None:
    correct = [i for i, v in enumerate(example.verdicts) if v.verdict == grader.CORRECT]
    if not correct:
        return None
    row = dict(example.row)
    for column in GENERATION_COLUMNS:
        if column in row:
            row[column] = [row[column][i] for i in correct]
    prompt = row.get(PROMPT_COLUMN) or row[problem_column]
    row[MESSAGES_COLUMN] = [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": example.row["generations"][correct[-1]]},
    ]
    return row


def run(cfg: RejectSamplingConfig) -> RejectSamplingResult:
    """Grade every generation of ``cfg.src`` and write the kept examples, verdicts and stats."""
    src = Path(cfg.src)
    if not src.is_file():
        raise DataError(f"{src}: no such file")
    started = time.monotonic()
    decontaminator = Decontaminator(cfg.eval_sets, "problem") if cfg.eval_sets else None
    total = count_rows([src])
    if total == 0:
        raise DataError(f"{src}: no examples (the file is empty)")
    examples: OrderedDict[int, _Example] = OrderedDict()
    per_generation = Counter()
    kept = Stats("examples", reasons=DROP_REASONS)
    contaminated: list[dict] = []
    progress = Progress(logger, "examples", total, cfg.progress_interval)

    def samples():
        """Read examples lazily, registering each in input order before its samples go to the pool."""
        for index, (lineno, row) in enumerate(iter_jsonl(src)):
            _check_row(row, cfg, f"{src}:{lineno}")
            key = row_key(row[cfg.uuid_column])
            n = len(row["generations"])
            dropped = None
            if grader.gold_is_filtered(row[cfg.answer_column]):
                dropped = "gold_filtered"
            elif decontaminator and (gram := decontaminator.match(row[cfg.problem_column])):
                dropped = "contaminated"
                contaminated.append({"key": key, "problem": str(row[cfg.problem_column])[:200], "ngram": gram})
            examples[index] = _Example(row, key, n, dropped)
            if dropped:
                continue
            if n == 0:
                examples[index].dropped = "no_generations"
            reasons = row.get("finish_reasons") or [None] * n
            gold = str(row[cfg.answer_column])
            for i, completion in enumerate(row["generations"]):
                yield grader.Sample((index, i), gold, completion, reasons[i])

    with (
        atomic_path(cfg.dst) as dst_tmp,
        atomic_path(sibling_path(cfg.dst, ".verdicts.jsonl")) as verdicts_tmp,
        open(dst_tmp, "wb") as out,
        open(verdicts_tmp, "wb") as audit,
    ):

        def flush() -> None:
            """Write finished examples at the head of the input order."""
            while examples and next(iter(examples.values())).remaining == 0:
                _, example = examples.popitem(last=False)
                kept.read()
                if example.dropped:
                    kept.drop(example.dropped)
                    for i in range(len(example.row["generations"])):
                        audit.write(
                            dumps_line(
                                {
                                    "key": example.key,
                                    "index": i,
                                    "verdict": example.dropped,
                                    "reason": "example dropped before grading",
                                }
                            )
                        )
                    continue
                for i, v in enumerate(example.verdicts):
                    per_generation[v.verdict] += 1
                    audit.write(dumps_line({"key": example.key, "index": i, "verdict": v.verdict, "reason": v.reason}))
                row = _kept_row(example, cfg.problem_column)
                if row is None:
                    unparseable = all(v.verdict == grader.GOLD_UNPARSEABLE for v in example.verdicts)
                    kept.drop("gold_unparseable" if unparseable else "no_correct_generation")
                    continue
                out.write(dumps_line(row))
                kept.keep()
            progress.maybe_log(kept.rows_in, f"| {kept.rows_out} kept")

        with grader.GradingPool(cfg.workers, cfg.parse_timeout, cfg.verify_timeout, cfg.sample_timeout) as pool:
            logger.info("grading %d examples of %s with %d worker processes", total, src, pool.size)
            for verdict in pool.grade(samples()):
                index, i = verdict.id
                example = examples[index]
                example.verdicts[i] = verdict
                example.remaining -= 1
                flush()
            flush()  # examples dropped at the end of the input
            workers, replaced = pool.size, pool.replaced
    wall = time.monotonic() - started
    progress.finish(kept.rows_in, f"| {kept.rows_out} kept")
    graded = sum(per_generation.values())
    stats = {
        **kept.as_dict(),  # rows are examples; dropped: the examples left out, by reason
        "src": str(src),
        "dst": str(cfg.dst),
        "generations_graded": graded,
        "generations_correct": per_generation[grader.CORRECT],
        "rejected_generations": {k: per_generation[k] for k in grader.VERDICTS if k != grader.CORRECT},
        "contaminated": contaminated,
        "eval_sets": cfg.eval_sets,
        "workers": workers,
        "workers_replaced": replaced,
        "wall_seconds": round(wall, 3),
        "examples_per_s": round(kept.rows_in / wall, 2),
        "samples_per_s": round(graded / wall, 2),
    }
    stats_file = write_json(sibling_path(cfg.dst, ".stats.json"), stats)
    logger.info(
        "%s (%d of %d generations correct; generations rejected: %s)",
        kept.summary(),
        stats["generations_correct"],
        graded,
        json.dumps(stats["rejected_generations"]),
    )
    return RejectSamplingResult(Path(cfg.dst), sibling_path(cfg.dst, ".verdicts.jsonl"), stats_file, stats)


def build_parser() -> argparse.ArgumentParser:
    return cli.stage_parser("distilled_plugins.reject_sampling", __doc__, RejectSamplingConfig)


def main(argv: list[str] | None = None) -> int:
    cli.start_logging()
    result = run(from_args(RejectSamplingConfig, build_parser().parse_args(argv)))
    logger.info("wrote %s, %s and %s", result.output, result.verdicts, result.stats_file)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
