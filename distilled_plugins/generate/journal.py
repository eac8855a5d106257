"""What a resumed generate run reads back and writes as it goes: the journal of a shard's output.

The output's rows (their keys are done; a cut-short or repeated line left by a killed run is repaired), the
``.parts`` journal of the completions of rows not yet written, the reused-rows list's path, the output line as
spliced from serialized parts, rows a killed run wrote but had not published to the store, and what the tries
before this one spent (from the stats they wrote).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from distilled_plugins.core.appended_jsonl import rewrite_jsonl_lines, scan_appended_jsonl
from distilled_plugins.core.errors import DataError, MissingColumn
from distilled_plugins.core.io import dumps_line
from distilled_plugins.core.schema import (
    ADDED_BY_GENERATE,
    GENERATIONS_COLUMN,
    REUSED_SUFFIX,
    STATS_SPEND,
    STATS_SPENT_TOTAL,
    row_key,
    sibling_path,
)
from distilled_plugins.generate.config import GenerateConfig
from distilled_plugins.generate.store import GenerationStore
from distilled_plugins.teacher.client import Completion

logger = logging.getLogger(__package__)  # the stage's name, from any of its modules


def generated_json(generated: dict) -> bytes:
    return json.dumps(generated, ensure_ascii=False).encode("utf-8")


def output_line(example: dict, generated: bytes) -> bytes:
    """The output line ``{**example, **generated}``, spliced from serialized parts (no re-encoding of the text).

    >>> output_line({"a": 1}, b'{"generations": ["x"]}')
    b'{"a": 1, "generations": ["x"]}\\n'
    """
    if any(column in example for column in ADDED_BY_GENERATE):
        return dumps_line({**example, **json.loads(generated)})  # the generated value replaces the seed's
    return splice_line(dumps_line(example), generated)


def splice_line(example_line: bytes, generated: bytes) -> bytes:
    """:func:`output_line` from the example's line as ``dumps_line`` wrote it (no generated column in it).

    >>> splice_line(b'{"a": 1}\\n', b'{"generations": ["x"]}')
    b'{"a": 1, "generations": ["x"]}\\n'
    """
    if example_line == b"{}\n":
        return generated + b"\n"
    return example_line[:-2] + b", " + generated[1:] + b"\n"


def reused_path(output_file: str | Path) -> Path:
    """The list of a shard's rows taken from the generation store: ``shard-0.jsonl`` -> ``shard-0.reused.jsonl``."""
    return sibling_path(output_file, REUSED_SUFFIX)


def load_done(cfg: GenerateConfig, output: Path) -> set[str]:
    """Keys of the rows already in ``output``, streamed; repairs what an interrupted run left (cut-short, twice)."""
    done, bad, duplicates, unterminated = set(), 0, 0, 0
    for number, (line, row, intact) in enumerate(scan_appended_jsonl(output), start=1):
        if row is None and line.lstrip().startswith(b"{"):
            bad += 1  # a line cut short by a killed run: repaired below
            continue
        if row is None or GENERATIONS_COLUMN not in row:  # someone else's file: never rewrite it
            raise DataError(
                f"{output}:{number}: not a line written by generate (no {GENERATIONS_COLUMN!r}); the file was "
                "left as it is: give another --dst"
            )
        if cfg.uuid_column not in row:
            raise MissingColumn(
                f"{output}: existing line lacks column {cfg.uuid_column!r}; is it another run's output?"
            )
        key = row_key(row[cfg.uuid_column])
        if key in done:
            duplicates += 1
        done.add(key)
        unterminated += not intact
    if bad or duplicates or unterminated:
        logger.warning(
            "%s: repaired %d cut-short or corrupt line(s) and %d duplicate(s) left by an interrupted run",
            output,
            bad + unterminated,
            duplicates,
        )
        rewrite_jsonl_lines(output, _first_per_key(output, cfg.uuid_column))
    return done


def _first_per_key(path: Path, uuid_column: str):
    seen = set()
    for line, row, _ in scan_appended_jsonl(path):
        if row is not None and (key := row_key(row[uuid_column])) not in seen:
            seen.add(key)
            yield line


def republish(cfg: GenerateConfig, output: Path, done: set[str], store: GenerationStore) -> int:
    """Publish rows of a resumed output that a killed run wrote but had not yet published (reads keys first)."""
    missing = done - store.present(sorted(done))
    if not missing:
        return 0

    def rows():
        for _, row, _ in scan_appended_jsonl(output):
            if row is not None and (key := row_key(row[cfg.uuid_column])) in missing:
                yield key, generated_json({k: row[k] for k in ADDED_BY_GENERATE})

    return store.publish(rows())


def load_parts(parts: Path, num_generations: int, done: set[str]) -> dict[str, dict[int, Completion]]:
    """Journalled completions of rows not written yet; the journal is rewritten without those of written rows."""
    found: dict[str, dict[int, Completion]] = {}
    rewrite = False
    for _, rec, intact in scan_appended_jsonl(parts):
        rewrite |= not intact or (rec is not None and rec.get("key") in done)
        if rec is not None and rec.get("key") not in done and rec.get("i", num_generations) < num_generations:
            found.setdefault(rec["key"], {})[rec["i"]] = Completion(rec["text"], rec["finish_reason"], rec["usage"])
    if rewrite:  # drop corrupt lines and completions of written rows; end a whole last line with its newline
        rewrite_jsonl_lines(
            parts,
            (line for line, rec, _ in scan_appended_jsonl(parts) if rec is not None and rec.get("key") not in done),
        )
    return found


def spent_before(earlier: dict | None) -> dict:
    """What the tries before this one spent writing the same output (a retried or cleared task's), from the stats
    the last of them wrote: its ``spent_total``.

    >>> first = {"requests_sent": 4, "completions_ok": 4, "prompt_tokens": 40, "completion_tokens": 400,
    ...          "cost_estimate": 0.5}
    >>> first.update(spent_totals(first, spent_before(None)))
    >>> rerun = dict.fromkeys(STATS_SPEND, 0)  # a cleared task finding every row done
    >>> spent_totals(rerun, spent_before(first))["spent_total"]["cost_estimate"]
    0.5
    """
    if earlier is None:
        return dict.fromkeys(STATS_SPEND, 0)
    if STATS_SPENT_TOTAL in earlier:
        return dict(earlier[STATS_SPENT_TOTAL])
    return {key: earlier.get(key, 0) for key in STATS_SPEND}  # stats written before spent_total existed


def spent_totals(stats: dict, before: dict) -> dict:
    """``spent_before`` and ``spent_total`` (this try's figures added), so that a rerun finding every row done
    still reports what the shard cost, not zero."""
    total = {key: before.get(key, 0) + stats[key] for key in STATS_SPEND}
    total["cost_estimate"] = round(total["cost_estimate"], 6)
    return {"spent_before": before, STATS_SPENT_TOTAL: total}
