"""The evaluation set, and the completions kept for it: one folder per source and settings.

``<out>/completions/<fingerprint>/`` holds ``settings.json`` (what the fingerprint was taken of), ``problems.jsonl``
(the problems asked) and ``completions.jsonl`` (stage 1's schema), whichever source made them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path

from distilled_plugins.core.artifacts import files_state
from distilled_plugins.core.errors import DataError, MissingColumn
from distilled_plugins.core.io import dumps_line, load_rows, write_json
from distilled_plugins.core.schema import parts_path
from distilled_plugins.evaluate.config import EvalConfig

logger = logging.getLogger(__package__)  # the stage's name, from any of its modules

PROBLEM_COLUMNS = ("problem", "answer", "subject", "level", "unique_id")
SETTINGS_FILE = "settings.json"  # what the completions in a completions folder were made with
COMPLETIONS_DIR = "completions"  # under the output folder: one sub-folder per settings fingerprint
COMPLETIONS_FILE = "completions.jsonl"


def load_problems(path: str | Path, limit: int | None) -> list[dict]:
    rows = load_rows(path)
    if not rows:
        raise DataError(f"{path}: the evaluation set is empty")
    missing = [c for c in PROBLEM_COLUMNS if c not in rows[0]]
    if missing:
        raise MissingColumn(f"{path}: missing column(s) {', '.join(missing)}; columns present: {', '.join(rows[0])}")
    return rows[:limit] if limit else rows


def write_problems(folder: Path, problems: list[dict]) -> Path:
    """The problems as a JSONL file in ``folder``: the input of either source."""
    path = folder / "problems.jsonl"
    path.write_bytes(b"".join(dumps_line(p) for p in problems))
    return path


def settings_fingerprint(cfg: EvalConfig) -> dict:
    """What the stored completions depend on: their source (for a checkpoint, its files' names, sizes and mtimes:
    a new fine-tune into the same folder is another model), the sampling protocol, the problems."""
    return {
        "source": {"endpoints": sorted(e.addr for e in cfg.endpoints or []) or [cfg.api_addr], "model": cfg.model}
        if cfg.api_addr or cfg.endpoints
        else {
            "checkpoint": cfg.checkpoint,
            "checkpoint_files": files_state(Path(cfg.checkpoint)),
            "mindformers_config": cfg.mindformers_config,
            "tokenizer": cfg.tokenizer,
        }
        if cfg.checkpoint
        else {"rescore": cfg.rescore},
        "protocol": asdict(cfg.protocol),
        "dataset": str(cfg.dataset),
        "limit": cfg.limit,
    }


def completions_folder(cfg: EvalConfig) -> Path:
    """The folder of the completions made with these settings: ``<out>/completions/<fingerprint>/``, created with
    its ``settings.json``. Completions made with other settings (an earlier checkpoint, other sampling) stay in
    their own folders, kept aside and never mixed in, so evaluating the same checkpoint again reuses its
    completions and evaluating a new one makes new ones; ``fresh`` discards those of these settings."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: --dst is an existing file; give a folder")
    wanted = settings_fingerprint(cfg)
    digest = hashlib.sha256(json.dumps(wanted, sort_keys=True, default=str).encode()).hexdigest()[:12]
    folder = out / COMPLETIONS_DIR / digest
    folder.mkdir(parents=True, exist_ok=True)
    stored = [p for p in (folder / COMPLETIONS_FILE, parts_path(folder / COMPLETIONS_FILE)) if p.exists()]
    if stored and cfg.fresh:
        logger.info("--fresh: discarding the completions in %s", folder)
        for path in stored:
            path.unlink()
    elif stored:
        logger.info("reusing the completions in %s (made with these settings)", folder)
    write_json(folder / SETTINGS_FILE, wanted)
    return folder
