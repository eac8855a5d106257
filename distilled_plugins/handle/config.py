"""Stage 3's settings, and the defaults other stages share with it (the system prompt): light, no numpy."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from distilled_plugins.core.settings import PROCESSING, setting

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
TRUNCATION_POLICIES = ("tutorial", "drop", "none")


@dataclass
class HandleConfig:
    src: list[str] = setting(help="stage 2 JSONL, or parquet files with a messages column", required=True)
    tokenizer: str = setting(help="local folder of the Qwen2.5 tokenizer (with its chat template)", required=True)
    dst: str = setting(help="output folder (save_to_disk layout)", required=True)
    system_prompt: str = setting(SYSTEM_PROMPT, help="system turn prepended to every conversation")
    max_length: int = setting(
        20480,
        help="longest sample in tokens; a longer one is cut, dropped or kept as the truncation policy says",
        minimum=16,
        maximum=131072,
        title="Longest sample (tokens)",
        section=PROCESSING,
    )
    truncation: str = setting(
        "tutorial",
        help="a sample over the longest length: keep its head and last 2 tokens (tutorial), drop it, or keep it whole",
        choices=TRUNCATION_POLICIES,
        title="Samples over the longest length",
        section=PROCESSING,
    )
    messages_column: str = setting("messages", help="column holding the conversation")
    batch_size: int = setting(1000, help="rows tokenized per batch", minimum=1)
    # tokenizer batches also stop at this many characters: the Rust encodings of a batch take ~80 bytes a token,
    # so 1,000 rows of 40 KB completions would hold over a gigabyte at once
    batch_chars: int = setting(2_000_000, help="characters tokenized per batch at most", minimum=1)
    num_proc: int | None = setting(None, help="tokenizer threads (default: all cores)", minimum=1)
    progress_interval: float = setting(5.0, help="seconds between progress lines", minimum=0)
    overwrite: bool = setting(False, help="replace a --dst folder that handle did not make")

    def __post_init__(self):
        if isinstance(self.src, (str, Path)):
            self.src = [str(self.src)]
        if not self.src:
            raise ValueError("no input given (--src)")
        if self.truncation not in TRUNCATION_POLICIES:
            raise ValueError(f"Invalid truncation policy {self.truncation!r}, must be one of {TRUNCATION_POLICIES}.")
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}")
