"""The fingerprint of a job's inputs, which names its folder: the same inputs find the same job again."""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

from distilled_plugins.core.artifacts import files_state
from distilled_plugins.core.io import write_json
from distilled_plugins.core.schema import STATS_FILE
from distilled_plugins.finetune.config import FinetuneConfig

PACKED_DIGEST = ".rows.sha256.json"  # in a packed folder: the rows' digest, valid while its files' state is


def packed_rows_digest(dataset: Path) -> str:
    """SHA-256 of the packed rows (the ``*.arrow`` files' bytes, by name): the same rows packed again, which is
    what a pack rerun on the same input writes, give the same digest although the files are new (their mtimes,
    ``state.json``'s random fingerprint and the stats' timings change). Computed once per state of the files and
    cached beside them (where the folder can be written), so a retry or a clear does not read the rows again."""
    files = sorted(p for p in dataset.glob("*.arrow") if p.is_file())
    state = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    cache = dataset / PACKED_DIGEST
    try:
        cached = json.loads(cache.read_text())
        if cached.get("state") == state:
            return cached["sha256"]
    except (OSError, ValueError, AttributeError):
        pass
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    value = digest.hexdigest()
    with contextlib.suppress(OSError):  # a read-only dataset: computed again next time
        write_json(cache, {"state": state, "sha256": value})
    return value


def fingerprint(cfg: FinetuneConfig, run_config: dict) -> tuple[str, dict]:
    """A hash of what the job trains on: the packed rows (by content: :func:`packed_rows_digest`) and their
    length, the resolved YAML, the workers, and the base checkpoint's files. Returns it with the inputs it hashes."""
    dataset = Path(cfg.dataset_path)
    stats = dataset / STATS_FILE
    checkpoint = run_config.get("load_checkpoint")
    inputs = {
        "config": run_config,
        "worker_num": cfg.worker_num,
        "local_worker_num": cfg.local_worker_num,
        "packed_seq_length": json.loads(stats.read_text()).get("seq_length") if stats.exists() else None,
        "packed_rows_sha256": packed_rows_digest(dataset),
        "base_checkpoint": {"path": str(checkpoint), "files": files_state(Path(str(checkpoint)))}
        if checkpoint
        else None,
    }
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()
    return digest, inputs
