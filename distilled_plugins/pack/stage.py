"""Stage 4's run: open the handled dataset, choose the pieces to pack, plan the rows, write them and
``stats.json``."""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from distilled_plugins.core.artifacts import check_output_folder, require_artifact
from distilled_plugins.core.errors import DataError
from distilled_plugins.core.io import atomic_dir, read_json, save_tables_to_disk, write_json
from distilled_plugins.core.schema import PACKED_COLUMNS, STATS_FILE, STATS_PAD_TOKEN_ID, STATS_SEQ_LENGTH, features
from distilled_plugins.core.stats import Stats
from distilled_plugins.pack import reader
from distilled_plugins.pack.config import PackConfig
from distilled_plugins.pack.plan import Piece, drop_untrainable, pieces_of, plan_bfd
from distilled_plugins.pack.rows import packed_tables

logger = logging.getLogger(__package__)  # the stage's name, from any of its modules

# why a handled sample is not packed at all (a split sample that loses only its prompt-only head is packed)
DROP_REASONS = ("too_long", "no_trainable_token")


def run(cfg: PackConfig) -> Path:
    """Pack the handled dataset at ``cfg.src`` into ``cfg.dst``."""
    started = time.monotonic()
    src = Path(cfg.src)
    require_artifact(src, "handled")
    if src.resolve() == Path(cfg.dst).resolve():
        raise DataError(f"{src}: --src and --dst are the same folder; packing in place would destroy the input")
    check_output_folder(cfg.dst, "packed", cfg.overwrite)
    handled = reader.load_handled(src)
    table, maps, files = reader.mapped_table(src, handled)
    try:
        return _pack(cfg, src, table, maps, files, started)
    finally:
        for f in files:
            os.close(f.fd)


class Selection(NamedTuple):
    """The pieces to pack, and the counts of what the overlong policy and the trainable-token check did."""

    pieces: list[Piece]
    counts: Stats  # rows are handled samples
    overlong: dict  # samples truncated, split (and into how many pieces), dropped
    not_packed: dict  # pieces without a trainable token, by why they were cut


def _select(cfg: PackConfig, src: Path, handled: reader.Handled) -> Selection:
    """Apply the overlong policy, leave out the pieces without a trainable token; refuse when nothing is left."""
    lengths = handled.lengths
    pieces, overlong = pieces_of(lengths, cfg.seq_length, cfg.overlong)
    counts = Stats("samples", reasons=DROP_REASONS)
    counts.read(len(lengths))
    counts.drop("too_long", overlong["dropped"])
    with_pieces = len({p.row for p in pieces})
    pieces, untrainable = drop_untrainable(pieces, handled.labels, lengths)
    counts.keep(len({p.row for p in pieces}))
    counts.drop("no_trainable_token", with_pieces - counts.rows_out)  # every piece of the sample removed
    # only split and truncated samples have pieces that stop before the sample's end
    not_packed = {"split_piece_prompt_only": 0, "truncated_prompt_only": 0}
    not_packed["split_piece_prompt_only" if cfg.overlong == "split" else "truncated_prompt_only"] = untrainable
    if untrainable:
        logger.info("%d %s piece(s) hold no trainable token: not packed", untrainable, cfg.overlong)
    if not pieces:
        raise DataError(
            f"{src}: of {len(lengths)} samples, with seq_length {cfg.seq_length}, policy {cfg.overlong!r} left "
            f"nothing to train on (overlong: {overlong}, without a trainable token: {not_packed}); "
            "raise seq_length or use another --overlong policy"
        )
    return Selection(pieces, counts, overlong, not_packed)


def _pad_id(cfg: PackConfig) -> int:
    if cfg.pad_token_id is not None:
        return cfg.pad_token_id
    stats = Path(cfg.src) / STATS_FILE
    if stats.exists() and STATS_PAD_TOKEN_ID in (recorded := read_json(stats, "handle stats file")):
        return int(recorded[STATS_PAD_TOKEN_ID])
    raise DataError(
        f"{cfg.src}: no stats.json with the tokenizer's pad_token_id (not made by stage 3?); give --pad-token-id"
    )


def _pack(cfg: PackConfig, src: Path, table, maps, files: list[reader.MappedFile], started: float) -> Path:
    ids = reader.ListColumn(table, "input_ids", files)
    handled = reader.Handled(ids, reader.ListColumn(table, "labels", files), ids.lengths())
    reader.release(maps)  # the offsets' pages: only the rows of a write are read from here on
    selection = _select(cfg, src, handled)
    plan_started = time.monotonic()
    plan = plan_bfd([p.length for p in selection.pieces], cfg.seq_length)
    plan_seconds = time.monotonic() - plan_started
    pad = _pad_id(cfg)
    tables = packed_tables(plan, selection.pieces, handled, cfg.seq_length, pad, cfg.rows_per_write, maps)
    with atomic_dir(cfg.dst, kind="packed", overwrite=cfg.overwrite) as tmp:
        save_tables_to_disk(tables, tmp, features(PACKED_COLUMNS))
        stats = _stats(cfg, selection, handled.lengths, plan, pad)
        stats |= {"plan_seconds": round(plan_seconds, 3), "wall_seconds": round(time.monotonic() - started, 3)}
        write_json(tmp / STATS_FILE, stats)
    logger.info(
        "packed %d samples (%d tokens) into %d rows of %d: efficiency %.4f (lower bound %d rows); overlong: %s; %s",
        stats["samples_in"],
        stats["tokens"],
        len(plan),
        cfg.seq_length,
        stats["efficiency"],
        stats["packs_lower_bound"],
        selection.overlong,
        selection.counts.summary(),
    )
    return Path(cfg.dst)


def _stats(cfg: PackConfig, selection: Selection, lengths: np.ndarray, plan: list[list[int]], pad: int) -> dict:
    """``stats.json`` but for the timings."""
    tokens = sum(p.length for p in selection.pieces)
    samples_per_pack = np.array([len(pack) for pack in plan])
    return {
        **selection.counts.as_dict(),  # rows are handled samples
        "src": str(Path(cfg.src)),
        STATS_SEQ_LENGTH: cfg.seq_length,
        "overlong_policy": cfg.overlong,
        STATS_PAD_TOKEN_ID: pad,
        "samples_in": len(lengths),
        "pieces_packed": len(selection.pieces),
        "tokens": int(tokens),
        "tokens_in": int(lengths.sum()),
        "packs": len(plan),
        "packs_lower_bound": math.ceil(tokens / cfg.seq_length),
        "efficiency": round(tokens / (len(plan) * cfg.seq_length), 6),
        "samples_per_pack": {
            "mean": round(float(samples_per_pack.mean()), 3),
            "min": int(samples_per_pack.min()),
            "max": int(samples_per_pack.max()),
        },
        "overlong": selection.overlong,
        "pieces_without_trainable_token": selection.not_packed,
    }
