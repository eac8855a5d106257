"""``python -m distilled_plugins.generate``: the stage's command line (see the package docstring), and its
``--merge SHARD ...`` of shard outputs."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from distilled_plugins.core import cli
from distilled_plugins.core.settings import add_arguments, from_args
from distilled_plugins.generate import __doc__ as package_doc
from distilled_plugins.generate.config import GenerateConfig
from distilled_plugins.generate.merge import merge
from distilled_plugins.generate.stage import run
from distilled_plugins.teacher.batch_api import BatchSettings
from distilled_plugins.teacher.settings import API_KEY_ENV, RequestSettings

logger = logging.getLogger(__package__)  # the stage's name, from any of its modules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m distilled_plugins.generate", description=package_doc.split("\n")[0]
    )
    # --model and --dataset-name are not needed to --merge
    add_arguments(parser, GenerateConfig, optional=("model", "dataset_name"))
    parser.add_argument("--api-key-env", default=API_KEY_ENV, help="environment variable holding the API key")
    parser.add_argument("--merge", nargs="+", metavar="SHARD", help="merge these shard outputs into --dst")
    RequestSettings.add_arguments(parser)
    BatchSettings.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    cli.start_logging()
    args = build_parser().parse_args(argv)
    if args.merge:
        merge(args.merge, args.output_file, args.uuid_column or args.prompt_column)
        return 0
    if not args.model or not args.dataset_name:
        raise ValueError("--model and --dataset-name are required (unless --merge)")
    cfg = from_args(
        GenerateConfig,
        args,
        api_key=os.environ.get(args.api_key_env),
        retry=RequestSettings.from_args(args),
        batch=BatchSettings.from_args(args),
    )
    result = run(cfg)
    logger.info("wrote %s (stats: %s)", result.output_file, result.stats_file)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
