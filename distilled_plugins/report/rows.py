"""The report's one pass over per-row data: acceptance by seed column and the teacher's completion lengths, which
no stats file holds, read from the merged generations and the filtered rows and cached in the run folder."""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from pathlib import Path

from distilled_plugins.core.io import atomic_path, iter_jsonl, read_json_or_none
from distilled_plugins.core.schema import FILTERED, MERGED, ROWS_CACHE

logger = logging.getLogger(__package__)  # the stage's name, from any of its modules
GROUP_COLUMNS = ("level", "subject", "source")  # seed columns acceptance is broken down by, where present


def _signature(path: Path) -> list | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def scan_rows(run_dir: Path) -> dict:
    """:func:`_scan_rows_now`, kept in ``report/rows.json`` while the two files it read are unchanged: the pass
    over a large run's generations is made once, not at every look at its Report tab (a process that may not
    write there, such as a read-only API server, just scans again)."""
    cache = run_dir / ROWS_CACHE
    inputs = {name: _signature(run_dir / name) for name in (MERGED, FILTERED)}
    cached = read_json_or_none(cache)
    if cached and cached.get("inputs") == inputs:
        return cached["rows"]
    rows = _scan_rows_now(run_dir)
    if inputs[MERGED] is not None:
        try:
            with atomic_path(cache) as tmp:
                tmp.write_text(json.dumps({"inputs": inputs, "rows": rows}))
        except OSError as e:
            logger.debug("%s not written: %s", cache, e)
    return rows


def _scan_rows_now(run_dir: Path) -> dict:
    """Acceptance by seed column (merged rows vs kept rows) and the teacher's completion lengths, in one streaming
    pass over each file (flat in memory whatever the row count, but for one integer per completion)."""
    merged, filtered = run_dir / MERGED, run_dir / FILTERED
    groups: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    lengths: list[int] = []
    finish = Counter()
    if merged.exists():
        for _, row in iter_jsonl(merged):
            _count_groups(groups, row, 0)
            for usage, reason in zip(row.get("api_metadata") or [], row.get("finish_reasons") or [], strict=False):
                if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
                    lengths.append(int(usage["completion_tokens"]))
                finish[str(reason)] += 1
    if filtered.exists() and merged.exists():
        for _, row in iter_jsonl(filtered):
            _count_groups(groups, row, 1)
    acceptance = {
        column: {
            value: {"rows": n, "kept": kept, "accepted": round(kept / n, 4) if n else 0.0}
            for value, (n, kept) in sorted(values.items())
        }
        for column, values in groups.items()
    }
    return {"acceptance": acceptance, "completion_tokens": lengths, "finish_reasons": dict(finish)}


def _count_groups(groups: dict[str, dict[str, list[int]]], row: dict, slot: int) -> None:
    """Count ``row`` in its value of each seed column it has: ``slot`` 0 for a merged row, 1 for a kept one."""
    for column in GROUP_COLUMNS:
        if row.get(column) is not None:
            groups[column][str(row[column])][slot] += 1
