"""The generation store: finished generations keyed by (settings hash, row key), shared by runs and shards.

Usage:
    python -m distilled_plugins.generate.store --store-dir out/generation_store   # size and entries per settings hash

One SQLite file, ``{store_dir}/generations.sqlite``: a table with one entry per (settings hash, row key) holding
the generated columns of a row (``generations``, ``finish_reasons``, ``api_metadata``, ``prompt``) as
JSON compressed with zstd (level 1, through pyarrow's codec: ~2.6x on completions, and fast
to read back, which is what a rerun mostly does). Lookups are by key, in batches of ``IN`` queries, so a run reads only the rows of the shard
at hand; publishing is ``INSERT OR IGNORE`` in short transactions, so only new rows are written and several
publisher processes may write at once (``busy_timeout`` makes them wait for each other's commits).

Journal mode: WAL by default (readers never block the writer). WAL needs shared memory between the processes, so
all of them must run on one host; for publishers on several hosts sharing the store over NFS set
``DISTILL_STORE_JOURNAL=delete`` (rollback journal, relying on the filesystem's locks) or give each host its own
store folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

STORE_FILE = "generations.sqlite"
JOURNAL_ENV = "DISTILL_STORE_JOURNAL"
JOURNAL_MODES = ("wal", "delete")
# SQLite's default limit on host parameters is 32,766 since 3.32; stay far below, and keep transactions short
LOOKUP_BATCH = 500
PUBLISH_BATCH = 64
BUSY_TIMEOUT_MS = 120_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS generations (
    settings TEXT NOT NULL,
    key TEXT NOT NULL,
    size INTEGER NOT NULL,
    data BLOB NOT NULL,
    UNIQUE (settings, key)
)
"""


class GenerationStore:
    """Finished rows of one settings hash; ``counts`` says what this instance read and wrote.

    >>> import tempfile
    >>> with GenerationStore(tempfile.mkdtemp(), "s1") as store:
    ...     store.publish([("k1", b'{"generations": ["x"]}')])
    ...     dict(store.lookup(["k1", "k2"]))
    1
    {'k1': b'{"generations": ["x"]}'}
    """

    def __init__(self, store_dir: str | Path, settings: str, journal_mode: str | None = None):
        journal_mode = (journal_mode or os.environ.get(JOURNAL_ENV) or "wal").lower()
        if journal_mode not in JOURNAL_MODES:
            raise ValueError(f"Invalid store journal mode {journal_mode!r}, must be one of {JOURNAL_MODES}")
        self.path = Path(store_dir) / STORE_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.settings = settings
        self.counts = Counter(keys_checked=0, keys_looked_up=0, rows_read=0, rows_written=0, rows_already_stored=0)
        # isolation_level=None: we open transactions ourselves, each short (one batch)
        self.db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        self.db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self._set_journal_mode(journal_mode)
        self.db.execute("PRAGMA synchronous = NORMAL")
        self.db.execute(_SCHEMA)
        import pyarrow as pa

        self.codec = pa.Codec("zstd", compression_level=1)

    def _set_journal_mode(self, journal_mode: str) -> None:
        """Switch the file's journal (WAL stays set in the file). Two processes creating the store at once can
        be refused the switch at once ("database is locked": SQLite does not wait on busy_timeout for it), so
        the switch is asked again for up to the busy timeout."""
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                if self.db.execute("PRAGMA journal_mode").fetchone()[0].lower() != journal_mode:
                    self.db.execute(f"PRAGMA journal_mode = {journal_mode}")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def __enter__(self) -> GenerationStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.db is not None:
            try:
                # fold the write-ahead log back into the database; a busy reader just leaves it for later
                self.db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            finally:
                self.db.close()
                self.db = None

    def lookup(self, keys: Iterable[str]) -> Iterator[tuple[str, bytes]]:
        """Yield ``(key, generated columns as JSON)`` for those of ``keys`` the store holds, batch by batch."""
        for batch in batches(keys, LOOKUP_BATCH):
            self.counts["keys_looked_up"] += len(batch)
            marks = ",".join("?" * len(batch))
            cursor = self.db.execute(
                f"SELECT key, size, data FROM generations WHERE settings = ? AND key IN ({marks})",
                (self.settings, *batch),
            )
            for key, size, data in cursor:
                self.counts["rows_read"] += 1
                yield key, self.codec.decompress(data, size, asbytes=True)

    def present(self, keys: Iterable[str]) -> set[str]:
        """Which of ``keys`` the store holds (reads the key index only, no row data)."""
        found = set()
        for batch in batches(keys, LOOKUP_BATCH):
            self.counts["keys_checked"] += len(batch)
            marks = ",".join("?" * len(batch))
            cursor = self.db.execute(
                f"SELECT key FROM generations WHERE settings = ? AND key IN ({marks})", (self.settings, *batch)
            )
            found.update(key for (key,) in cursor)
        return found

    def publish(self, rows: Iterable[tuple[str, bytes]]) -> int:
        """Insert ``(key, JSON)`` rows the store does not hold yet (others are left untouched); return how many."""
        new = 0
        for batch in batches(rows, PUBLISH_BATCH):
            values = [(self.settings, key, len(data), self.codec.compress(data, asbytes=True)) for key, data in batch]
            self.db.execute("BEGIN IMMEDIATE")
            try:
                before = self.db.total_changes
                self.db.executemany(
                    "INSERT OR IGNORE INTO generations (settings, key, size, data) VALUES (?, ?, ?, ?)", values
                )
                added = self.db.total_changes - before
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            new += added
            self.counts["rows_written"] += added
            self.counts["rows_already_stored"] += len(batch) - added
        return new

    def size(self) -> dict:
        """The store's size on disk and its free (reclaimable) part: the size/compaction line of the stats."""
        page_size = self.db.execute("PRAGMA page_size").fetchone()[0]
        pages = self.db.execute("PRAGMA page_count").fetchone()[0]
        free = self.db.execute("PRAGMA freelist_count").fetchone()[0]
        wal = Path(str(self.path) + "-wal")
        return {
            "path": str(self.path),
            "bytes": pages * page_size,
            "free_bytes": free * page_size,
            "wal_bytes": wal.stat().st_size if wal.exists() else 0,
        }

    def compact(self, min_free_fraction: float = 0.25) -> bool:
        """VACUUM when at least ``min_free_fraction`` of the file is free pages; return whether it ran.

        Entries are only ever added, so free pages come only from an interrupted bulk write; this keeps the
        file from carrying them forever.
        """
        size = self.size()
        if not size["bytes"] or size["free_bytes"] < min_free_fraction * size["bytes"]:
            return False
        self.db.execute("VACUUM")
        return True

    def entries_by_settings(self) -> dict[str, int]:
        """Entries per settings hash (a full index scan: for the CLI report, not for runs)."""
        return dict(self.db.execute("SELECT settings, COUNT(*) FROM generations GROUP BY settings"))


def batches(items: Iterable, size: int) -> Iterator[list]:
    """Lists of ``size`` consecutive items (the last may be shorter)."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m distilled_plugins.generate.store", description=__doc__.split("\n")[0])
    p.add_argument("--store-dir", required=True, help="the generation store folder")
    p.add_argument("--compact", action="store_true", help="VACUUM if a quarter of the file or more is free")
    args = p.parse_args(argv)
    if not (Path(args.store_dir) / STORE_FILE).exists():
        logger.error("%s: no generation store here (expected %s); check --store-dir", args.store_dir, STORE_FILE)
        return 1
    with GenerationStore(args.store_dir, "") as store:
        if args.compact:
            logger.info("compacted: %s", store.compact())
        print(json.dumps({**store.size(), "entries_by_settings": store.entries_by_settings()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
