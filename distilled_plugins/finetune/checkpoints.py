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


def resume_point(checkpoint_dir: Path, below: int | None = None) -> ResumePoint | None:
    """Where a retry resumes, decided before the workers start (on CPU they share no barrier to agree on it): the
    newest step every rank finished a checkpoint of, before step ``below`` if given.

    A rank's ``meta.json`` names its last checkpoint once the file is complete (mindformers replaces it after the
    save), so a worker killed mid-save leaves its previous one named; that file and the older ones are complete.
    ``below``: the job's last step. mindspore cannot resume at the end of the last epoch (a job stopped after its
    final save), so it resumes from the checkpoint before and trains the last steps again. None: no such step in
    every rank (the job starts from its beginning)."""
    finished = []  # per rank, in rank order: {global step: file name} of its complete checkpoints
    for rank_dir in sorted(Path(checkpoint_dir).glob("rank_*"), key=lambda d: int(d.name.removeprefix("rank_"))):
        try:
            last = checkpoint_step(rank_dir / json.loads((rank_dir / "meta.json").read_text())["last_ckpt_file"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        steps = {}
        for path in rank_dir.glob("*.safetensors"):
            with contextlib.suppress(OSError, ValueError, KeyError):
                step = checkpoint_step(path)
                if step <= last:
                    steps[step] = path.name
        finished.append(steps)
    common = set.intersection(*(set(steps) for steps in finished)) if finished else set()
    candidates = [step for step in common if below is None or step < below]
    if not candidates:
        return None
    step = max(candidates)
    return ResumePoint(step, finished[0][step])  # rank 0's name: mindformers puts each rank's id in it


def latest_step_checkpoint(checkpoint_dir: Path) -> int:
    """The newest global step every rank finished a checkpoint of (0 when none)."""
    point = resume_point(checkpoint_dir)
    return point.step if point else 0
