"""A job's checkpoints: the global step a checkpoint holds and the newest one every rank finished (where a retry
resumes)."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ResumePoint:
    """The newest checkpoint every rank finished: its global step and rank 0's file name (mindformers puts each
    rank's id in the name)."""

    step: int
    file_name: str


def checkpoint_step(path: Path) -> int:
    """The global step a safetensors checkpoint holds (its ``step_num``): after a resume mindformers names files by
    the steps of that process, not of the run (a run resumed at step 2 names its step 4 ``...-1_2``)."""
    with open(path, "rb") as f:  # the format: an 8-byte header size, the JSON header, then the tensors' bytes
        header_size = int.from_bytes(f.read(8), "little")
        start, end = json.loads(f.read(header_size))["step_num"]["data_offsets"]
        f.seek(8 + header_size + start)
        return int.from_bytes(f.read(end - start), "little", signed=True)


def resume_point(checkpoint_dir: Path) -> ResumePoint | None:
    """Where a retry resumes, decided before the workers start (on CPU they share no barrier to agree on it).

    A rank's ``meta.json`` names its last checkpoint once the file is complete (mindformers replaces it after the
    save), so a worker killed mid-save leaves its previous one named; the oldest of those, present in every rank,
    is the point. None: some rank finished no checkpoint yet (the job starts from its beginning)."""

    def rank_of(rank_dir: Path) -> int:
        return int(rank_dir.name.removeprefix("rank_"))

    ranks = sorted(Path(checkpoint_dir).glob("rank_*"), key=rank_of)
    last = []
    for rank_dir in ranks:
        try:
            name = json.loads((rank_dir / "meta.json").read_text())["last_ckpt_file"]
            last.append((checkpoint_step(rank_dir / name), rank_dir, name))
        except (OSError, ValueError, KeyError, TypeError):
            return None
    if not last:
        return None
    step, rank_dir, name = min(last, key=lambda found: found[0])
    files = [d / name.replace(f"_rank_{rank_of(rank_dir)}", f"_rank_{rank_of(d)}") for d in ranks]
    with contextlib.suppress(OSError, ValueError, KeyError):
        if all(checkpoint_step(f) == step for f in files):
            return ResumePoint(step, files[0].name)
    return None


def latest_step_checkpoint(checkpoint_dir: Path) -> int:
    """The newest global step every rank finished a checkpoint of (0 when none)."""
    point = resume_point(checkpoint_dir)
    return point.step if point else 0
