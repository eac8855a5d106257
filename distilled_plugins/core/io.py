"""Reading rows and writing files: the one place that knows row file formats (JSONL, JSON, parquet, Arrow,
``save_to_disk`` folders, hub datasets) and atomic writes.

What an output folder is (its artifact marker) lives in :mod:`.artifacts`; JSONL files written by appends are
read back and repaired by :mod:`.appended_jsonl`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from distilled_plugins.core.artifacts import ARTIFACT_KINDS, ARTIFACT_MARKER, check_output_folder
from distilled_plugins.core.errors import DataError, MissingColumn

logger = logging.getLogger(__name__)

ROW_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")
# a Hugging Face dataset: hf://datasets/owner/name[@revision], or owner/name[@revision]
HUB_PREFIX = "hf://datasets/"
_HUB_NAME = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
_SAVE_TO_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, row)`` from a JSON Lines file, streaming; a bad line names the file and line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError for binary files
                if (kind := _binary_format(path)) is not None:
                    raise DataError(
                        f"{path}: not a JSON Lines file (one JSON object per line): it looks like {kind}"
                    ) from None
                detail = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else "not UTF-8"
                raise DataError(f"{path}:{lineno}: malformed JSON ({detail})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def _binary_format(path: str | Path) -> str | None:
    """What a binary file looks like from its first bytes (for error messages); None for text."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"PAR1"):
        return "a parquet file"
    if head.startswith((b"ARROW1", b"\xff\xff\xff\xff")):
        return "an Arrow file"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # not just a character cut at the end of the sample
            return "a binary file"
    return None


def read_json(path: str | Path, what: str = "JSON document") -> dict:
    """A small JSON object (stats, markers), failing with the file's name when it is not one."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a valid {what} ({e}); rerun the stage that wrote it") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: not a valid {what} (expected a JSON object)")
    return value


def read_json_or_none(path: str | Path) -> dict | None:
    """A JSON document another stage writes, or ``None`` while it is missing or being replaced (a run in
    progress, an earlier try that stopped before writing it)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):  # another error (permissions, I/O) is not "nothing yet": it surfaces
        return None


def _read_arrow(path: Path) -> list[dict]:
    import pyarrow as pa

    # datasets writes the IPC stream format; other tools write the file format.
    try:
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_stream(source).read_all().to_pylist()
    except pa.ArrowInvalid:
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_file(source).read_all().to_pylist()


def _read_file(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return [row for _, row in iter_jsonl(path)]
    if suffix == ".json":
        text = path.read_text(encoding="utf-8")
        stripped = text.lstrip()
        if stripped.startswith("["):
            rows = json.loads(text)
            if not all(isinstance(r, dict) for r in rows):
                raise DataError(f"{path}: expected a JSON array of objects")
            return rows
        return [row for _, row in iter_jsonl(path)]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if suffix == ".arrow":
        return _read_arrow(path)
    raise DataError(f"{path}: unsupported file type {suffix!r}, expected one of {ROW_FILE_SUFFIXES}")


def load_rows(source: str | Path, split: str = "train") -> list[dict]:
    """Rows of a local file or folder (jsonl, json, parquet, arrow, ``save_to_disk``) or of a hub dataset."""
    path = Path(source).expanduser()
    if path.is_dir():
        if any((path / marker).exists() for marker in _SAVE_TO_DISK_MARKERS):
            import datasets

            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DataError(f"{path}: no split {split!r}; splits are {sorted(loaded)}")
                loaded = loaded[split]
            return loaded.to_list()
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in ROW_FILE_SUFFIXES)
        if not files:
            raise DataError(f"{path}: folder holds no {', '.join(ROW_FILE_SUFFIXES)} files")
        return [row for f in files for row in _read_file(f)]
    if path.is_file():
        return _read_file(path)
    if path.suffix.lower() in ROW_FILE_SUFFIXES or str(source).startswith((".", "/", "~")):
        raise DataError(f"{source}: no such file or folder")
    import datasets

    hub = hub_seed(source)
    repo, revision = (hub.repo, hub.revision) if hub else (str(source), None)
    logger.info(
        "%s is not a local path; loading split %r of hub dataset %s at revision %s",
        source,
        split,
        repo,
        revision or "main",
    )
    try:
        return datasets.load_dataset(repo, revision=revision, split=split).to_list()
    except Exception as e:  # the hub raises many types; one clear message is what the user needs
        raise DataError(f"{source!r} is neither a local file or folder nor a loadable hub dataset: {e}") from e


def iter_rows(source: str | Path, split: str = "train") -> Iterator[dict]:
    """The rows :func:`load_rows` returns, streamed for a local jsonl or parquet file (others are loaded whole)."""
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() == ".jsonl":
        for _, row in iter_jsonl(path):
            yield row
    elif path.is_file() and path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
    else:
        yield from load_rows(source, split)


def require_columns(rows: list[dict], columns: list[str], source: str | Path) -> None:
    """Fail naming the missing column and listing those present (checked on the first row)."""
    present = list(rows[0]) if rows else []
    for column in columns:
        if column not in present:
            raise MissingColumn(f"{source}: column {column!r} not found; columns present: {', '.join(present)}")


# the temporary siblings atomic_path and atomic_dir write, named with their writer's pid
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)(?:\.staging\.arrow)?$")


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Remove temporary siblings of ``path`` left by killed runs of this host (their process is gone)."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for candidate in path.parent.glob(f".{glob_escape(path.name)}.*-*"):
        match = _TEMP_NAME.match(candidate.name)
        if not match or match["name"] != path.name or _pid_alive(int(match["pid"])):
            continue
        if candidate.is_dir():
            import shutil

            shutil.rmtree(candidate, ignore_errors=True)
        else:
            candidate.unlink(missing_ok=True)
        removed.append(candidate)
    if removed:
        logger.info("removed %d temporary file(s) left by an interrupted run: %s", len(removed), removed[0].name)
    return removed


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != 0


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it replaces ``path`` in one rename, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            if tmp.is_dir():
                import shutil

                shutil.rmtree(tmp)
            else:
                tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path, kind: str | None = None, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling folder; on success it replaces ``path`` (an old one is removed).

    With ``kind``, an existing ``path`` is replaced only if it is empty or holds that kind of artifact (or
    ``overwrite`` is set), and the new folder gets the marker saying what it holds.
    """
    import shutil

    path = Path(path)
    if kind is not None:
        check_output_folder(path, kind, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if kind is not None:
            (tmp / ARTIFACT_MARKER).write_text(json.dumps({"kind": kind, "made_by": ARTIFACT_KINDS[kind]}) + "\n")
        yield tmp
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            if path.is_dir():
                os.replace(path, old)
            else:
                path.unlink()
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def count_rows(paths: list[str | Path]) -> int | None:
    """Rows in jsonl and parquet files, cheaply (lines, metadata); None when another format is among them."""
    total = 0
    for path in map(Path, paths):
        if path.is_file() and path.suffix.lower() == ".jsonl":
            with open(path, "rb") as f:
                total += sum(1 for line in f if line.strip())
        elif path.is_file() and path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            total += pq.ParquetFile(path).metadata.num_rows
        else:
            return None
    return total


def iter_column_batches(paths: list[str | Path], column: str, batch_size: int) -> Iterator[list]:
    """Stream one column of jsonl/parquet files (others are loaded whole) in lists of ``batch_size`` values."""
    for path in map(Path, paths):
        if not path.exists():
            raise DataError(f"{path}: no such file or folder")
        if path.is_file() and path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            parquet = pq.ParquetFile(path)
            if column not in parquet.schema_arrow.names:
                raise MissingColumn(
                    f"{path}: column {column!r} not found; columns present: {', '.join(parquet.schema_arrow.names)}"
                )
            for batch in parquet.iter_batches(batch_size=batch_size, columns=[column]):
                yield batch.column(0).to_pylist()
        elif path.is_file() and path.suffix.lower() == ".jsonl":
            batch = []
            for lineno, row in iter_jsonl(path):
                if column not in row:
                    raise MissingColumn(
                        f"{path}:{lineno}: column {column!r} not found; columns present: {', '.join(row)}"
                    )
                batch.append(row[column])
                if len(batch) == batch_size:
                    yield batch
                    batch = []
            if batch:
                yield batch
        else:
            rows = load_rows(path)
            require_columns(rows, [column], path)
            for start in range(0, len(rows), batch_size):
                yield [row[column] for row in rows[start : start + batch_size]]


MAX_SHARD_BYTES = 500 * 10**6  # as save_to_disk's default max_shard_size


def save_tables_to_disk(tables: Iterable, dst: Path, features) -> int:
    """Write Arrow tables, streamed, as a ``datasets`` folder (``save_to_disk`` layout) at ``dst``; return rows.

    Each table goes straight into the current shard file (a new one past 500 MB), and ``state.json`` and
    ``dataset_info.json`` are written as ``save_to_disk`` writes them: memory holds one table at a time and no
    copy of the data is read back (``Dataset.from_file(...).save_to_disk`` would map the whole file into memory).
    """
    import datasets
    from datasets.arrow_writer import ArrowWriter
    from datasets.fingerprint import generate_random_fingerprint
    from datasets.utils.py_utils import asdict

    datasets.disable_progress_bars()  # stages log their own progress lines
    dst.mkdir(parents=True, exist_ok=True)
    parts: list[Path] = []
    writer, rows = None, 0

    def close(writer) -> None:
        writer.finalize()
        writer.close()

    for table in tables:
        if writer is None:
            parts.append(dst / f".part-{len(parts):05d}.arrow")
            writer = ArrowWriter(features=features, path=str(parts[-1]))
        writer.write_table(table)
        rows += table.num_rows
        if writer._num_bytes >= MAX_SHARD_BYTES:
            close(writer)
            writer = None
    if writer is None and not parts:  # no rows: one empty shard, as save_to_disk writes
        parts.append(dst / ".part-00000.arrow")
        writer = ArrowWriter(features=features, path=str(parts[-1]))
    if writer is not None:
        close(writer)
    names = [f"data-{i:05d}-of-{len(parts):05d}.arrow" for i in range(len(parts))]
    for part, name in zip(parts, names, strict=True):
        os.replace(part, dst / name)
    state = {
        "_data_files": [{"filename": name} for name in names],
        "_fingerprint": generate_random_fingerprint(),
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    (dst / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
    info = asdict(datasets.DatasetInfo(features=features))
    (dst / "dataset_info.json").write_text(json.dumps({k: info[k] for k in sorted(info)}, indent=2), encoding="utf-8")
    return rows


def rewrite_jsonl(path: Path, rows: list[dict]) -> Path:
    """Rewrite ``path`` atomically with exactly ``rows`` (its folder made), dropping a half-written or corrupt line;
    returns ``path``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for row in rows:
            f.write(dumps_line(row))
    return path


def write_json(path: str | Path, obj) -> Path:
    """Write a small JSON document atomically (stats, reports)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    return Path(path)


def dumps_line(row: dict) -> bytes:
    """One JSONL line as bytes, ready for a single ``os.write``."""
    return (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")


@dataclass(frozen=True)
class HubSeed:
    """A hub dataset seed: ``repo`` (``owner/name``) at ``revision`` (a branch, tag or commit; None: ``main``)."""

    repo: str
    revision: str | None = None

    @property
    def uri(self) -> str:
        return f"{HUB_PREFIX}{self.repo}" + (f"@{self.revision}" if self.revision else "")

    def pinned(self, sha: str) -> str:
        """The seed name that loads exactly commit ``sha`` (what a run generates from)."""
        return f"{self.repo}@{sha}"


def hub_seed(spec: str | Path) -> HubSeed | None:
    """The hub dataset ``spec`` names, or None for a local path.

    >>> hub_seed("hf://datasets/AI-MO/NuminaMath-TIR@main")
    HubSeed(repo='AI-MO/NuminaMath-TIR', revision='main')
    >>> hub_seed("AI-MO/NuminaMath-TIR"), hub_seed("/data/seed.jsonl"), hub_seed("data/seed.jsonl")
    (HubSeed(repo='AI-MO/NuminaMath-TIR', revision=None), None, None)
    """
    text = str(spec)
    if text.startswith(HUB_PREFIX):
        text = text[len(HUB_PREFIX) :]
    elif text.startswith(("/", ".", "~")) or Path(text).exists() or Path(text.split("/")[0]).exists():
        return None  # a local path (a missing file in an existing local folder is still a local path)
    match = _HUB_NAME.match(text)
    if not match or Path(match["repo"]).suffix.lower() in ROW_FILE_SUFFIXES:
        return None
    return HubSeed(match["repo"], match["revision"])
