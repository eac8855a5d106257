"""``python -m distilled_plugins.report``: the stage's command line (see the package docstring)."""

from __future__ import annotations

import argparse
import sys

from distilled_plugins.core import cli
from distilled_plugins.core.settings import from_args
from distilled_plugins.report import __doc__ as package_doc
from distilled_plugins.report.config import ReportConfig
from distilled_plugins.report.stage import run


def build_parser() -> argparse.ArgumentParser:
    return cli.stage_parser("distilled_plugins.report", package_doc, ReportConfig)


def main(argv: list[str] | None = None) -> int:
    cli.start_logging()
    args = build_parser().parse_args(argv)
    print(run(from_args(ReportConfig, args)))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
