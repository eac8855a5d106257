"""``python -m distilled_plugins.reject_sampling``: the stage's command line (see the package docstring)."""

from __future__ import annotations

import argparse
import os
import sys

from distilled_plugins.core import cli
from distilled_plugins.core.settings import add_arguments, from_args
from distilled_plugins.reject_sampling import __doc__ as package_doc
from distilled_plugins.reject_sampling.config import JUDGE_PREFIX, RejectSamplingConfig
from distilled_plugins.reject_sampling.stage import run
from distilled_plugins.teacher.settings import API_KEY_ENV, RequestSettings


def build_parser() -> argparse.ArgumentParser:
    parser = cli.stage_parser("distilled_plugins.reject_sampling", package_doc, RejectSamplingConfig)
    parser.add_argument(
        "--judge-api-key-env", default=API_KEY_ENV, help="environment variable holding the judge's API key"
    )
    # the teacher's request settings, once more for the judge: --judge-max-attempts, --judge-max-rpm, ...
    add_arguments(parser.add_argument_group("judge requests"), RequestSettings, prefix=JUDGE_PREFIX)
    return parser


def main(argv: list[str] | None = None) -> int:
    cli.start_logging()
    args = build_parser().parse_args(argv)
    cfg = from_args(
        RejectSamplingConfig,
        args,
        judge_api_key=os.environ.get(args.judge_api_key_env),
        judge_requests=from_args(RequestSettings, args, prefix=JUDGE_PREFIX),
    )
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
