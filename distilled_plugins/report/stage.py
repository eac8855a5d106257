"""The report task: collect a run folder's figures, render them and write the page (``report/report.html``)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from distilled_plugins.core.io import atomic_path
from distilled_plugins.core.schema import REPORT_FILE
from distilled_plugins.report.collect import collect
from distilled_plugins.report.config import ReportConfig
from distilled_plugins.report.render import render

logger = logging.getLogger(__package__)  # the stage's name, from any of its modules


def run(cfg: ReportConfig) -> Path:
    """Write the report of ``cfg.run_dir``; return the HTML file's path."""
    run_dir = Path(cfg.run_dir)
    dst = Path(cfg.dst) if cfg.dst else run_dir / REPORT_FILE
    started = time.monotonic()
    page = render(collect(run_dir, cfg.previous))
    with atomic_path(dst) as tmp:
        tmp.write_text(page)
    logger.info("wrote %s (%d KB) in %.1f s", dst, len(page) // 1024, time.monotonic() - started)
    return dst
