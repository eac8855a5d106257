"""Seed fingerprints: notice that a seed file or folder really changed, cheaply.

Usage:
    python -m distilled_plugins.seed ../shared/data/math_train/math12k_train.parquet --state seed-state.json

A fingerprint lists every data file of the seed with its size, mtime and SHA-256. Checking again stats every
file (cheap) and hashes only the files whose size or mtime moved; the seed changed when a file appeared,
disappeared or hashes differently. So ``touch`` alone changes nothing, and an appended row does. The event
trigger ``operators.seed_watcher.SeedChangeTrigger`` polls with these functions; the CLI does the same once,
for a scheduled job (cron, a ``watch_seed`` DAG) where no triggerer runs: it prints the new fingerprint as JSON
and exits 0 when the seed changed since ``--state``, 3 when it did not.

Only local files and folders are fingerprinted; a hub dataset name is refused with a clear message.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from distilled_plugins.io import count_rows, write_json

logger = logging.getLogger(__name__)

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")
UNCHANGED = 3  # the CLI's exit code when the seed did not change
_CHUNK = 1 << 20


class SeedNotFound(FileNotFoundError):
    pass


@dataclass(frozen=True)
class Fingerprint:
    """What a seed held when it was last looked at: per data file ``[size, mtime_ns, sha256]``."""

    path: str
    files: dict[str, list] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """One hash of the seed's content: file names and content hashes, never sizes or times."""
        content = json.dumps(sorted((name, entry[2]) for name, entry in self.files.items()))
        return hashlib.sha256(content.encode()).hexdigest()[:32]

    def to_json(self) -> dict:
        return {"path": self.path, "files": self.files, "digest": self.digest}

    @classmethod
    def from_json(cls, data: dict | None) -> Fingerprint | None:
        if not data or "files" not in data:
            return None
        return cls(path=data["path"], files={k: list(v) for k, v in data["files"].items()})


@dataclass(frozen=True)
class Check:
    """The outcome of comparing a seed with its previous fingerprint."""

    fingerprint: Fingerprint
    changed: bool  # the content differs (a file added, removed or rewritten)
    stat_changed: bool  # some size or mtime moved (``touch`` moves it without changing the content)
    changed_files: list[str]


def data_files(path: str | Path) -> dict[str, Path]:
    """The seed's data files by name relative to the seed (a single file is named by its own name)."""
    root = Path(path)
    if root.is_file():
        return {root.name: root}
    if root.is_dir():
        return {
            str(p.relative_to(root)): p
            for p in sorted(root.rglob("*"))
            if p.is_file() and p.suffix.lower() in DATA_SUFFIXES and not any(s.startswith(".") for s in p.parts)
        }
    if "/" in str(path) and not str(path).startswith(("/", ".")) and not root.parent.exists():
        raise SeedNotFound(
            f"seed {path}: looks like a hub dataset name; only local files and folders are watched -- "
            "download it to a local folder and point the seed there"
        )
    raise SeedNotFound(f"seed {path}: no such file or folder -- create it or fix the seed path")


def stat_snapshot(path: str | Path) -> dict[str, tuple[int, int]]:
    """``(size, mtime_ns)`` of every data file: two equal snapshots a poll apart mean no writer is busy."""
    return {name: (st.st_size, st.st_mtime_ns) for name, file in data_files(path).items() for st in [file.stat()]}


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check(path: str | Path, previous: Fingerprint | None = None) -> Check:
    """Fingerprint ``path``, hashing only the files whose size or mtime differ from ``previous``.

    >>> import tempfile, os; d = tempfile.mkdtemp(); p = os.path.join(d, "seed.jsonl")
    >>> _ = open(p, "w").write('{"problem": "1+1"}\\n')
    >>> first = check(p).fingerprint
    >>> os.utime(p, ns=(1, 1)); check(p, first).changed
    False
    >>> _ = open(p, "a").write('{"problem": "2+2"}\\n'); check(p, first).changed
    True
    """
    before = previous.files if previous else {}
    files: dict[str, list] = {}
    stat_changed = False
    for name, file in data_files(path).items():
        st = file.stat()
        old = before.get(name)
        if old and old[0] == st.st_size and old[1] == st.st_mtime_ns:
            files[name] = old
            continue
        stat_changed = True
        files[name] = [st.st_size, st.st_mtime_ns, file_hash(file)]
    if set(before) - set(files):
        stat_changed = True
    changed_files = sorted(
        name
        for name in set(before) | set(files)
        if (before.get(name) or [None] * 3)[2] != (files.get(name) or [None] * 3)[2]
    )
    return Check(Fingerprint(str(path), files), bool(changed_files), stat_changed, changed_files)


def rows(path: str | Path) -> int | None:
    """Rows in the seed (jsonl lines, parquet metadata); None when another format is among its files."""
    try:
        return count_rows(list(data_files(path).values()))
    except (OSError, ValueError) as e:
        logger.warning("could not count the rows of %s: %s", path, e)
        return None


def event_extra(path: str | Path, fingerprint: Fingerprint, changed_files: list[str]) -> dict:
    """What a seed event tells the runs it starts: where the seed is, which version, how many rows."""
    return {
        "uri": f"file://{Path(path).resolve()}",
        "path": str(Path(path).resolve()),
        "fingerprint": fingerprint.digest,
        "rows": rows(path),
        "changed_files": changed_files,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m distilled_plugins.seed", description=__doc__.split("\n")[0])
    p.add_argument("seed", help="seed file or folder (jsonl/json/parquet/arrow)")
    p.add_argument("--state", required=True, type=Path, help="JSON file holding the last fingerprint (updated)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    previous = Fingerprint.from_json(json.loads(args.state.read_text())) if args.state.exists() else None
    try:
        result = check(args.seed, previous)
    except SeedNotFound as e:
        logger.error("%s", e)
        return 2
    write_json(args.state, result.fingerprint.to_json())
    if previous is not None and not result.changed:
        logger.info("seed %s unchanged (fingerprint %s)", args.seed, result.fingerprint.digest)
        return UNCHANGED
    print(json.dumps(event_extra(args.seed, result.fingerprint, result.changed_files)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
