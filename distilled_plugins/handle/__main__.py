"""``python -m distilled_plugins.handle``: the stage's command line (see the package docstring)."""

from __future__ import annotations

import argparse
import logging
import sys

from distilled_plugins.core import cli
from distilled_plugins.core.settings import from_args
from distilled_plugins.handle import __doc__ as package_doc
from distilled_plugins.handle.config import HandleConfig


def build_parser() -> argparse.ArgumentParser:
    return cli.stage_parser("distilled_plugins.handle", package_doc, HandleConfig)


def main(argv: list[str] | None = None) -> int:
    cli.start_logging()
    cfg = from_args(HandleConfig, build_parser().parse_args(argv))
    from distilled_plugins.handle.stage import run  # after parsing: --help loads no numpy

    dst = run(cfg)
    logging.getLogger(__package__).info("wrote %s", dst)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
