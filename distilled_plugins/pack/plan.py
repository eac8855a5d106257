"""What goes in which packed row: the overlong policy cuts samples into pieces, pieces without a trainable token
are left out, and best-fit-decreasing places the rest (deterministic)."""

from __future__ import annotations

import bisect
from typing import NamedTuple

import numpy as np

from distilled_plugins.core.schema import IGNORE_INDEX


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
