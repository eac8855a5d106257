"""A job's checkpoints: the global step a checkpoint holds and the newest one every rank finished (where a retry
resumes)."""

from __future__ import annotations

import contextlib
import json
import os
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
    the steps of that process, not of the run (a run resumed at step 2 names its step 4 ``...-1_2``). A file cut
    short (a save killed midway) raises ValueError."""
    with open(path, "rb") as f:  # the format: an 8-byte header size, the JSON header, then the tensors' bytes
        header_size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_size))
        tensors_end = max(t["data_offsets"][1] for name, t in header.items() if name != "__metadata__")
        if os.fstat(f.fileno()).st_size < 8 + header_size + tensors_end:
            raise ValueError(f"{path}: cut short")
        start, end = header["step_num"]["data_offsets"]
        f.seek(8 + header_size + start)
        return int.from_bytes(f.read(end - start), "little", signed=True)


def resume_point(checkpoint_dir: Path, below: int | None = None) -> ResumePoint | None:
    """Where a retry resumes, decided before the workers start (on CPU they share no barrier to agree on it): the
    newest step every rank finished a checkpoint of, under the same name (rank 0's with each rank's id), before
    step ``below`` if given.

    A rank's ``meta.json`` names its last checkpoint once the file is complete (mindformers replaces it after the
    save), so a worker killed mid-save leaves its previous one named; files of later steps are not counted, nor
    files cut short. ``below``: the job's last step. mindspore cannot resume at the end of the last epoch (a job
    stopped after its final save), so it resumes from the newest checkpoint before it, as the profile keeps them
    (``keep_checkpoint_max``), and trains the last steps again. None: no such checkpoint in every rank (the job
    starts from its beginning)."""
    ranks = sorted(Path(checkpoint_dir).glob("rank_*"), key=_rank_of)
    finished = []  # per rank, in rank order: {file name: global step} of its complete checkpoints
    for rank_dir in ranks:
        try:
            last = checkpoint_step(rank_dir / json.loads((rank_dir / "meta.json").read_text())["last_ckpt_file"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        steps = {}
        for path in rank_dir.glob("*.safetensors"):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                step = checkpoint_step(path)
                if 0 < step <= last:
                    steps[path.name] = step
        finished.append(steps)
    if not finished:
        return None
    first = _rank_of(ranks[0])
    for name, step in sorted(finished[0].items(), key=lambda item: item[1], reverse=True):
        # mindformers names each rank's file after rank 0's, its own id put in (a rank's suffix may differ)
        others = [name.replace(f"_rank_{first}", f"_rank_{_rank_of(d)}") for d in ranks]
        if (below is None or step < below) and all(f.get(n) == step for f, n in zip(finished, others, strict=True)):
            return ResumePoint(step, name)
    return None


def _rank_of(rank_dir: Path) -> int:
    return int(rank_dir.name.removeprefix("rank_"))


def latest_step_checkpoint(checkpoint_dir: Path) -> int:
    """The newest global step every rank finished a checkpoint of (0 when none)."""
    point = resume_point(checkpoint_dir)
    return point.step if point else 0
