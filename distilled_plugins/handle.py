"""Stage 3: tokenize conversations with the Qwen2.5 chat template, prompt tokens masked out of the labels.

Usage:
    python -m distilled_plugins.handle --src filtered.jsonl --tokenizer ../shared/data/tokenizer/qwen2.5 \\
        --dst handled/

Each example's ``messages`` (stage 2's JSONL, or OpenR1-Math-220k parquet files) get a system message with the
reasoning prompt in front, are rendered with the tokenizer's chat template (no generation prompt) and tokenized
by the fast (Rust) tokenizer in batches. Every label up to and including the first ``<|im_start|>assistant\\n``
is -100; the answer and its closing ``<|im_end|>`` are learned. Writes a ``save_to_disk`` folder with
``input_ids`` and ``labels`` (unshifted), ``stats.json`` and ``lengths.png`` inside ``--dst``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distilled_plugins.core import cli
from distilled_plugins.core.errors import DataError
from distilled_plugins.core.io import (
    artifact_kind,
    atomic_dir,
    check_output_folder,
    count_rows,
    iter_column_batches,
    save_tables_to_disk,
    write_json,
)
from distilled_plugins.core.progress import Progress
from distilled_plugins.core.schema import HANDLED_COLUMNS, IGNORE_INDEX, STATS_FILE, STATS_PAD_TOKEN_ID, features
from distilled_plugins.core.settings import PROCESSING, from_args, setting
from distilled_plugins.core.stats import Stats

logger = logging.getLogger(__name__)

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
TRUNCATION_POLICIES = ("tutorial", "drop", "none")
ASSISTANT_MARKER = "<|im_start|>assistant\n"


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


def load_tokenizer(path: str | Path, num_threads: int | None = None):
    """The fast Qwen2.5 tokenizer of a local folder, checked for what the stage needs."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"tokenizer folder {path} not found")
    if num_threads:
        os.environ["RAYON_NUM_THREADS"] = str(num_threads)  # read when the Rust thread pool first starts
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), use_fast=True)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot load a tokenizer: {e}") from e
    if not tokenizer.is_fast:
        raise DataError(f"{path}: no fast tokenizer (tokenizer.json) found")
    if not tokenizer.chat_template:
        raise DataError(f"{path}: the tokenizer has no chat template (tokenizer_config.json 'chat_template')")
    for token in ("<|im_start|>", "<|im_end|>"):
        if token not in tokenizer.get_vocab():
            raise DataError(f"{path}: special token {token} is not in the vocabulary; is this a Qwen2.5 tokenizer?")
    if tokenizer.pad_token_id is None:
        raise DataError(f"{path}: the tokenizer has no pad token")
    return tokenizer


# why a conversation is left out (one cut to max_length is kept and counted as truncated)
DROP_REASONS = ("malformed_messages", "no_assistant_turn", "too_long")


class ChatEncoder:
    """Chat template + tokenizer + label mask: the logic shared by the stage and the mindformers handler."""

    def __init__(
        self, tokenizer, system_prompt: str = SYSTEM_PROMPT, max_length: int = 20480, truncation: str = "tutorial"
    ):
        self.tokenizer = tokenizer
        self.system = {"role": "system", "content": system_prompt}
        self.max_length, self.truncation = max_length, truncation
        self.marker = np.array(tokenizer.encode(ASSISTANT_MARKER, add_special_tokens=False), dtype=np.int64)
        self.stats = Stats("conversations", reasons=DROP_REASONS)
        self.truncated = 0  # kept, cut to max_length

    def _target_start(self, ids: np.ndarray) -> int | None:
        """Index of the first answer token: just past the first ``<|im_start|>assistant\\n``."""
        width = len(self.marker)
        for start in np.flatnonzero(ids == self.marker[0]):
            if np.array_equal(ids[start : start + width], self.marker):
                return int(start) + width
        return None

    def encode_batch(self, conversations: list) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(input_ids, labels)`` of each conversation that is kept; reasons for the others are counted."""
        valid = []
        self.stats.read(len(conversations))
        for messages in conversations:
            if not isinstance(messages, list) or not all(
                isinstance(m, dict) and "role" in m and isinstance(m.get("content"), str) for m in messages
            ):  # a null or list content would fail inside the chat template: count it instead
                self.stats.drop("malformed_messages")
            else:
                valid.append([self.system, *messages])
        if not valid:
            return []
        texts = self.tokenizer.apply_chat_template(valid, tokenize=False, add_generation_prompt=False)
        # the Rust tokenizer directly: batched across threads, without building Python BatchEncoding objects
        encodings = self.tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        out = []
        for encoding in encodings:
            ids = np.asarray(encoding.ids, dtype=np.int32)
            target = self._target_start(ids)
            if target is None or target >= len(ids):
                self.stats.drop("no_assistant_turn")
                continue
            if len(ids) > self.max_length:
                if self.truncation == "drop":
                    self.stats.drop("too_long")
                    continue
                if self.truncation == "tutorial":
                    # keep the head and the closing "<|im_end|>\n", as the tutorial's handler does
                    ids = np.concatenate([ids[: self.max_length], ids[-2:]])
                    self.truncated += 1
            labels = ids.astype(np.int64)
            labels[:target] = IGNORE_INDEX
            out.append((ids, labels))
        self.stats.keep(len(out))
        return out


def _chunks_by_size(conversations: list, max_chars: int):
    """Consecutive runs of ``conversations`` holding at most ``max_chars`` characters of content (at least one)."""
    chunk, size = [], 0
    for messages in conversations:
        chars = (
            sum(len(m.get("content") or "") for m in messages if isinstance(m, dict))
            if isinstance(messages, list)
            else 0
        )
        if chunk and size + chars > max_chars:
            yield chunk
            chunk, size = [], 0
        chunk.append(messages)
        size += chars
    if chunk:
        yield chunk


def _table(pairs: list[tuple[np.ndarray, np.ndarray]]):
    import pyarrow as pa

    lengths = np.fromiter((len(ids) for ids, _ in pairs), dtype=np.int64, count=len(pairs))
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    ids = pa.array(np.concatenate([p[0] for p in pairs]), type=pa.int32())
    labels = pa.array(np.concatenate([p[1] for p in pairs]), type=pa.int64())
    return pa.table(
        {"input_ids": pa.ListArray.from_arrays(offsets, ids), "labels": pa.ListArray.from_arrays(offsets, labels)}
    )


def _histogram(lengths: np.ndarray, path: Path, max_length: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(lengths, bins=50, color="#4c72b0")
    ax.axvline(max_length, color="#c44e52", linestyle="--", label=f"max_length {max_length}")
    ax.set_xlabel("tokens per sample")
    ax.set_ylabel("samples")
    ax.set_title(f"Handled samples: {len(lengths)} rows, median {int(np.median(lengths))} tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _check_paths(cfg: HandleConfig) -> None:
    """Refuse, before any work, inputs of the wrong kind and an output that would destroy something."""
    dst = Path(cfg.dst).resolve()
    for src in map(Path, cfg.src):
        if src.resolve() == dst or dst in src.resolve().parents:
            raise DataError(f"{src}: --src lies in --dst {cfg.dst}; writing there would destroy the input")
        if src.is_dir() and artifact_kind(src) is not None:
            raise DataError(
                f"{src}: holds a {artifact_kind(src)} dataset; --src expects stage 2's JSONL (or parquet files) "
                f"with a {cfg.messages_column!r} column"
            )
    check_output_folder(cfg.dst, "handled", cfg.overwrite)


def run(cfg: HandleConfig) -> Path:
    """Tokenize every conversation of ``cfg.src`` into a ``save_to_disk`` folder at ``cfg.dst``."""
    started = time.monotonic()
    _check_paths(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.num_proc)
    encoder = ChatEncoder(tokenizer, cfg.system_prompt, cfg.max_length, cfg.truncation)
    lengths = array("q")  # 8 bytes a row: kept for the stats and the histogram
    tokens = 0
    answer_tokens = 0
    progress = Progress(logger, "rows", count_rows(cfg.src), cfg.progress_interval)
    processing_started = time.monotonic()  # tokens/s counts the work, not loading the tokenizer

    def tables():
        nonlocal answer_tokens, tokens
        for batch in iter_column_batches(cfg.src, cfg.messages_column, cfg.batch_size):
            for chunk in _chunks_by_size(batch, cfg.batch_chars):
                pairs = encoder.encode_batch(chunk)
                if pairs:
                    lengths.extend(len(ids) for ids, _ in pairs)
                    tokens += sum(len(ids) for ids, _ in pairs)
                    answer_tokens += sum(int((labels != IGNORE_INDEX).sum()) for _, labels in pairs)
                    yield _table(pairs)
                progress.maybe_log(encoder.stats.rows_in, f"| {tokens} tokens")

    with atomic_dir(cfg.dst, kind="handled", overwrite=cfg.overwrite) as tmp:
        rows = save_tables_to_disk(tables(), tmp, features(HANDLED_COLUMNS))
        if rows == 0:
            raise DataError(f"{', '.join(cfg.src)}: no rows to handle ({encoder.stats.summary()})")
        length_array = np.asarray(lengths)
        processing = time.monotonic() - processing_started
        stats = {
            **encoder.stats.as_dict(),  # rows are conversations
            "src": cfg.src,
            "tokenizer": str(cfg.tokenizer),
            STATS_PAD_TOKEN_ID: tokenizer.pad_token_id,
            "system_prompt": cfg.system_prompt,
            "rows": rows,
            "tokens": int(length_array.sum()),
            "answer_tokens": answer_tokens,
            "max_length": cfg.max_length,
            "truncation": cfg.truncation,
            "truncated": encoder.truncated,
            "length_percentiles": {f"p{q}": int(np.percentile(length_array, q)) for q in (50, 90, 99)}
            | {"max": int(length_array.max()), "min": int(length_array.min())},
            "wall_seconds": round(time.monotonic() - started, 3),
            "processing_seconds": round(processing, 3),
            "tokens_per_s": round(float(length_array.sum()) / processing),
        }
        write_json(tmp / STATS_FILE, stats)
        _histogram(length_array, tmp / "lengths.png", cfg.max_length)
    progress.finish(encoder.stats.rows_in, f"| {stats['tokens']} tokens, {stats['truncated']} truncated")
    logger.info("%s", encoder.stats.summary())
    return Path(cfg.dst)


def build_parser() -> argparse.ArgumentParser:
    return cli.stage_parser("distilled_plugins.handle", __doc__, HandleConfig)


def main(argv: list[str] | None = None) -> int:
    cli.start_logging()
    dst = run(from_args(HandleConfig, build_parser().parse_args(argv)))
    logger.info("wrote %s", dst)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
