"""The generate stage's settings (:class:`GenerateConfig`), its result, and what identifies a row and its prompt.

Light on purpose: the DAG file and the operators import it at parse time (no HTTP client, no store, no numpy).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from distilled_plugins.core.errors import DataError
from distilled_plugins.core.schema import PROMPT_COLUMN
from distilled_plugins.core.settings import DATA, TEACHER, redefault, setting
from distilled_plugins.teacher.batch_api import BatchSettings
from distilled_plugins.teacher.settings import EndpointSettings, RequestSettings, RetryPolicy, Sampling

DEFAULT_PROMPT_TEMPLATE = (
    "You will be given a problem. Please reason step by step, and put your final answer within \\boxed{{}}:\n{prompt}"
)


REUSED_MODES = ("reference", "copy")
# why a seed row of the shard is not in its output: a repeated uuid, requests that failed for good, or a run that
# stopped early (budget, fatal error: what was received waits in .parts); and why merge leaves a row out
SHARD_DROP_REASONS = ("duplicate_uuid", "failed", "unfinished")
MERGE_DROP_REASONS = ("duplicate_key",)


@dataclass
class GenerateConfig(EndpointSettings, Sampling):
    """Settings of one generation run (one shard of the seed)."""

    dataset_name: str = setting(
        help="hub dataset owner/name[@revision] (loaded at that commit), or a local jsonl/json/parquet/arrow file or "
        "folder",
        required=True,
    )
    output_file: str = setting(
        help="JSONL output; resumed if it exists", required=True, flag="--dst", aliases=("--output-file",)
    )
    # the endpoint and sampling fields are the shared groups' (EndpointSettings, Sampling); the teacher's defaults
    model: str = redefault(EndpointSettings, "model", required=True)
    api_addr: str = redefault(EndpointSettings, "api_addr", "localhost:39876")
    max_concurrent: int = redefault(
        EndpointSettings, "max_concurrent", 100, maximum=10000, title="Requests in flight", section=TEACHER
    )
    prompt_column: str = setting(
        "problem",
        help="column holding the problem text (a string or chat messages)",
        title="Problem column",
        section=DATA,
    )
    uuid_column: str | None = setting(
        None,
        help="column identifying a row: generations are stored and reused by it (default: the prompt column)",
        title="Problem id column",
        section=DATA,
    )
    num_generations: int = setting(
        4, help="completions per problem", minimum=1, maximum=64, title="Completions per problem", section=TEACHER
    )
    max_tokens: int = setting(
        16384,
        help="longest completion, in tokens",
        minimum=1,
        maximum=131072,
        title="Longest completion (tokens)",
        section=TEACHER,
    )
    prompt_template: str = setting(DEFAULT_PROMPT_TEMPLATE, help="user turn; {prompt} is the problem")
    system_prompt: str | None = setting(None, help="system message sent before the prompt (evaluation uses one)")
    seed: int | None = setting(None, help="sampling seed sent with each request, where the endpoint supports it")
    split: str = setting("train", help="split of a hub or save_to_disk dataset")
    shard_index: int = setting(0, help="this run's shard of the seed (rows split by key hash)", minimum=0)
    num_shards: int = setting(1, help="number of shards the seed is split into", minimum=1)
    retry: RetryPolicy = setting(
        help="request, retry, rate-limit and cost settings (CLI: their own flags)", factory=RequestSettings, cli=False
    )
    progress_interval: float = setting(5.0, help="seconds between progress lines", minimum=0)
    batch: BatchSettings = setting(
        help="teacher mode (online or batch) and the Batch API's settings (CLI: their own flags)",
        factory=BatchSettings,
        cli=False,
    )
    # shared across runs: rows finished with the same settings are copied from here instead of requested again
    store_dir: str | None = setting(None, help="generation store folder shared across runs (default: none)")
    reused_rows: str = setting(
        "reference",
        help="rows found in the generation store: 'reference' lists them in <dst stem>.reused.jsonl and --merge "
        "fills them in from the store (a rerun's work follows its new rows); 'copy' writes them into --dst",
        choices=REUSED_MODES,
    )

    def __post_init__(self):
        self.retry = RequestSettings.of(self.retry)
        self.batch = BatchSettings.of(self.batch)
        self.uuid_column = self.uuid_column or self.prompt_column
        if self.uuid_column == PROMPT_COLUMN:
            raise ValueError(
                f"the uuid column cannot be {PROMPT_COLUMN!r}: output lines overwrite that field with the templated "
                "prompt, so it would not identify rows on resume; pick another column"
            )
        if "{prompt}" not in self.prompt_template:
            raise ValueError(f"prompt template must contain {{prompt}}; got {self.prompt_template!r}")
        try:
            self.prompt_template.format(prompt="")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(
                f"prompt template {self.prompt_template!r} does not format ({type(e).__name__}: {e}); "
                "write literal braces as {{ and }}, e.g. \\boxed{{}}"
            ) from None
        for name in ("num_generations", "max_tokens", "max_concurrent", "num_shards"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"shard_index must be in [0, {self.num_shards}), got {self.shard_index}")
        if self.reused_rows not in REUSED_MODES:
            raise ValueError(f"Invalid reused_rows {self.reused_rows!r}, must be one of {REUSED_MODES}")

    @property
    def sampling(self) -> dict:
        sampling = {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p}
        if self.seed is not None:
            sampling["seed"] = self.seed
        return sampling


@dataclass
class GenerateResult:
    output_file: Path
    stats_file: Path
    stats: dict
    reused_file: Path | None = None  # the rows taken from the store, for merge (None: none are referenced)


def shard_of(key: str, num_shards: int) -> int:
    """Deterministic shard of a row key: the same row lands in the same shard whatever else the seed holds."""
    return int(key[:8], 16) % num_shards


def prompt_text(value) -> str:
    """The problem text of a prompt cell: a string, or the user turn of a chat-format list (verl layout)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        users = [m.get("content", "") for m in value if m.get("role") == "user"]
        if users:
            return users[-1]
    raise DataError(
        f"prompt cell must be a string or a list of chat messages, got {type(value).__name__}: {value!r:.80}"
    )


def settings_key(cfg: GenerateConfig) -> str:
    """What makes two generations interchangeable: teacher, prompt and sampling settings."""
    settings = {
        "model": cfg.model,
        "prompt_template": cfg.prompt_template,
        "system_prompt": cfg.system_prompt,
        "prompt_column": cfg.prompt_column,
        "uuid_column": cfg.uuid_column,
        "num_generations": cfg.num_generations,
        **cfg.sampling,
    }
    return hashlib.md5(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
