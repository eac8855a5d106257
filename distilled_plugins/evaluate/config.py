"""The evaluation's settings: the sampling protocol and the stage's config (light: no implementation imported)."""

from __future__ import annotations

from dataclasses import dataclass

from distilled_plugins.core import configs
from distilled_plugins.core.settings import EVALUATION, setting
from distilled_plugins.handle.config import SYSTEM_PROMPT
from distilled_plugins.teacher.settings import EndpointSettings, RequestSettings, RetryPolicy, Sampling

MATH500, TOKENIZER = configs.MATH500, configs.QWEN_TOKENIZER


@dataclass
class Protocol(Sampling):
    """How completions are sampled (open-r1's values); every field is written into the report."""

    system_prompt: str = setting(SYSTEM_PROMPT, help="system message before each problem")
    max_new_tokens: int = setting(
        32768,
        help="longest completion generated per evaluated sample, in tokens",
        minimum=1,
        maximum=131072,
        title="Longest evaluated completion (tokens)",
        section=EVALUATION,
    )
    n_samples: int = setting(
        4,
        help="completions per problem; pass@1 is averaged over them",
        minimum=1,
        maximum=64,
        title="Samples per problem",
        section=EVALUATION,
    )
    seed: int = setting(0, help="sampling seed")


@dataclass
class EvalConfig(EndpointSettings):
    """Settings of one evaluation: where the problems and completions come from, and where the report goes."""

    out: str = setting(
        help="folder for completions, scores and the report",
        required=True,
        flag="--dst",
        aliases=("--out", "--output-dir"),
    )
    dataset: str = setting(str(MATH500), help="problems with problem/answer/subject/level/unique_id")
    limit: int | None = setting(
        None,
        help="evaluate the first N problems only (empty: all)",
        minimum=1,
        title="Problems evaluated",
        section=EVALUATION,
    )
    protocol: Protocol = setting(factory=Protocol, help="the sampling protocol (its own flags)", cli=False)
    # completions from an endpoint (EndpointSettings: api_addr, model, endpoints, max_concurrent) ...
    retry: RetryPolicy = setting(
        None,
        help="a RequestSettings (timeouts, attempts, rate limits, stream, prices), as generate's (its own flags)",
        cli=False,
    )
    # ... or from a checkpoint with mindformers ...
    checkpoint: str | None = setting(None, help="stage 5 checkpoint (file or folder) for mindformers")
    mindformers_config: str | None = setting(None, help="the fine-tune YAML describing the checkpoint's model")
    tokenizer: str = setting(str(TOKENIZER), help="tokenizer folder (checkpoint mode)")
    batch_size: int = setting(64, help="checkpoint mode: sequences decoded together", minimum=1)
    prompt_template: str = setting(
        "{prompt}",
        help="checkpoint mode: the user turn around the problem, as the model was trained (stage 1's template)",
    )
    # ... or re-scored from a file
    rescore: str | None = setting(None, help="JSONL of existing completions to grade")
    problem_column: str = setting("problem", help="rescore: column of the problem text")
    gold_column: str = setting("answer", help="rescore: column of the gold answer")
    completion_column: str = setting("generations", help="rescore: a string or a list of completions")
    # scoring and report
    workers: int | None = setting(None, help="grading processes (default: one per core)", minimum=1)
    baseline: str | None = setting(None, help="report.json of a baseline (e.g. the base model)")
    report_label: str = setting("fine-tuned model", help="the evaluated model's name in the report", flag="--label")
    fresh: bool = setting(
        False,
        help="discard the completions kept for these settings and make them again (completions made with other "
        "settings, e.g. another checkpoint, are kept in their own sub-folder and never mixed in)",
    )

    def __post_init__(self):
        self.protocol = self.protocol or Protocol()
        self.retry = RequestSettings.of(self.retry)
        sources = [bool(self.api_addr or self.endpoints), bool(self.checkpoint), bool(self.rescore)]
        if sum(sources) != 1:
            raise ValueError(
                "give exactly one source of completions: an endpoint (api_addr and model), "
                "a checkpoint (with mindformers_config), or rescore"
            )
        if (self.api_addr or self.endpoints) and not self.model:
            raise ValueError("an endpoint needs the served model's name (--model)")
        if self.checkpoint and not self.mindformers_config:
            raise ValueError("a checkpoint needs the fine-tune YAML that describes its model (--mindformers-config)")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.protocol.n_samples < 1:
            raise ValueError(f"n_samples must be at least 1, got {self.protocol.n_samples}")
