"""The first pass of a generate run over the seed: which of the shard's rows to generate, which are done, which
the generation store already holds (listed for merge, or copied into the output), and their journalled
completions."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import BinaryIO

from distilled_plugins.core.errors import DataError, MissingColumn
from distilled_plugins.core.io import atomic_path, dumps_line, iter_rows, require_columns
from distilled_plugins.core.schema import REUSED_HEADER, parts_path, row_key
from distilled_plugins.generate.config import GenerateConfig, prompt_text, shard_of
from distilled_plugins.generate.journal import load_done, load_parts, output_line, republish, reused_path
from distilled_plugins.generate.store import LOOKUP_BATCH, GenerationStore

# examples of the rows to generate kept from the first pass over the seed (else the seed is streamed again)
KEEP_EXAMPLES = 2_000


def seed_rows(cfg: GenerateConfig, wanted: set[str]) -> Iterator[tuple[str, dict]]:
    """Stream the seed again: ``(key, example)`` of each row whose key is in ``wanted``, once (``wanted`` empties)."""
    for example in iter_rows(cfg.dataset_name, cfg.split):
        key = row_key(example[cfg.uuid_column])
        if key in wanted:
            wanted.discard(key)
            yield key, example


def prepare_rows(
    cfg: GenerateConfig, output: Path, store: GenerationStore | None
) -> tuple[set[str], dict, dict[str, dict] | None, dict]:
    """Keys of the rows to generate, their journalled completions, their examples (None: too many to keep), counts.

    One pass over the seed: its keys are checked against the store in batches (the key index only), and a
    stored row is listed in the shard's reused list (``reference``) or copied into ``output`` (``copy``). Memory
    holds the seed's keys, one batch of rows, and the examples of the rows to generate while there are at most
    ``KEEP_EXAMPLES`` of them (then they are dropped and the seed is streamed again as requests are sent).
    """
    started = time.monotonic()
    done = load_done(cfg, output)
    rows = _ShardRows(cfg, output, store, done)
    if store is not None and done:
        rows.info["rows_republished_to_store"] = republish(cfg, output, done, store)
    partial = load_parts(parts_path(output), cfg.num_generations, done)
    if not rows.reference:
        reused_path(output).unlink(missing_ok=True)  # a list left by an earlier run with a store would add rows
    rows.read()
    partial = {key: known for key, known in partial.items() if key in rows.to_generate}
    info = rows.info
    info["generations_resumed"] = sum(map(len, partial.values()))
    info["rows_reused_from_store"] += 0
    rows.timings["prepare_s"] = time.monotonic() - started
    info["timings"] = {name: round(seconds, 3) for name, seconds in rows.timings.items()}
    return rows.to_generate, partial, rows.examples, dict(info)


class _ShardRows:
    """The pass over the seed of :func:`prepare_rows`: its counts, and the rows to generate as they are found."""

    def __init__(self, cfg: GenerateConfig, output: Path, store: GenerationStore | None, done: set[str]):
        self.cfg, self.output, self.store, self.done = cfg, output, store, done
        self.reference = store is not None and cfg.reused_rows == "reference"
        self.info = Counter(seed_rows=0)
        self.timings = Counter()
        self.to_generate: set[str] = set()
        self.examples: dict[str, dict] | None = {}  # of the rows to generate, in seed order
        self.seen: set[str] = set()
        self.batch: list[tuple[str, dict]] = []  # this shard's rows not yet in the output, checked against the store
        self.reused_out: BinaryIO | None = None

    def read(self) -> None:
        cfg = self.cfg
        with ExitStack() as stack:
            if self.reference:
                self.reused_out = self._open_reused_list(stack)
            for example in iter_rows(cfg.dataset_name, cfg.split):
                key = self._key_to_check(example)
                if key is None:
                    continue
                self.batch.append((key, example))
                if len(self.batch) == LOOKUP_BATCH:
                    self._check()
            if not self.info["seed_rows"]:
                raise DataError(f"{cfg.dataset_name}: the seed dataset is empty")
            self._check()

    def _open_reused_list(self, stack: ExitStack) -> BinaryIO:
        out = stack.enter_context(open(stack.enter_context(atomic_path(reused_path(self.output))), "wb"))
        # the path as given (absolute, symlinks kept): shared storage has the same path on every host, not
        # necessarily the same target; the key column, so a merge keyed otherwise is refused by name
        header = {
            "store_dir": str(self.store.path.parent.absolute()),
            "settings": self.store.settings,
            "uuid_column": self.cfg.uuid_column,
        }
        out.write(dumps_line({REUSED_HEADER: header}))
        return out

    def _key_to_check(self, example: dict) -> str | None:
        """The key of a seed row of this shard not yet in the output (counted), else None."""
        cfg, info = self.cfg, self.info
        if not info["seed_rows"]:
            require_columns([example], [cfg.prompt_column, cfg.uuid_column], cfg.dataset_name)
        info["seed_rows"] += 1
        for column in (cfg.prompt_column, cfg.uuid_column):
            if column not in example:
                raise MissingColumn(
                    f"{cfg.dataset_name}: row {info['seed_rows']} has no column {column!r}; "
                    f"columns present: {', '.join(example)}"
                )
        key = row_key(example[cfg.uuid_column])
        if shard_of(key, cfg.num_shards) != cfg.shard_index:
            return None
        if key in self.seen:  # a duplicate falls in its key's shard: each shard counts its own
            info["duplicate_uuids_skipped"] += 1
            return None
        self.seen.add(key)
        info["shard_rows"] += 1
        if key in self.done:
            info["rows_already_done"] += 1
            return None
        return key

    def _check(self) -> None:
        """Check the batch of rows against the store: a stored row is reused, the others are to generate."""
        t0 = time.monotonic()
        stored = self.store.present([key for key, _ in self.batch]) if self.store is not None else set()
        self.timings["store_check_s"] += time.monotonic() - t0
        if stored and not self.reference:
            self._copy_from_store(stored)
        for key, example in self.batch:
            if key in stored:
                if self.reference:
                    self.reused_out.write(dumps_line(example))
                    self.info["rows_reused_from_store"] += 1
                continue
            prompt_text(example[self.cfg.prompt_column])  # checked now, before any request; templated when sent
            self.to_generate.add(key)
            if self.examples is not None:
                self.examples[key] = example
                if len(self.examples) > KEEP_EXAMPLES:
                    self.examples = None
        self.batch.clear()

    def _copy_from_store(self, stored: set[str]) -> None:
        """``copy`` mode: each stored row of the batch goes straight to the output, one at a time."""
        t0 = time.monotonic()
        by_key = {key: example for key, example in self.batch if key in stored}
        with open(self.output, "ab") as f:
            for key, generated in self.store.lookup(list(by_key)):
                f.write(output_line(by_key.pop(key), generated))
                self.info["rows_reused_from_store"] += 1
        self.timings["store_copy_s"] += time.monotonic() - t0
