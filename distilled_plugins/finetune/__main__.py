"""``python -m distilled_plugins.finetune``: the stage's CLI (see the package docstring), and the internal
``--supervise JOB_DIR NODE_RANK -- msrun ...`` entry of a node's detached supervisor."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from distilled_plugins.core import cli
from distilled_plugins.core.errors import FinetuneFailed
from distilled_plugins.core.settings import from_args
from distilled_plugins.finetune import FinetuneConfig
from distilled_plugins.finetune import __doc__ as package_doc
from distilled_plugins.finetune.stage import run
from distilled_plugins.finetune.supervisor import supervise


def build_parser() -> argparse.ArgumentParser:
    p = cli.stage_parser("distilled_plugins.finetune", package_doc, FinetuneConfig)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="YAML overrides (dotted keys)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--supervise"]:  # internal: the detached supervisor of one node's msrun
        return supervise(Path(argv[1]), int(argv[2]), argv[4:])
    p = build_parser()
    args = p.parse_args(argv)
    cli.start_logging()
    import yaml

    malformed = [item for item in args.set if "=" not in item or item.startswith("=")]
    if malformed:
        p.error(f"--set expects KEY=VALUE items, got {malformed[0]!r}")
    try:
        overrides = {k: yaml.safe_load(v) for k, _, v in (item.partition("=") for item in args.set)}
    except yaml.YAMLError as e:
        p.error(f"--set: a value is not valid YAML ({' '.join(str(e).split())})")
    log = logging.getLogger(__package__)  # the stage's name, from any of its modules
    try:
        result = run(from_args(FinetuneConfig, args, overrides=overrides))
    except FinetuneFailed as e:  # its message carries the failing worker's log tail: show it, then the one line
        log.error("%s", e)
        return cli.fail(e)
    log.info(
        "checkpoints in %s; metrics %s; loss curve %s", result.checkpoint_dir, result.metrics_file, result.loss_curve
    )
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
