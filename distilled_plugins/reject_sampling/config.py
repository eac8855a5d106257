"""Rejection sampling's settings (:class:`RejectSamplingConfig`), why an example is dropped, and what a run returns.

Light on purpose: the Airflow operator and the DAG import it at parse time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from distilled_plugins.core import configs
from distilled_plugins.core.errors import DataError
from distilled_plugins.core.settings import DATA, PROCESSING, setting
from distilled_plugins.teacher.endpoints import Endpoint
from distilled_plugins.teacher.settings import RequestSettings

DEFAULT_EVAL_SETS = [str(configs.MATH500)]
JUDGE_POLICIES = ("recover", "audit")
JUDGE_PREFIX = "judge_"  # the judge's request flags: the teacher's RequestSettings as --judge-max-rpm, ...
CACHE_FILE = "judge_verdicts.sqlite"  # the judge's verdict cache, in judge_cache_dir

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
        help=f"folder of the judge's verdict cache ({CACHE_FILE}), shared across runs (default: --dst's folder)",
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


@dataclass
class RejectSamplingResult:
    """What a run wrote: the kept examples, the verdict per generation, the stats file, and the stats."""

    output: Path
    verdicts: Path
    stats_file: Path
    stats: dict
