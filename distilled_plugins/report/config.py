"""The report's settings (its command line's flags)."""

from __future__ import annotations

from dataclasses import dataclass

from distilled_plugins.core.schema import REPORT_FILE
from distilled_plugins.core.settings import setting


@dataclass
class ReportConfig:
    run_dir: str = setting(help="the run's folder: {output_root}/distill_r1/{run_id}", required=True)
    dst: str | None = setting(None, help=f"output HTML file (default: {{run_dir}}/{REPORT_FILE})")
    previous: str | None = setting(
        None,
        help="run folder to compare MATH-500 with (default: the latest other run beside this one whose "
        "evaluation report was written before this run's)",
    )
