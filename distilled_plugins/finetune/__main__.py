"""``python -m distilled_plugins.finetune``: the stage's CLI (see the package docstring), and the internal
``--supervise JOB_DIR NODE_RANK -- msrun ...`` entry of a node's detached supervisor."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from distilled_plugins import cli, configs
from distilled_plugins.finetune import FinetuneConfig, FinetuneFailed, run
from distilled_plugins.finetune import __doc__ as package_doc
from distilled_plugins.finetune.job import supervise
from distilled_plugins.io import DataError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--supervise"]:  # internal: the detached supervisor of one node's msrun
        return supervise(Path(argv[1]), int(argv[2]), argv[4:])
    p = argparse.ArgumentParser(
        prog="python -m distilled_plugins.finetune",
        description=package_doc.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", default=str(configs.FINETUNE_7B), help="base fine-tune YAML")
    p.add_argument("--dataset-path", required=True, help="packed data folder (stage 4)")
    p.add_argument("--output-dir", required=True, help="the task's folder on shared storage: one job-<id>/ per job")
    p.add_argument("--load-checkpoint", default=None, help="base model weights (default: the YAML's)")
    p.add_argument("--seq-length", type=int, default=None, help="default: the YAML's model seq_length")
    p.add_argument("--worker-num", type=int, default=1, help="workers over all nodes")
    p.add_argument("--local-worker-num", type=int, default=None, help="workers on this node")
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--master-addr", default="127.0.0.1", help="address of node 0 (msrun's scheduler)")
    p.add_argument("--master-port", type=int, default=8118)
    p.add_argument("--stall-timeout", type=float, default=None, help="default: 600 s on CPU, 1800 s on Ascend")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="YAML overrides (dotted keys)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import yaml

    malformed = [item for item in args.set if "=" not in item or item.startswith("=")]
    if malformed:
        p.error(f"--set expects KEY=VALUE items, got {malformed[0]!r}")
    try:
        overrides = {k: yaml.safe_load(v) for k, _, v in (item.partition("=") for item in args.set)}
    except yaml.YAMLError as e:
        p.error(f"--set: a value is not valid YAML ({' '.join(str(e).split())})")
    log = logging.getLogger("distilled_plugins.finetune")
    try:
        result = run(
            FinetuneConfig(
                config=args.config,
                dataset_path=args.dataset_path,
                output_dir=args.output_dir,
                load_checkpoint=args.load_checkpoint,
                seq_length=args.seq_length,
                worker_num=args.worker_num,
                local_worker_num=args.local_worker_num,
                node_rank=args.node_rank,
                master_addr=args.master_addr,
                master_port=args.master_port,
                stall_timeout=args.stall_timeout,
                overrides=overrides,
            )
        )
    except (ValueError, FileNotFoundError, DataError, FinetuneFailed) as e:
        return cli.fail(e)
    log.info(
        "checkpoints in %s; metrics %s; loss curve %s", result.checkpoint_dir, result.metrics_file, result.loss_curve
    )
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
