"""Stage 3's run: read conversations in size-capped batches, encode them, write the ``save_to_disk`` folder,
``stats.json`` and ``lengths.png``."""

from __future__ import annotations

import logging
import time
from array import array
from pathlib import Path

import numpy as np

from distilled_plugins.core.artifacts import artifact_kind, check_output_folder
from distilled_plugins.core.errors import DataError
from distilled_plugins.core.io import atomic_dir, count_rows, iter_column_batches, save_tables_to_disk, write_json
from distilled_plugins.core.progress import Progress
from distilled_plugins.core.schema import HANDLED_COLUMNS, IGNORE_INDEX, STATS_FILE, STATS_PAD_TOKEN_ID, features
from distilled_plugins.handle.config import HandleConfig
from distilled_plugins.handle.encoder import ChatEncoder, load_tokenizer

logger = logging.getLogger(__package__)  # the stage's name, from any of its modules


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
