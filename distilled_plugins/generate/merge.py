"""``--merge``: the shard outputs of a generate run joined into one file, rows sorted by key, each seed row once;
a shard's reused rows filled in from the generation store."""

from __future__ import annotations

import heapq
import json
import logging
import os
import time
from array import array
from collections.abc import Iterator
from pathlib import Path

from distilled_plugins.core.appended_jsonl import scan_appended_jsonl
from distilled_plugins.core.errors import DataError, MissingColumn
from distilled_plugins.core.io import atomic_path, write_json
from distilled_plugins.core.schema import ADDED_BY_GENERATE, REUSED_HEADER, row_key, stats_path
from distilled_plugins.core.stats import Stats
from distilled_plugins.generate.config import MERGE_DROP_REASONS
from distilled_plugins.generate.journal import output_line, reused_path, splice_line
from distilled_plugins.generate.store import STORE_FILE, GenerationStore

logger = logging.getLogger(__package__)  # the stage's name, from any of its modules

# rows of a shard's reused list that merge takes from the store per lookup (each row is held until written)
MERGE_LOOKUP_BATCH = 32


def _index(path: Path, uuid_column: str, skip: int = 0):
    """Keys (sorted, ``S32``), offsets and lengths of the lines of a JSONL file after its first ``skip`` lines.

    Keys (32 ASCII bytes), offsets and lengths take 48 bytes a row in NumPy arrays, not Python tuples, so a
    shard of 100,000 rows indexes in ~5 MB; the merge makes its tuples one by one as it takes them.
    """
    import numpy as np  # here, not at the top: the command line imports this module, a run needs no numpy

    keys, offsets, lengths, offset = bytearray(), array("q"), array("q"), 0
    for number, (line, row, intact) in enumerate(scan_appended_jsonl(path)):
        if not intact:
            raise DataError(f"{path}: has a cut-short or corrupt line; resume that shard before merging")
        if number >= skip:
            if uuid_column not in row:
                raise MissingColumn(f"{path}: a row lacks the uuid column {uuid_column!r}")
            keys += row_key(row[uuid_column]).encode()
            offsets.append(offset)
            lengths.append(len(line))
        offset += len(line)
    key_array = np.frombuffer(bytes(keys), dtype="S32")
    del keys
    order = np.argsort(key_array, kind="stable")  # ties (a key twice in one file) keep file order
    return key_array, order, offsets, lengths


def _shard_rows(path: Path, number: int, uuid_column: str) -> Iterator[tuple[bytes, int, int, tuple[int, int]]]:
    """``(key, source number, position, (offset, length))`` of each line of a shard, in key order."""
    keys, order, offsets, lengths = _index(path, uuid_column)
    for position, i in enumerate(order.tolist()):
        yield keys[i].tobytes(), number, position, (offsets[i], lengths[i])


def _reused_header(path: Path) -> dict:
    with open(path, "rb") as f:
        first = f.readline()
    try:
        header = json.loads(first)[REUSED_HEADER]
        return {
            "store_dir": str(header["store_dir"]),
            "settings": str(header["settings"]),
            "uuid_column": header.get("uuid_column"),
        }
    except (ValueError, KeyError, TypeError):
        raise DataError(
            f"{path}: not a reused-rows list written by generate (its first line names no {REUSED_HEADER!r}); "
            "move it away or rerun that shard"
        ) from None


def _reused_rows(
    path: Path, number: int, uuid_column: str, stores: dict[tuple[str, str], GenerationStore]
) -> Iterator[tuple[bytes, int, int, bytes]]:
    """``(key, source number, position, output line)`` of each row of a shard's reused list, in key order.

    Each seed row is spliced with its generated columns from the store, taken ``MERGE_LOOKUP_BATCH`` keys at a
    time in key order, so memory holds one batch of rows.
    """
    header = _reused_header(path)
    if header["uuid_column"] not in (None, uuid_column):
        raise DataError(
            f"{path}: the shard keyed its rows by column {header['uuid_column']!r}, the merge by {uuid_column!r}; "
            f"merge with --uuid-column {header['uuid_column']}"
        )
    keys, order, offsets, lengths = _index(path, uuid_column, skip=1)
    if not len(order):  # a run that reused nothing: the store is not needed (nor pyarrow's codec loaded)
        return
    store_file = Path(header["store_dir"]) / STORE_FILE
    if not store_file.is_file():
        raise DataError(
            f"{path}: lists rows of the generation store {store_file}, which does not exist here; merge where "
            "that store is mounted, or rerun the shard"
        )
    where = (header["store_dir"], header["settings"])
    if where not in stores:
        stores[where] = GenerationStore(header["store_dir"], header["settings"])
    store = stores[where]
    position = 0
    with open(path, "rb") as f:
        for start in range(0, len(order), MERGE_LOOKUP_BATCH):
            batch = order[start : start + MERGE_LOOKUP_BATCH].tolist()
            wanted = [keys[i].decode() for i in batch]
            generated = dict(store.lookup(wanted))
            if len(generated) < len(wanted):
                missing = [key for key in wanted if key not in generated]
                raise DataError(
                    f"{path}: {len(missing)} row(s) it lists (key {missing[0]} first) are not in the generation "
                    f"store {store_file} (settings {header['settings']}); rerun that shard (clear its generate task)"
                )
            for i, key in zip(batch, wanted, strict=True):
                example_line = os.pread(f.fileno(), lengths[i], offsets[i])
                example = json.loads(example_line)
                if any(column in example for column in ADDED_BY_GENERATE):
                    line = output_line(example, generated.pop(key))
                else:
                    line = splice_line(example_line, generated.pop(key))
                yield keys[i].tobytes(), number, position, line
                position += 1


def merge(inputs: list[str | Path], output_file: str | Path, uuid_column: str) -> Path:
    """Join shard outputs into one file: each key once, rows sorted by key so any sharding gives the same file.

    A shard is its output file plus, when it ran with a generation store, its reused list
    (``<stem>.reused.jsonl``): the seed rows whose generated columns merge takes from the store.
    Streams: each file is indexed by key (keys and byte offsets only), the sorted indexes are k-way merged
    (``heapq.merge``) and each row is copied from its shard by offset (or spliced from the store), so memory
    holds one row (one lookup batch) at a time. A key in several shards is kept from the first shard given (its
    reused rows before its own) and counted in the stats as dropped.
    """
    started = time.monotonic()
    paths = [Path(p) for p in inputs]
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path}: no such shard file; check the shard paths (did that generate task run?)")
    rows = Stats("rows", reasons=MERGE_DROP_REASONS)
    stores: dict[tuple[str, str], GenerationStore] = {}
    sources = []
    for number, path in enumerate(paths):
        if reused_path(path).is_file():
            sources.append(_reused_rows(reused_path(path), 2 * number, uuid_column, stores))
        sources.append(_shard_rows(path, 2 * number + 1, uuid_column))
    files = {2 * number + 1: open(path, "rb") for number, path in enumerate(paths)}
    rows_from_store = 0
    try:
        with atomic_path(output_file) as tmp, open(tmp, "wb") as out:
            previous = None
            for key, number, _, row in heapq.merge(*sources):
                rows.read()
                if key == previous:
                    rows.drop("duplicate_key")
                    continue
                previous = key
                if isinstance(row, bytes):  # spliced from the store
                    out.write(row)
                    rows_from_store += 1
                else:
                    out.write(os.pread(files[number].fileno(), row[1], row[0]))
                rows.keep()
    finally:
        for f in files.values():
            f.close()
        for store in stores.values():
            store.close()
    stats = {
        **rows.as_dict(),
        "shards": len(paths),
        "rows_from_store": rows_from_store,
        "wall_seconds": round(time.monotonic() - started, 3),
    }
    write_json(stats_path(output_file), stats)
    logger.info(
        "merged %d shard file(s) into %s: %s (%d from the generation store)",
        len(paths),
        output_file,
        rows.summary(),
        rows_from_store,
    )
    return Path(output_file)
