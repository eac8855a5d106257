"""Stage 4: pack tokenized samples into fixed-length rows in mindformers' packed format.

Usage:
    python -m distilled_plugins.pack --src handled/ --dst packed/ --overlong split
    # seq_length defaults to model.model_config.seq_length of configs/finetune_qwen_2_5_7b.yaml

The plan is best-fit-decreasing over the whole dataset (deterministic); samples longer than ``seq_length`` are
truncated, split into ``seq_length`` pieces, or dropped, and each case is counted. A piece that would hold no
trainable token (a split sample's prompt-only head, a truncated sample cut before its answer) is not emitted:
it would add a loss step over nothing; such pieces are counted by reason in ``stats.json``. Output rows hold
``input_ids`` (int32), ``labels`` (int64, each sample's labels shifted: ``labels[1:] + [pad]``) and
``actual_seq_len`` (cumulative end offsets), padded with the pad id / -100: what mindformers' ``HFDataLoader``
reads with ``create_attention_mask: True``. ``stats.json`` (packs, efficiency, samples per pack, overlong
samples by policy) is written inside ``--dst``.
"""

from __future__ import annotations

import argparse
import bisect
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from distilled_plugins.core import cli, configs
from distilled_plugins.core.cli import one_line
from distilled_plugins.core.errors import DataError, MissingColumn
from distilled_plugins.core.io import (
    atomic_dir,
    check_output_folder,
    read_json,
    require_artifact,
    save_tables_to_disk,
    write_json,
)
from distilled_plugins.core.schema import (
    HANDLED_COLUMNS,
    IGNORE_INDEX,
    PACKED_COLUMNS,
    STATS_FILE,
    STATS_PAD_TOKEN_ID,
    STATS_SEQ_LENGTH,
    features,
)
from distilled_plugins.core.settings import PROCESSING, from_args, setting
from distilled_plugins.core.stats import Stats

logger = logging.getLogger(__name__)

OVERLONG_POLICIES = ("truncate", "split", "drop")


@dataclass
class PackConfig:
    src: str = setting(help="handled dataset folder (stage 3)", required=True)
    dst: str = setting(help="output folder (save_to_disk layout)", required=True)
    seq_length: int | None = setting(
        None, help="row length (default: model.model_config.seq_length of --finetune-config)", minimum=2
    )
    finetune_config: str = setting(
        str(configs.FINETUNE_7B), help="fine-tune YAML whose model seq_length the rows are packed to"
    )
    overlong: str = setting(
        "split",
        help="samples longer than seq_length are split, truncated or dropped (each case is counted)",
        choices=OVERLONG_POLICIES,
        title="Samples over the model's sequence length",
        section=PROCESSING,
    )
    pad_token_id: int | None = setting(None, help="pad id (default: the one handle recorded in its stats.json)")
    # packed rows built per Arrow write: each takes ~3 x seq_length x 12 bytes while built (32 x 32,768: ~40 MB)
    rows_per_write: int = setting(32, help="packed rows built per Arrow write", minimum=1)
    overwrite: bool = setting(False, help="replace a --dst folder that pack did not make")

    def __post_init__(self):
        if self.overlong not in OVERLONG_POLICIES:
            raise ValueError(f"Invalid overlong policy {self.overlong!r}, must be one of {OVERLONG_POLICIES}.")
        if self.seq_length is None:
            self.seq_length = configs.seq_length_of(self.finetune_config)
        if self.seq_length < 2:
            raise ValueError(f"seq_length must be at least 2, got {self.seq_length}")


# why a handled sample is not packed at all (a split sample that loses only its prompt-only head is packed)
DROP_REASONS = ("too_long", "no_trainable_token")


class Piece(NamedTuple):
    """``length`` tokens of handled row ``row`` from ``start``; the unit the plan packs."""

    row: int
    start: int
    length: int


def pieces_of(lengths: np.ndarray, seq_length: int, overlong: str) -> tuple[list[Piece], dict]:
    """Apply the overlong policy: every sample becomes zero (drop), one or several (split) pieces."""
    counts = {"truncated": 0, "split": 0, "split_pieces": 0, "dropped": 0}
    pieces = []
    for row, length in enumerate(lengths.tolist()):
        if length <= seq_length:
            pieces.append(Piece(row, 0, length))
        elif overlong == "truncate":
            pieces.append(Piece(row, 0, seq_length))
            counts["truncated"] += 1
        elif overlong == "split":
            parts = [Piece(row, s, min(seq_length, length - s)) for s in range(0, length, seq_length)]
            pieces.extend(parts)
            counts["split"] += 1
            counts["split_pieces"] += len(parts)
        else:
            counts["dropped"] += 1
    return pieces, counts


def trainable_tokens(labels: np.ndarray, piece: Piece) -> int:
    """Positions of ``piece`` that count in the loss once labels are shifted (``labels[1:] + [pad]``).

    >>> trainable_tokens(np.array([-100, -100, -100, 5, 6]), Piece(0, 0, 2))  # prompt only
    0
    >>> trainable_tokens(np.array([-100, -100, -100, 5, 6]), Piece(0, 2, 3))  # 5, 6 and the final pad
    3
    """
    end = piece.start + piece.length
    shifted = labels[piece.start + 1 : end + 1]
    return int(np.count_nonzero(shifted != IGNORE_INDEX)) + (1 if end >= len(labels) else 0)


def drop_untrainable(pieces: list[Piece], labels, row_lengths: np.ndarray) -> tuple[list[Piece], int]:
    """Remove the pieces without a trainable token; returns the pieces kept and how many were removed.

    Only pieces that stop before their sample's end can be empty (a split sample's head, a truncated sample):
    a sample's last position always trains, its label being the pad that "+ [pad]" appends.
    """
    kept, removed = [], 0
    for piece in pieces:
        if piece.start + piece.length >= row_lengths[piece.row] or trainable_tokens(labels.row(piece.row), piece):
            kept.append(piece)
        else:
            removed += 1
    return kept, removed


def plan_bfd(lengths: list[int] | np.ndarray, seq_length: int) -> list[list[int]]:
    """Best-fit-decreasing: each item, longest first, goes to the fullest pack that still has room for it.

    >>> plan_bfd([5, 3, 4, 2, 6], 8)
    [[4, 3], [0, 1], [2]]

    Open packs are kept by remaining room: a sorted list of the distinct rooms (``bisect`` finds the smallest
    room >= the item in C) and, per room, a stack of packs. That makes the plan O(n log n) with tiny constants,
    instead of a Python segment tree per item.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.max() > seq_length or lengths.min() < 1):
        raise ValueError(f"every length must be in [1, {seq_length}]")
    order = np.argsort(-lengths, kind="stable").tolist()  # ties keep input order: the plan is deterministic
    sizes = lengths.tolist()
    rooms: list[int] = []  # sorted distinct rooms of open packs
    packs_with_room: dict[int, list[int]] = {}
    packs: list[list[int]] = []
    for item in order:
        size = sizes[item]
        at = bisect.bisect_left(rooms, size)
        if at == len(rooms):
            pack = len(packs)
            packs.append([item])
            room = seq_length - size
        else:
            room_before = rooms[at]
            stack = packs_with_room[room_before]
            pack = stack.pop()
            if not stack:
                del packs_with_room[room_before]
                del rooms[at]
            packs[pack].append(item)
            room = room_before - size
        if room:
            stack = packs_with_room.get(room)
            if stack is None:
                packs_with_room[room] = [pack]
                bisect.insort(rooms, room)
            else:
                stack.append(pack)
    return packs


class _Columns:
    """A handled dataset's list column, row by row: offsets as zero-copy NumPy views, values read with ``pread``.

    A row whose values lie in one of ``files`` (our maps of the dataset's files) is read from the file with
    ``os.pread``, not through the map: a fault in a file map makes Linux map the whole page-cache folio around it
    (~1 MB a touch measured on kernel 6.18, up to 2 MB), so the few dozen rows of one write, scattered over the
    files, made ~75 MB resident at 1,000 rows of 16k tokens, and all of a small file: pack's peak grew with the
    input up to that bound. A read copies only the row. Rows of an in-memory table are NumPy views.
    """

    def __init__(self, table, name: str, files: list[_MappedFile] = ()):
        chunks = table.column(name).chunks
        self.offsets = [c.offsets.to_numpy() for c in chunks]
        self.first_row = np.cumsum([0] + [len(c) for c in chunks])
        self.sources = []  # per chunk: (fd, file position of value 0, dtype) or (None, NumPy view, dtype)
        for c in chunks:
            values = c.values
            dtype = np.dtype(values.type.to_pandas_dtype())
            start = values.buffers()[1].address + values.offset * dtype.itemsize
            mapped = next((f for f in files if f.address <= start < f.address + f.size), None)
            if mapped is not None:
                self.sources.append((mapped.fd, start - mapped.address, dtype))
            else:
                self.sources.append((None, values.to_numpy(zero_copy_only=False), dtype))

    def _locate(self, index: int) -> tuple[int, int, int]:
        chunk = int(np.searchsorted(self.first_row, index, side="right")) - 1
        local = index - self.first_row[chunk]
        offsets = self.offsets[chunk]
        return chunk, int(offsets[local]), int(offsets[local + 1])

    def read_into(self, index: int, start: int, out: np.ndarray) -> None:
        """Copy ``len(out)`` values of row ``index`` from position ``start`` into ``out`` (a contiguous array)."""
        chunk, first, last = self._locate(index)
        if start + len(out) > last - first:
            raise IndexError(f"row {index} has {last - first} values; asked for {start}:{start + len(out)}")
        fd, where, dtype = self.sources[chunk]
        if fd is None:
            out[:] = where[first + start : first + start + len(out)]
        elif len(out):
            size = os.preadv(fd, [memoryview(out).cast("B")], where + (first + start) * dtype.itemsize)
            if size != out.nbytes:
                raise DataError(
                    f"handled dataset file shorter than its Arrow metadata says (row {index}); rerun handle"
                )

    def row(self, index: int) -> np.ndarray:
        chunk, first, last = self._locate(index)
        fd, where, dtype = self.sources[chunk]
        if fd is None:
            return where[first:last]
        size = (last - first) * dtype.itemsize
        data = os.pread(fd, size, where + first * dtype.itemsize)
        if len(data) != size:
            raise DataError(f"handled dataset file shorter than its Arrow metadata says (row {index}); rerun handle")
        return np.frombuffer(data, dtype)

    def lengths(self) -> np.ndarray:
        return np.concatenate([np.diff(o) for o in self.offsets]) if self.offsets else np.zeros(0, dtype=np.int64)


class _MappedFile(NamedTuple):
    address: int  # where our map of the file starts in memory
    size: int
    fd: int  # the file, open for pread


def _mapped_table(src: Path, handled):
    """The handled dataset's table over our own read-only memory maps (same files ``load_from_disk`` maps).

    Only the Arrow metadata and offsets are read through the maps; rows are read with ``pread`` (``_Columns``).
    The pages of the maps that were touched are dropped from this process after each write (``_release``), so
    resident memory stays at one write's worth instead of growing with the input.
    """
    import mmap

    import pyarrow as pa

    maps, tables, files = [], [], []
    for cache in handled.cache_files:
        fd = os.open(cache["filename"], os.O_RDONLY)
        maps.append(mmap.mmap(fd, 0, access=mmap.ACCESS_READ))
        buffer = pa.py_buffer(maps[-1])
        files.append(_MappedFile(buffer.address, buffer.size, fd))
        tables.append(pa.ipc.open_stream(buffer).read_all())
    if not tables:  # an in-memory dataset (not from files): nothing to release
        return handled.data.table, [], []
    return pa.concat_tables(tables).select(list(HANDLED_COLUMNS)), maps, files


def _release(maps) -> None:
    import mmap

    for m in maps:
        m.madvise(mmap.MADV_DONTNEED)


def _pad_id(cfg: PackConfig) -> int:
    if cfg.pad_token_id is not None:
        return cfg.pad_token_id
    stats = Path(cfg.src) / STATS_FILE
    if stats.exists() and STATS_PAD_TOKEN_ID in (recorded := read_json(stats, "handle stats file")):
        return int(recorded[STATS_PAD_TOKEN_ID])
    raise DataError(
        f"{cfg.src}: no stats.json with the tokenizer's pad_token_id (not made by stage 3?); give --pad-token-id"
    )


def run(cfg: PackConfig) -> Path:
    """Pack the handled dataset at ``cfg.src`` into ``cfg.dst``."""
    import datasets

    started = time.monotonic()
    src = Path(cfg.src)
    require_artifact(src, "handled")
    if src.resolve() == Path(cfg.dst).resolve():
        raise DataError(f"{src}: --src and --dst are the same folder; packing in place would destroy the input")
    check_output_folder(cfg.dst, "packed", cfg.overwrite)
    try:
        handled = datasets.load_from_disk(str(src))
    except (OSError, ValueError) as e:  # a cut-short or foreign folder: pyarrow's message names no file
        raise DataError(f"{src}: cannot be read as a handled dataset ({one_line(e)}); rerun handle") from None
    for column in HANDLED_COLUMNS:
        if column not in handled.column_names:
            raise MissingColumn(
                f"{src}: column {column!r} not found; columns present: {', '.join(handled.column_names)}"
            )
    if "actual_seq_len" in handled.column_names:  # a packed folder from before artifact markers
        raise DataError(f"{src}: is already packed (it has 'actual_seq_len'); --src expects handle's output")
    if len(handled) == 0:
        raise DataError(f"{src}: the handled dataset is empty")
    table, maps, files = _mapped_table(src, handled)
    try:
        return _pack(cfg, src, table, maps, files, started)
    finally:
        for f in files:
            os.close(f.fd)


def _pack(cfg: PackConfig, src: Path, table, maps, files: list[_MappedFile], started: float) -> Path:
    import pyarrow as pa

    ids, labels = _Columns(table, "input_ids", files), _Columns(table, "labels", files)
    lengths = ids.lengths()
    _release(maps)  # the offsets' pages: only the rows of a write are read from here on
    pieces, overlong = pieces_of(lengths, cfg.seq_length, cfg.overlong)
    samples = Stats("samples", reasons=DROP_REASONS)
    samples.read(len(lengths))
    samples.drop("too_long", overlong["dropped"])
    with_pieces = len({p.row for p in pieces})
    pieces, untrainable = drop_untrainable(pieces, labels, lengths)
    samples.keep(len({p.row for p in pieces}))
    samples.drop("no_trainable_token", with_pieces - samples.rows_out)  # every piece of the sample removed
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
    plan_started = time.monotonic()
    plan = plan_bfd([p.length for p in pieces], cfg.seq_length)
    plan_seconds = time.monotonic() - plan_started
    pad = _pad_id(cfg)
    seq = cfg.seq_length

    def tables():
        # each write's pieces are read straight into its output arrays (one preadv each): no per-piece copies, and
        # the same few allocations of the same size every write, so the heap does not fragment as the input grows
        for first in range(0, len(plan), cfg.rows_per_write):
            packs = plan[first : first + cfg.rows_per_write]
            out_ids = np.full(len(packs) * seq, pad, dtype=np.int32)
            out_labels = np.full(len(packs) * seq, IGNORE_INDEX, dtype=np.int64)
            ends = []  # per packed row: the cumulative end offset of each piece
            for number, pack in enumerate(packs):
                at = number * seq
                row_ends = []
                for piece in (pieces[i] for i in pack):
                    ids.read_into(piece.row, piece.start, out_ids[at : at + piece.length])
                    # labels[1:] of the sample, cut to the piece; the sample's last position gets "+ [pad]"
                    shifted = min(piece.start + piece.length + 1, int(lengths[piece.row])) - piece.start - 1
                    labels.read_into(piece.row, piece.start + 1, out_labels[at : at + shifted])
                    if shifted < piece.length:
                        out_labels[at + shifted] = pad
                    at += piece.length
                    row_ends.append(at - number * seq)
                ends.append(row_ends)
            seq_offsets = pa.array(np.cumsum([0] + [len(e) for e in ends]).astype(np.int32))
            row_offsets = pa.array(np.arange(len(packs) + 1, dtype=np.int32) * seq)
            yield pa.table(
                {
                    "input_ids": pa.ListArray.from_arrays(row_offsets, pa.array(out_ids, pa.int32())),
                    "labels": pa.ListArray.from_arrays(row_offsets, pa.array(out_labels, pa.int64())),
                    "actual_seq_len": pa.ListArray.from_arrays(
                        seq_offsets, pa.array(np.array([e for row in ends for e in row], dtype=np.int32))
                    ),
                }
            )
            _release(maps)

    tokens = sum(p.length for p in pieces)
    samples_per_pack = np.array([len(pack) for pack in plan])
    with atomic_dir(cfg.dst, kind="packed", overwrite=cfg.overwrite) as tmp:
        save_tables_to_disk(tables(), tmp, features(PACKED_COLUMNS))
        stats = {
            **samples.as_dict(),  # rows are handled samples
            "src": str(src),
            STATS_SEQ_LENGTH: cfg.seq_length,
            "overlong_policy": cfg.overlong,
            "pad_token_id": pad,
            "samples_in": len(lengths),
            "pieces_packed": len(pieces),
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
            "overlong": overlong,
            "pieces_without_trainable_token": not_packed,
            "plan_seconds": round(plan_seconds, 3),
            "wall_seconds": round(time.monotonic() - started, 3),
        }
        write_json(tmp / STATS_FILE, stats)
    logger.info(
        "packed %d samples (%d tokens) into %d rows of %d: efficiency %.4f (lower bound %d rows); overlong: %s; %s",
        stats["samples_in"],
        tokens,
        len(plan),
        cfg.seq_length,
        stats["efficiency"],
        stats["packs_lower_bound"],
        overlong,
        samples.summary(),
    )
    return Path(cfg.dst)


def build_parser() -> argparse.ArgumentParser:
    return cli.stage_parser("distilled_plugins.pack", __doc__, PackConfig)


def main(argv: list[str] | None = None) -> int:
    cli.start_logging()
    dst = run(from_args(PackConfig, build_parser().parse_args(argv)))
    logger.info("wrote %s", dst)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
