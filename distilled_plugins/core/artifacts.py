"""What a stage's output folder is: the marker naming its kind and maker, the checks a stage makes before it reads
an input folder or replaces an output folder, and the cheap state of an input's files a fingerprint covers."""

from __future__ import annotations

import json
import os
from pathlib import Path

from distilled_plugins.core.errors import DataError

# A folder a stage writes holds this file: what kind of artifact it is and which stage made it. A stage replaces
# only its own kind of folder, and refuses an input of the wrong kind, naming what it expected.
ARTIFACT_MARKER = "artifact.json"
ARTIFACT_KINDS = {"handled": "handle (stage 3)", "packed": "pack (stage 4)"}


def artifact_kind(folder: str | Path) -> str | None:
    """The kind recorded in ``folder``'s marker, or None when it has none (not made by a stage of this project)."""
    marker = Path(folder) / ARTIFACT_MARKER
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("kind")
    except (ValueError, AttributeError):
        raise DataError(f"{marker}: not a valid artifact marker (JSON object with 'kind')") from None


def require_artifact(folder: str | Path, kind: str, option: str = "--src") -> None:
    """Fail unless ``folder`` is an existing folder that does not hold another stage's kind of artifact."""
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{folder}: no such folder ({option} expects a {kind} dataset made by {ARTIFACT_KINDS[kind]})")
    if not folder.is_dir():
        raise DataError(f"{folder}: is a file; {option} expects a {kind} dataset folder made by {ARTIFACT_KINDS[kind]}")
    found = artifact_kind(folder)
    if found is not None and found != kind:
        raise DataError(
            f"{folder}: holds a {found} dataset (made by {ARTIFACT_KINDS.get(found, found)}); {option} expects a "
            f"{kind} dataset made by {ARTIFACT_KINDS[kind]}"
        )


def check_output_folder(path: str | Path, kind: str, overwrite: bool = False, option: str = "--dst") -> None:
    """Refuse to replace a folder this stage did not make: a non-empty folder with no marker of ``kind``."""
    path = Path(path)
    if not path.exists() or overwrite:
        return
    if not path.is_dir():
        raise DataError(f"{path}: {option} is an existing file; give a folder path (or --overwrite to replace it)")
    found = artifact_kind(path)
    if found == kind:
        return
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        return
    what = (
        f"holds a {found} dataset"
        if found
        else f"is not empty ({', '.join(entries[:5])}{', ...' if len(entries) > 5 else ''})"
    )
    raise DataError(
        f"{path}: {option} {what} and was not made by {ARTIFACT_KINDS[kind]}; choose another {option} or give "
        "--overwrite to replace it"
    )


def files_state(path: Path) -> list:
    """Name, size and mtime of every file under ``path`` (a file or a folder; stat only, nothing is read): what a
    fingerprint of a large input (packed data, a checkpoint) covers without reading it."""
    if path.is_file():
        st = path.stat()
        return [[path.name, st.st_size, st.st_mtime_ns]]
    if not path.is_dir():
        return [["(missing)", str(path)]]
    state = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            st = (Path(root) / name).stat()
            state.append([str((Path(root) / name).relative_to(path)), st.st_size, st.st_mtime_ns])
    return state
