"""``python -m distilled_plugins.evaluate``: the stage's command line (see the package docstring)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from distilled_plugins.core import cli
from distilled_plugins.core.settings import add_arguments, from_args
from distilled_plugins.evaluate import __doc__ as package_doc
from distilled_plugins.evaluate.config import EvalConfig, Protocol
from distilled_plugins.evaluate.stage import run
from distilled_plugins.teacher.settings import API_KEY_ENV, RequestSettings

logger = logging.getLogger(__package__)  # the stage's name, from any of its modules


def build_parser() -> argparse.ArgumentParser:
    p = cli.stage_parser("distilled_plugins.evaluate", package_doc, EvalConfig)
    p.add_argument("--api-key-env", default=API_KEY_ENV, help="environment variable holding the API key")
    add_arguments(p.add_argument_group("sampling protocol"), Protocol)
    RequestSettings.add_arguments(p)  # the same request flags as generate: one definition
    return p


def main(argv: list[str] | None = None) -> int:
    cli.start_logging()
    args = build_parser().parse_args(argv)
    report = run(
        from_args(
            EvalConfig,
            args,
            protocol=from_args(Protocol, args),
            api_key=os.environ.get(args.api_key_env),
            retry=RequestSettings.from_args(args),
        )
    )
    summary = json.loads(report.read_text())
    logger.info(  # the one line with the result (the operator logs its own, the engine none)
        "pass@1 %.2f%% (95%% CI %s) over %d problems x %d samples; report %s",
        summary["pass@1"],
        summary["ci95"],
        summary["problems"],
        summary["protocol"]["n_samples"],
        report,
    )
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
