"""What rejection sampling decided, counted as examples are written: the stats file's figures (the judge's too:
what it was asked, what it said, what it cost, how often it agreed with math_verify) and the stage's last line."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from distilled_plugins.core import grader
from distilled_plugins.core.stats import Stats
from distilled_plugins.reject_sampling import judge
from distilled_plugins.reject_sampling.config import DROP_REASONS, RejectSamplingConfig
from distilled_plugins.reject_sampling.examples import Example

# rows of the agreement table: math_verify's verdict; columns: the judge's (an unparseable reply counted as no)
SIDES = ("math_verify_correct", "math_verify_rejected")
JUDGE_SIDES = ("judge_yes", "judge_no")


class Tally:
    """The counts of one run: examples kept and dropped (by reason), verdicts per generation, the judge's outcomes
    (cached ones too) and its agreement with math_verify, and the contaminated examples."""

    def __init__(self):
        self.kept = Stats("examples", reasons=DROP_REASONS)
        self.per_generation = Counter()  # math_verify's verdicts
        self.judged = Counter()  # the judge's outcomes
        self.agreement = Counter()  # (math_verify's side, the judge's side) of each generation the judge answered
        self.contaminated: list[dict] = []

    def count_graded(self, example: Example) -> None:
        """Count the verdicts of a graded example: math_verify's, and the judge's where it answered."""
        for v in example.verdicts:
            self.per_generation[v.verdict] += 1
        for i, j in enumerate(example.judged):
            if j is None:
                continue
            math_verify_says = example.verdicts[i].verdict == grader.CORRECT
            self.judged[j.verdict] += 1
            self.judged["audited"] += math_verify_says
            if not math_verify_says and j.verdict == judge.YES:
                self.judged["recovered"] += 1
            elif not math_verify_says and j.verdict == judge.NO:
                self.judged["confirmed_wrong"] += 1
            if j.verdict != judge.ERROR:
                side = SIDES[0] if math_verify_says else SIDES[1]
                self.agreement[side, JUDGE_SIDES[0] if j.verdict == judge.YES else JUDGE_SIDES[1]] += 1

    def count_kept(self, example: Example, correct: list[int]) -> None:
        """Count a kept example, and what the judge added to it (generations math_verify rejected)."""
        self.kept.keep()
        added = [example.verdicts[i].verdict != grader.CORRECT for i in correct]
        self.judged["generations_added"] += sum(added)
        self.judged["rows_added"] += all(added)

    def stats(
        self, cfg: RejectSamplingConfig, asker: judge.Judge | None, workers: int, replaced: int, wall: float
    ) -> dict:
        """The stats file's content."""
        graded = sum(self.per_generation.values())
        return {
            **self.kept.as_dict(),  # rows are examples; dropped: the examples left out, by reason
            "src": str(Path(cfg.src)),
            "dst": str(cfg.dst),
            "generations_graded": graded,
            "generations_correct": self.per_generation[grader.CORRECT],
            "rejected_generations": {k: self.per_generation[k] for k in grader.VERDICTS if k != grader.CORRECT},
            "pass_rate_bounds": {"min": cfg.min_pass_rate, "max": cfg.max_pass_rate},
            "judge": self.judge_stats(cfg, asker) if asker is not None else None,
            "contaminated": self.contaminated,
            "eval_sets": cfg.eval_sets,
            "workers": workers,
            "workers_replaced": replaced,
            "wall_seconds": round(wall, 3),
            "examples_per_s": round(self.kept.rows_in / wall, 2),
            "samples_per_s": round(graded / wall, 2),
        }

    def judge_stats(self, cfg: RejectSamplingConfig, asker: judge.Judge) -> dict:
        """The judge's part of the stats."""
        judged = self.judged
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
            "agreement": {side: {s: self.agreement[side, s] for s in JUDGE_SIDES} for side in SIDES},
            **asker.stats(),
        }

    def last_line(self, stats: dict) -> str:
        """The stage's last log line: what survived, and (with a judge) what the judge recovered."""
        line = (
            f"{self.kept.summary()} ({stats['generations_correct']} of {stats['generations_graded']} generations "
            f"correct; generations rejected: {json.dumps(stats['rejected_generations'])})"
        )
        if stats["judge"] is not None:
            j = stats["judge"]
            line += (
                f"; the judge recovered {j['recovered']} generations math_verify rejected ({j['generations_added']} "
                f"kept, adding {j['rows_added']} examples), confirmed {j['confirmed_wrong']} wrong, "
                f"{j['unparseable']} unparseable, {j['errors']} errors; {j['requests']} asked, {j['from_cache']} "
                "from its cache"
            )
        return line
