"""Stage 2: keep the generations whose final answer math_verify (or an LLM judge) accepts against the gold answer.

Usage:
    python -m distilled_plugins.reject_sampling --src generations.jsonl --dst filtered.jsonl
    # with a judge for what math_verify rejects (OpenR1-Math-220k's recipe), and a difficulty band:
    OPENAI_API_KEY=... python -m distilled_plugins.reject_sampling --src generations.jsonl --dst filtered.jsonl \
        --judge-api-addr localhost:8000 --judge-model meta-llama/Llama-3.3-70B-Instruct \
        --min-pass-rate 0.25 --max-pass-rate 0.75

Writes ``--dst`` (the tutorial's schema: kept examples with only their correct ``generations``,
``finish_reasons`` and ``api_metadata``, still aligned, and ``messages`` = user prompt + last correct
generation; plus OpenR1-Math-220k's ``correctness_math_verify``, ``correctness_judge`` and
``is_reasoning_complete``, aligned with ``generations``, and ``correctness_count`` and ``pass_rate`` per row),
``<dst stem>.verdicts.jsonl`` (one verdict per generation, with the judge's where it was asked, for audit) and
``<dst stem>.stats.json``. Examples whose problem shares a word 8-gram with an evaluation problem (MATH-500 by
default) are dropped. Output rows keep input order, and a rerun writes byte-identical files (written to a
temporary name, renamed).

The judge (``--judge-api-addr``: the teacher client's forms, retries, rate limits and fleet; its request flags are
the teacher's with ``--judge-`` in front) is asked only about generations math_verify graded ``wrong`` or
``no_answer`` (never truncated ones, timeouts or filtered golds), plus ``--judge-audit-sample`` accepted ones.
``--judge-policy recover`` keeps a generation math_verify or the judge accepts; ``audit`` asks and records but
keeps by math_verify alone. Its verdicts are cached (``distilled_plugins.reject_sampling.judge``): a rerun asks only new questions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path

from distilled_plugins.core import cli, configs, grader
from distilled_plugins.core.errors import DataError, MissingColumn
from distilled_plugins.core.io import atomic_path, count_rows, dumps_line, iter_jsonl, write_json
from distilled_plugins.core.progress import Progress
from distilled_plugins.core.schema import (
    CORRECTNESS_COUNT_COLUMN,
    GENERATION_COLUMNS,
    JUDGED_COLUMNS,
    MESSAGES_COLUMN,
    PASS_RATE_COLUMN,
    PROMPT_COLUMN,
    VERDICTS_SUFFIX,
    row_key,
    sibling_path,
    stats_path,
)
from distilled_plugins.core.settings import DATA, PROCESSING, add_arguments, from_args, setting
from distilled_plugins.core.stats import Stats
from distilled_plugins.decontaminate import Decontaminator
from distilled_plugins.reject_sampling import judge
from distilled_plugins.teacher.endpoints import Endpoint
from distilled_plugins.teacher.settings import API_KEY_ENV, RequestSettings

logger = logging.getLogger(__name__)

DEFAULT_EVAL_SETS = [str(configs.MATH500)]
JUDGE_POLICIES = ("recover", "audit")
JUDGE_PREFIX = "judge_"  # the judge's request flags: the teacher's RequestSettings as --judge-max-rpm, ...
# what math_verify rejected that the judge is asked about (truncated, timeout, gold_unparseable, error never are)
ASKED_VERDICTS = (grader.WRONG, grader.NO_ANSWER)
# examples held waiting (in input order) while judge questions are in flight, before reading stops for answers
MAX_WAITING_EXAMPLES = 2_000


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
    # the judge, for what math_verify rejects (none unless an address or endpoints are given)
    judge_api_addr: str | None = setting(
        None,
        help="the judge's OpenAI-compatible endpoint(s): host:port or http(s):// URL, several separated by commas "
        "(as the teacher's --api-addr); empty: no judge",
    )
    judge_model: str = setting(
        "meta-llama/Llama-3.3-70B-Instruct",
        help="model name sent to the judge endpoint",
        title="Judge model",
        section=PROCESSING,
    )
    judge_api_key: str | None = setting(
        None, help="the judge's API key (CLI: from --judge-api-key-env)", cli=False, repr=False
    )
    judge_endpoints: list[Endpoint] | None = setting(
        None, help="instead of judge_api_addr: endpoints with their own keys, weights and limits", cli=False
    )
    judge_requests: RequestSettings = setting(
        help="the judge's retries, timeouts, rate limits and prices (CLI: the teacher's request flags with --judge- "
        "in front: --judge-max-attempts, --judge-max-rpm, ...)",
        factory=RequestSettings,
        cli=False,
    )
    judge_policy: str = setting(
        "recover",
        help="recover: keep a generation math_verify or the judge accepts; audit: ask the judge and record its "
        "verdicts, keep by math_verify alone",
        choices=JUDGE_POLICIES,
        title="Judge policy",
        section=PROCESSING,
    )
    judge_audit_sample: int = setting(
        0,
        help="also ask the judge about this many generations math_verify accepted (the first correct one of the "
        "first examples in input order), to measure how often the two agree",
        minimum=0,
        title="Judge audit sample",
        section=PROCESSING,
    )
    judge_max_concurrent: int = setting(32, help="judge requests in flight at once", minimum=1)
    judge_max_tokens: int = setting(1024, help="longest judge reply, in tokens", minimum=16)
    judge_cache_dir: str | None = setting(
        None,
        help=f"folder of the judge's verdict cache ({judge.CACHE_FILE}), shared across runs (default: --dst's folder)",
    )
    # difficulty: the share of a problem's generations that are correct
    min_pass_rate: float = setting(
        0.0,
        help="drop problems whose pass rate (correct / all generations) is below this, as too_hard (0: off)",
        minimum=0,
        maximum=1,
        title="Lowest pass rate kept",
        section=PROCESSING,
    )
    max_pass_rate: float = setting(
        1.0,
        help="drop problems whose pass rate (correct / all generations) is above this, as too_easy (1: off)",
        minimum=0,
        maximum=1,
        title="Highest pass rate kept",
        section=PROCESSING,
    )

    def __post_init__(self):
        self.uuid_column = self.uuid_column or self.problem_column
        self.judge_api_addr = (self.judge_api_addr or "").strip() or None
        self.judge_requests = RequestSettings.of(self.judge_requests)
        if self.judge_policy not in JUDGE_POLICIES:
            raise ValueError(f"Invalid judge_policy {self.judge_policy!r}, must be one of {JUDGE_POLICIES}")
        if not 0 <= self.min_pass_rate <= self.max_pass_rate <= 1:
            raise ValueError(
                f"pass-rate bounds must satisfy 0 <= min_pass_rate <= max_pass_rate <= 1, got "
                f"{self.min_pass_rate:g} and {self.max_pass_rate:g}"
            )
        if self.judge_audit_sample < 0:
            raise ValueError(f"judge_audit_sample must not be negative, got {self.judge_audit_sample}")
        if self.judge_audit_sample and not self.has_judge:
            raise ValueError(
                f"judge_audit_sample {self.judge_audit_sample} needs a judge: give --judge-api-addr (Airflow: the "
                "judge connection), or set the audit sample to 0"
            )
        if self.has_judge and not (self.judge_model or "").strip():
            raise ValueError("a judge needs its model name (--judge-model)")
        if [str(s).lower() for s in self.eval_sets] == ["none"]:
            self.eval_sets = []
        for path in self.eval_sets:
            if not Path(path).exists():
                raise DataError(f"evaluation set {path} not found (give --eval-sets, or --eval-sets none to skip)")

    @property
    def has_judge(self) -> bool:
        return bool(self.judge_api_addr or self.judge_endpoints)


# why an example is left out (an example is kept when one of its generations is correct)
# (too_hard / too_easy: outside --min-pass-rate / --max-pass-rate)
DROP_REASONS = (
    "gold_filtered",
    "contaminated",
    "gold_unparseable",
    "no_generations",
    "no_correct_generation",
    "too_hard",
    "too_easy",
)


@dataclass
class RejectSamplingResult:
    output: Path
    verdicts: Path
    stats_file: Path
    stats: dict


class _Example:
    __slots__ = ("audit_checked", "dropped", "judged", "key", "remaining", "row", "verdicts")

    def __init__(self, row: dict, key: str, n: int, dropped: str | None = None):
        self.row, self.key, self.dropped = row, key, dropped
        self.verdicts: list[grader.Verdict | None] = [None] * n
        self.judged: list[judge.JudgeVerdict | None] = [None] * n  # the judge's, where it was asked
        self.remaining = 0 if dropped else n  # verdicts still to come: math_verify's, then the judge's
        self.audit_checked = False


def _check_row(row: dict, cfg: RejectSamplingConfig, where: str) -> None:
    for column in (cfg.answer_column, "generations", cfg.problem_column):
        if column not in row:
            raise MissingColumn(f"{where}: missing field {column!r}; fields present: {', '.join(row)}")
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


def _reasoning_complete(generation: str, finish_reason: str | None) -> bool:
    """Whether the generation's reasoning ended: not cut at max_tokens, and a ``<think>`` it opens is closed."""
    return finish_reason != "length" and ("<think>" not in generation or "</think>" in generation)


def _judge_says(verdict: judge.JudgeVerdict | None) -> bool | None:
    """``correctness_judge``: yes is True, no and an unparseable reply False, not asked (or failed) None."""
    if verdict is None or verdict.verdict == judge.ERROR:
        return None
    return verdict.verdict == judge.YES


def _accepted(example: _Example, recover: bool) -> list[int]:
    """The generations kept: math_verify's correct ones, and with ``recover`` those the judge accepted."""
    return [
        i
        for i, (v, j) in enumerate(zip(example.verdicts, example.judged, strict=True))
        if v.verdict == grader.CORRECT or (recover and j is not None and j.verdict == judge.YES)
    ]


def _kept_row(example: _Example, problem_column: str, correct: list[int]) -> dict:
    row = dict(example.row)
    generations = example.row["generations"]
    reasons = example.row.get("finish_reasons") or [None] * len(generations)
    for column in GENERATION_COLUMNS:
        if column in row:
            row[column] = [row[column][i] for i in correct]
    mv_column, judge_column, complete_column = JUDGED_COLUMNS
    row[mv_column] = [example.verdicts[i].verdict == grader.CORRECT for i in correct]
    row[judge_column] = [_judge_says(example.judged[i]) for i in correct]
    row[complete_column] = [_reasoning_complete(generations[i], reasons[i]) for i in correct]
    row[CORRECTNESS_COUNT_COLUMN] = len(correct)
    row[PASS_RATE_COLUMN] = round(len(correct) / len(generations), 6)
    prompt = row.get(PROMPT_COLUMN) or row[problem_column]
    row[MESSAGES_COLUMN] = [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": generations[correct[-1]]},
    ]
    return row


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
    examples: OrderedDict[int, _Example] = OrderedDict()
    per_generation = Counter()
    judged = Counter()  # the judge's outcomes, counted as examples are written (cached ones too)
    agreement = Counter()  # (math_verify's side, the judge's side) of each generation the judge answered
    kept = Stats("examples", reasons=DROP_REASONS)
    contaminated: list[dict] = []
    progress = Progress(logger, "examples", total, cfg.progress_interval)
    recover = cfg.judge_policy == "recover"
    audit_left = cfg.judge_audit_sample

    def progress_extra() -> str:
        extra = f"| {kept.rows_out} kept"
        if asker is not None:
            extra += f", judge: {asker.asked} asked, {asker.from_cache} from its cache, {asker.in_flight} waiting"
        return extra

    def ask(index: int, example: _Example, i: int) -> None:
        """Ask the judge about generation ``i``: answered now from the cache, or later through ``drain``."""
        example.remaining += 1
        row = example.row
        verdict = asker.ask((index, i), row[cfg.problem_column], row[cfg.answer_column], row["generations"][i])
        if verdict is not None:
            settle(example, i, verdict)

    def settle(example: _Example, i: int, verdict: judge.JudgeVerdict) -> None:
        example.judged[i] = verdict
        example.remaining -= 1

    def samples():
        """Read examples lazily, registering each in input order before its samples go to the pool."""
        for index, (lineno, row) in enumerate(iter_jsonl(src)):
            # flat memory: while the judge answers, read no further than MAX_WAITING_EXAMPLES examples ahead
            while asker is not None and asker.in_flight and len(examples) >= MAX_WAITING_EXAMPLES:
                drain(block=True)
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
        atomic_path(sibling_path(cfg.dst, VERDICTS_SUFFIX)) as verdicts_tmp,
        open(dst_tmp, "wb") as out,
        open(verdicts_tmp, "wb") as audit,
        # opened in the with: its cache and client thread close whatever fails after (None without a judge)
        _open_judge(cfg) or contextlib.nullcontext() as asker,
    ):

        def audited(index: int, example: _Example) -> bool:
            """Send the example's first math_verify-correct generation to the judge while the audit sample lasts;
            True when its verdict is still to come."""
            nonlocal audit_left
            example.audit_checked = True
            first = next((i for i, v in enumerate(example.verdicts) if v.verdict == grader.CORRECT), None)
            if first is None or not audit_left:
                return False
            audit_left -= 1
            ask(index, example, first)
            return example.remaining > 0

        def count_judged(example: _Example) -> None:
            for i, j in enumerate(example.judged):
                if j is None:
                    continue
                math_verify_says = example.verdicts[i].verdict == grader.CORRECT
                judged[j.verdict] += 1
                judged["audited"] += math_verify_says
                if not math_verify_says and j.verdict == judge.YES:
                    judged["recovered"] += 1
                elif not math_verify_says and j.verdict == judge.NO:
                    judged["confirmed_wrong"] += 1
                if j.verdict != judge.ERROR:
                    side = "math_verify_correct" if math_verify_says else "math_verify_rejected"
                    agreement[side, "judge_yes" if j.verdict == judge.YES else "judge_no"] += 1

        def flush() -> None:
            """Write finished examples at the head of the input order."""
            while examples:
                index, example = next(iter(examples.items()))
                if example.remaining:
                    return
                wants_audit = asker is not None and audit_left and not example.dropped and not example.audit_checked
                if wants_audit and audited(index, example):
                    return
                examples.popitem(last=False)
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
                    line = {"key": example.key, "index": i, "verdict": v.verdict, "reason": v.reason}
                    if example.judged[i] is not None:
                        line.update(judge=example.judged[i].verdict, judge_reply=example.judged[i].reply)
                    audit.write(dumps_line(line))
                count_judged(example)
                correct = _accepted(example, recover)
                n = len(example.verdicts)
                if not correct:
                    unparseable = all(v.verdict == grader.GOLD_UNPARSEABLE for v in example.verdicts)
                    kept.drop("gold_unparseable" if unparseable else "no_correct_generation")
                elif len(correct) < cfg.min_pass_rate * n:
                    kept.drop("too_hard")
                elif len(correct) > cfg.max_pass_rate * n:
                    kept.drop("too_easy")
                else:
                    out.write(dumps_line(_kept_row(example, cfg.problem_column, correct)))
                    kept.keep()
                    judged["generations_added"] += sum(example.verdicts[i].verdict != grader.CORRECT for i in correct)
                    judged["rows_added"] += all(example.verdicts[i].verdict != grader.CORRECT for i in correct)
            progress.maybe_log(kept.rows_in, progress_extra())

        def drain(block: bool) -> None:
            """Take the judge's verdicts that came back (``block``: wait for one) and write what they finish."""
            for (index, i), verdict in asker.answers(block):
                settle(examples[index], i, verdict)
            flush()

        with grader.GradingPool(cfg.workers, cfg.parse_timeout, cfg.verify_timeout, cfg.sample_timeout) as pool:
            logger.info(
                "grading %d examples of %s with %d worker processes%s",
                total,
                src,
                pool.size,
                f"; judge {cfg.judge_model} at {asker.client.url} ({cfg.judge_policy})" if asker else "",
            )
            for verdict in pool.grade(samples()):
                index, i = verdict.id
                example = examples[index]
                example.verdicts[i] = verdict
                if asker is not None and verdict.verdict in ASKED_VERDICTS:
                    ask(index, example, i)
                example.remaining -= 1
                if asker is not None and asker.in_flight:
                    drain(block=False)
                flush()
            flush()  # examples dropped at the end of the input
            workers, replaced = pool.size, pool.replaced
        while asker is not None and asker.in_flight:
            drain(block=True)
        if examples:
            raise AssertionError(f"{len(examples)} examples were never written (a bug in rejection sampling)")
    wall = time.monotonic() - started
    progress.finish(kept.rows_in, progress_extra())
    graded = sum(per_generation.values())
    stats = {
        **kept.as_dict(),  # rows are examples; dropped: the examples left out, by reason
        "src": str(src),
        "dst": str(cfg.dst),
        "generations_graded": graded,
        "generations_correct": per_generation[grader.CORRECT],
        "rejected_generations": {k: per_generation[k] for k in grader.VERDICTS if k != grader.CORRECT},
        "pass_rate_bounds": {"min": cfg.min_pass_rate, "max": cfg.max_pass_rate},
        "judge": _judge_stats(cfg, asker, judged, agreement) if asker is not None else None,
        "contaminated": contaminated,
        "eval_sets": cfg.eval_sets,
        "workers": workers,
        "workers_replaced": replaced,
        "wall_seconds": round(wall, 3),
        "examples_per_s": round(kept.rows_in / wall, 2),
        "samples_per_s": round(graded / wall, 2),
    }
    stats_file = write_json(stats_path(cfg.dst), stats)
    logger.info("wrote %s, %s and %s", cfg.dst, sibling_path(cfg.dst, VERDICTS_SUFFIX), stats_file)
    line = (  # the stage's last line: what survived, and what the judge recovered
        f"{kept.summary()} ({stats['generations_correct']} of {graded} generations correct; generations rejected: "
        f"{json.dumps(stats['rejected_generations'])})"
    )
    if asker is not None:
        j = stats["judge"]
        line += (
            f"; the judge recovered {j['recovered']} generations math_verify rejected ({j['generations_added']} "
            f"kept, adding {j['rows_added']} examples), confirmed {j['confirmed_wrong']} wrong, {j['unparseable']} "
            f"unparseable, {j['errors']} errors; {j['requests']} asked, {j['from_cache']} from its cache"
        )
    logger.info("%s", line)
    return RejectSamplingResult(Path(cfg.dst), sibling_path(cfg.dst, VERDICTS_SUFFIX), stats_file, stats)


def _judge_stats(cfg: RejectSamplingConfig, asker: judge.Judge, judged: Counter, agreement: Counter) -> dict:
    """The judge's part of the stats: what it was asked, what it said, what it cost, and its agreement with
    math_verify (rows: math_verify's verdict; columns: the judge's, an unparseable reply counted as no)."""
    sides = ("math_verify_correct", "math_verify_rejected")
    return {
        "model": cfg.judge_model,
        "prompt_version": judge.JUDGE_PROMPT_VERSION,
        "policy": cfg.judge_policy,
        "requests": asker.asked,  # questions sent (each may take several attempts: requests_sent)
        "from_cache": asker.from_cache,
        "audited": judged["audited"],  # generations math_verify accepted that the judge was asked about
        "yes": judged[judge.YES],
        "no": judged[judge.NO],
        "recovered": judged["recovered"],
        "confirmed_wrong": judged["confirmed_wrong"],
        "unparseable": judged[judge.UNPARSEABLE],
        "errors": judged[judge.ERROR],
        "generations_added": judged["generations_added"],
        "rows_added": judged["rows_added"],
        "agreement": {side: {s: agreement[side, s] for s in ("judge_yes", "judge_no")} for side in sides},
        **asker.stats(),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = cli.stage_parser("distilled_plugins.reject_sampling", __doc__, RejectSamplingConfig)
    parser.add_argument(
        "--judge-api-key-env", default=API_KEY_ENV, help="environment variable holding the judge's API key"
    )
    # the teacher's request settings, once more for the judge: --judge-max-attempts, --judge-max-rpm, ...
    add_arguments(parser.add_argument_group("judge requests"), RequestSettings, prefix=JUDGE_PREFIX)
    return parser


def main(argv: list[str] | None = None) -> int:
    cli.start_logging()
    args = build_parser().parse_args(argv)
    cfg = from_args(
        RejectSamplingConfig,
        args,
        judge_api_key=os.environ.get(args.judge_api_key_env),
        judge_requests=from_args(RequestSettings, args, prefix=JUDGE_PREFIX),
    )
    run(cfg)
    return 0
