"""The stage: get the completions (kept per source and settings), grade them, write the report."""

from __future__ import annotations

import logging
from pathlib import Path

from distilled_plugins.core.errors import DataError
from distilled_plugins.core.io import write_json
from distilled_plugins.core.schema import STATS_FILE
from distilled_plugins.core.stats import Stats
from distilled_plugins.evaluate.checkpoint import completions_from_checkpoint
from distilled_plugins.evaluate.completions import completions_folder, load_problems
from distilled_plugins.evaluate.config import EvalConfig
from distilled_plugins.evaluate.endpoint import completions_from_endpoint
from distilled_plugins.evaluate.report import build_report, read_baseline, write_report
from distilled_plugins.evaluate.scoring import DROP_REASONS, rows_to_score, score

logger = logging.getLogger(__package__)  # the stage's name, from any of its modules


def _completions(cfg: EvalConfig, folder: Path) -> tuple[Path, list[dict] | None]:
    """The completions file to grade and the problems asked (None when rescoring a file made elsewhere)."""
    if cfg.rescore:
        completions = Path(cfg.rescore)
        if not completions.is_file():
            raise DataError(f"{completions}: no such file")
        return completions, None
    problems = load_problems(cfg.dataset, cfg.limit)
    make = completions_from_endpoint if cfg.api_addr or cfg.endpoints else completions_from_checkpoint
    return make(cfg, problems, folder), problems


def run(cfg: EvalConfig) -> Path:
    """Get completions, grade them and write ``report.json``, ``report.md`` and ``accuracy.png`` in ``cfg.out``."""
    out = Path(cfg.out)
    base = read_baseline(cfg.baseline) if cfg.baseline else None  # checked before hours of generation
    completions, problems = _completions(cfg, completions_folder(cfg))
    excluded = Stats("problems", reasons=DROP_REASONS)
    rows = rows_to_score(cfg, completions, problems, excluded)
    write_json(out / STATS_FILE, {**excluded.as_dict(), "completions": str(completions)})
    logger.info("grading %d completions of %d problems", sum(len(r["completions"]) for r in rows), len(rows))
    scored = score(rows, cfg.workers, out / "scored.jsonl")
    report = build_report(cfg, rows, scored, excluded, base)
    report_json, report_md, chart = write_report(report, out)
    logger.info("wrote %s, %s and %s", report_json, report_md, chart)
    logger.info("pass@1 %.2f over the problems scored: %s", report["pass@1"], excluded.summary())
    return report_json
