"""Packed rows as Arrow tables, a few rows per write: each write's pieces are read straight into its output arrays
(one ``preadv`` each), so there are no per-piece copies, and every write makes the same few allocations of the
same size, so the heap does not fragment as the input grows."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from distilled_plugins.core.schema import IGNORE_INDEX
from distilled_plugins.pack import reader
from distilled_plugins.pack.plan import Piece


def packed_tables(
    plan: list[list[int]],
    pieces: list[Piece],
    handled: reader.Handled,
    seq_length: int,
    pad: int,
    rows_per_write: int,
    maps,
) -> Iterator:
    """The packed rows of ``plan`` (indices into ``pieces`` per row), ``rows_per_write`` rows a table; the pages
    of ``maps`` touched by a write are released once the table has been written."""
    for first in range(0, len(plan), rows_per_write):
        packs = [[pieces[i] for i in pack] for pack in plan[first : first + rows_per_write]]
        yield _table(*_fill(packs, handled, seq_length, pad), seq_length)
        reader.release(maps)


def _fill(packs: list[list[Piece]], handled: reader.Handled, seq_length: int, pad: int):
    """``input_ids`` and shifted ``labels`` of ``packs`` (flat, ``seq_length`` a row, padded), and per row the
    cumulative end offset of each piece."""
    out_ids = np.full(len(packs) * seq_length, pad, dtype=np.int32)
    out_labels = np.full(len(packs) * seq_length, IGNORE_INDEX, dtype=np.int64)
    ends = []
    for number, pack in enumerate(packs):
        at = number * seq_length
        row_ends = []
        for piece in pack:
            handled.ids.read_into(piece.row, piece.start, out_ids[at : at + piece.length])
            # labels[1:] of the sample, cut to the piece; the sample's last position gets "+ [pad]"
            shifted = min(piece.start + piece.length + 1, int(handled.lengths[piece.row])) - piece.start - 1
            handled.labels.read_into(piece.row, piece.start + 1, out_labels[at : at + shifted])
            if shifted < piece.length:
                out_labels[at + shifted] = pad
            at += piece.length
            row_ends.append(at - number * seq_length)
        ends.append(row_ends)
    return out_ids, out_labels, ends


def _table(out_ids: np.ndarray, out_labels: np.ndarray, ends: list[list[int]], seq_length: int):
    import pyarrow as pa

    seq_offsets = pa.array(np.cumsum([0] + [len(e) for e in ends]).astype(np.int32))
    row_offsets = pa.array(np.arange(len(ends) + 1, dtype=np.int32) * seq_length)
    return pa.table(
        {
            "input_ids": pa.ListArray.from_arrays(row_offsets, pa.array(out_ids, pa.int32())),
            "labels": pa.ListArray.from_arrays(row_offsets, pa.array(out_labels, pa.int64())),
            "actual_seq_len": pa.ListArray.from_arrays(
                seq_offsets, pa.array(np.array([e for row in ends for e in row], dtype=np.int32))
            ),
        }
    )
