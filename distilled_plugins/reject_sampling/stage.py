"""Rejection sampling's run: read and check the input, grade every generation with math_verify in worker
processes, ask the judge (if any) about what it rejects, and write the kept examples and the verdicts in input
order, then the stats."""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from distilled_plugins.core import grader
from distilled_plugins.core.errors import DataError
from distilled_plugins.core.io import atomic_path, count_rows, dumps_line, iter_jsonl, write_json
from distilled_plugins.core.progress import Progress
from distilled_plugins.core.schema import VERDICTS_SUFFIX, row_key, sibling_path, stats_path
from distilled_plugins.decontaminate import Decontaminator
from distilled_plugins.reject_sampling import judge
from distilled_plugins.reject_sampling.config import RejectSamplingConfig, RejectSamplingResult
from distilled_plugins.reject_sampling.examples import Example, check_row, kept_row
from distilled_plugins.reject_sampling.tally import Tally

# the stage's log lines, under the package's name (what its callers and tests filter on)
logger = logging.getLogger(__package__)  # the stage's name, from any of its modules

# what math_verify rejected that the judge is asked about (truncated, timeout, gold_unparseable, error never are)
ASKED_VERDICTS = (grader.WRONG, grader.NO_ANSWER)
# examples held waiting (in input order) while judge questions are in flight, before reading stops for answers
MAX_WAITING_EXAMPLES = 2_000


def run(cfg: RejectSamplingConfig) -> RejectSamplingResult:
    """Grade every generation of ``cfg.src`` (asking the judge, if any) and write the kept examples, verdicts and
    stats."""
    src = Path(cfg.src)
    if not src.is_file():
        raise DataError(f"{src}: no such file")
    started = time.monotonic()
    decontaminator = Decontaminator(cfg.eval_sets, "problem") if cfg.eval_sets else None
    total = count_rows([src])
    if total == 0:
        raise DataError(f"{src}: no examples (the file is empty)")
    verdicts_file = sibling_path(cfg.dst, VERDICTS_SUFFIX)
    with (
        atomic_path(cfg.dst) as dst_tmp,
        atomic_path(verdicts_file) as verdicts_tmp,
        open(dst_tmp, "wb") as out,
        open(verdicts_tmp, "wb") as verdicts_out,
        # opened in the with: its cache and client thread close whatever fails after (None without a judge)
        _open_judge(cfg) or contextlib.nullcontext() as asker,
    ):
        grading = _Grading(cfg, total, decontaminator, asker, out, verdicts_out)
        workers, replaced = grading.grade()
    wall = time.monotonic() - started
    tally = grading.tally
    grading.progress.finish(tally.kept.rows_in, grading.progress_extra())
    stats = tally.stats(cfg, asker, workers, replaced, wall)
    stats_file = write_json(stats_path(cfg.dst), stats)
    logger.info("wrote %s, %s and %s", cfg.dst, verdicts_file, stats_file)
    logger.info("%s", tally.last_line(stats))
    return RejectSamplingResult(Path(cfg.dst), verdicts_file, stats_file, stats)


def _open_judge(cfg: RejectSamplingConfig) -> judge.Judge | None:
    if not cfg.has_judge:
        return None
    return judge.Judge(
        cfg.judge_api_addr,
        cfg.judge_model,
        cfg.judge_api_key,
        cfg.judge_endpoints,
        cfg.judge_requests,
        cfg.judge_cache_dir or Path(cfg.dst).resolve().parent,
        cfg.judge_max_concurrent,
        cfg.judge_max_tokens,
    )


class _Grading:
    """One pass over the input: examples are read lazily, their generations graded in the worker pool, the judge
    asked (answered from its cache at once, or later through ``drain``), and each example written, in input order,
    once all its verdicts are in."""

    def __init__(
        self,
        cfg: RejectSamplingConfig,
        total: int,
        decontaminator: Decontaminator | None,
        asker: judge.Judge | None,
        out: BinaryIO,
        verdicts_out: BinaryIO,
    ):
        self.cfg, self.src, self.decontaminator, self.asker = cfg, Path(cfg.src), decontaminator, asker
        self.out, self.verdicts_out = out, verdicts_out
        self.examples: OrderedDict[int, Example] = OrderedDict()  # read and not written yet, by input index
        self.tally = Tally()
        self.progress = Progress(logger, "examples", total, cfg.progress_interval)
        self.recover = cfg.judge_policy == "recover"
        self.audit_left = cfg.judge_audit_sample

    def grade(self) -> tuple[int, int]:
        """Grade and write every example; return the pool's size and how many of its workers were replaced."""
        cfg, asker = self.cfg, self.asker
        with grader.GradingPool(cfg.workers, cfg.parse_timeout, cfg.verify_timeout, cfg.sample_timeout) as pool:
            logger.info(
                "grading %d examples of %s with %d worker processes%s",
                self.progress.total,
                self.src,
                pool.size,
                f"; judge {cfg.judge_model} at {asker.client.url} ({cfg.judge_policy})" if asker else "",
            )
            for verdict in pool.grade(self.samples()):
                index, i = verdict.id
                example = self.examples[index]
                example.verdicts[i] = verdict
                if asker is not None and verdict.verdict in ASKED_VERDICTS:
                    self.ask(index, example, i)
                example.remaining -= 1
                if asker is not None and asker.in_flight:
                    self.drain(block=False)
                self.flush()
            self.flush()  # examples dropped at the end of the input
            workers, replaced = pool.size, pool.replaced
        while asker is not None and asker.in_flight:
            self.drain(block=True)
        if self.examples:
            raise AssertionError(f"{len(self.examples)} examples were never written (a bug in rejection sampling)")
        return workers, replaced

    def samples(self) -> Iterator[grader.Sample]:
        """Read examples lazily, registering each in input order before its samples go to the pool."""
        for index, (lineno, row) in enumerate(iter_jsonl(self.src)):
            # flat memory: while the judge answers, read no further than MAX_WAITING_EXAMPLES examples ahead
            while self.asker is not None and self.asker.in_flight and len(self.examples) >= MAX_WAITING_EXAMPLES:
                self.drain(block=True)
            example = self.examples[index] = self.read(row, f"{self.src}:{lineno}")
            if example.dropped:
                continue
            reasons = row.get("finish_reasons") or [None] * len(row["generations"])
            gold = str(row[self.cfg.answer_column])
            for i, completion in enumerate(row["generations"]):
                yield grader.Sample((index, i), gold, completion, reasons[i])

    def read(self, row: dict, where: str) -> Example:
        """The example of an input row, dropped already where its gold is filtered, its problem is contaminated or
        it has no generations."""
        cfg = self.cfg
        check_row(row, cfg, where)
        key = row_key(row[cfg.uuid_column])
        dropped = None
        if grader.gold_is_filtered(row[cfg.answer_column]):
            dropped = "gold_filtered"
        elif self.decontaminator and (gram := self.decontaminator.match(row[cfg.problem_column])):
            dropped = "contaminated"
            self.tally.contaminated.append({"key": key, "problem": str(row[cfg.problem_column])[:200], "ngram": gram})
        elif not row["generations"]:
            dropped = "no_generations"
        return Example(row, key, len(row["generations"]), dropped)

    def ask(self, index: int, example: Example, i: int) -> None:
        """Ask the judge about generation ``i``: answered now from the cache, or later through ``drain``."""
        example.remaining += 1
        row = example.row
        verdict = self.asker.ask(
            (index, i), row[self.cfg.problem_column], row[self.cfg.answer_column], row["generations"][i]
        )
        if verdict is not None:
            self.settle(example, i, verdict)

    @staticmethod
    def settle(example: Example, i: int, verdict: judge.JudgeVerdict) -> None:
        example.judged[i] = verdict
        example.remaining -= 1

    def drain(self, block: bool) -> None:
        """Take the judge's verdicts that came back (``block``: wait for one) and write what they finish."""
        for (index, i), verdict in self.asker.answers(block):
            self.settle(self.examples[index], i, verdict)
        self.flush()

    def audited(self, index: int, example: Example) -> bool:
        """Send the example's first math_verify-correct generation to the judge while the audit sample lasts;
        True when its verdict is still to come."""
        example.audit_checked = True
        first = example.first_correct()
        if first is None or not self.audit_left:
            return False
        self.audit_left -= 1
        self.ask(index, example, first)
        return example.remaining > 0

    def flush(self) -> None:
        """Write finished examples at the head of the input order, and a progress line when one is due (also while
        the head example still waits for its verdicts: a slow judge must not silence the log)."""
        self._write_finished()
        self.progress.maybe_log(self.tally.kept.rows_in, self.progress_extra())

    def _write_finished(self) -> None:
        while self.examples:
            index, example = next(iter(self.examples.items()))
            if example.remaining:
                return
            wants_audit = self.asker is not None and self.audit_left and not (example.dropped or example.audit_checked)
            if wants_audit and self.audited(index, example):
                return
            self.examples.popitem(last=False)
            self.write(example)

    def write(self, example: Example) -> None:
        """Write a finished example's verdicts, and the example if it is kept; count it."""
        for line in example.verdict_lines():
            self.verdicts_out.write(dumps_line(line))
        kept = self.tally.kept
        kept.read()
        if example.dropped:
            kept.drop(example.dropped)
            return
        self.tally.count_graded(example)
        correct = example.accepted(self.recover)
        reason = example.drop_reason(correct, self.cfg)
        if reason:
            kept.drop(reason)
        else:
            self.out.write(dumps_line(kept_row(example, self.cfg.problem_column, correct)))
            self.tally.count_kept(example, correct)

    def progress_extra(self) -> str:
        extra = f"| {self.tally.kept.rows_out} kept"
        if self.asker is not None:
            asker = self.asker
            extra += f", judge: {asker.asked} asked, {asker.from_cache} from its cache, {asker.in_flight} waiting"
        return extra
