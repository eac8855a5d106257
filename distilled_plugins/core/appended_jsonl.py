"""JSONL files written by appends (generations, resumable outputs): reading them back when the last append may
have been cut short, and rewriting them whole without the damaged lines."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from distilled_plugins.core.io import atomic_path


def read_appended_jsonl(path: Path) -> tuple[list[dict], int]:
    """Rows of a JSONL file written by appends, and how many bad lines (corrupt or cut short) it had."""
    if not path.exists():
        return [], 0
    rows, bad = [], 0
    with open(path, "rb") as f:
        data = f.read()
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        try:
            rows.append(json.loads(raw))
        except ValueError:
            bad += 1
    if data and not data.endswith(b"\n") and bad == 0:
        # a last line that parsed but lacks its newline was written whole; keep it, newline comes on rewrite
        bad = 1
    return rows, bad


def scan_appended_jsonl(path: Path) -> Iterator[tuple[bytes, dict | None, bool]]:
    """Stream a JSONL file written by appends: ``(line, row, intact)`` per non-blank line, one line in memory.

    ``row`` is None for a corrupt or cut-short line; ``intact`` is False for those and for a last line that
    parsed but lacks its newline (written whole, but the next append would run onto it). A missing file is empty.
    """
    if not path.exists():
        return
    with open(path, "rb") as f:
        for raw in f:
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except ValueError:
                yield raw, None, False
                continue
            if not isinstance(row, dict):
                yield raw, None, False
            elif raw.endswith(b"\n"):
                yield raw, row, True
            else:
                yield raw + b"\n", row, False


def rewrite_jsonl_lines(path: Path, lines: Iterable[bytes]) -> None:
    """Rewrite ``path`` atomically with ``lines`` (bytes ending in a newline), streamed; may read ``path`` itself."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for line in lines:
            f.write(line)
