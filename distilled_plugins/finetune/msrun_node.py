"""msrun for one node of a multi-node job, where node 0 is the master by rank, not by address.

msrun starts its scheduler on every node whose own addresses include ``--master_addr``. When the nodes share
addresses (containers on host networking, or this project's tests: two "hosts" in UTS namespaces on one network)
every node would start a scheduler, and all but one fail to bind the port and make their msrun exit 1. Here the
node with ``--node_rank=0`` hosts the scheduler and no other does, which is what the job's layout says anyway.

Usage (what :func:`distilled_plugins.finetune.stage.launch` runs when ``nodes > 1``):
    python -m distilled_plugins.finetune.msrun_node --worker_num=2 --local_worker_num=1 --node_rank=1 ...
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    from mindspore.parallel.cluster import run as msrun
    from mindspore.parallel.cluster.process_entity import _api

    rank = next((int(a.split("=", 1)[1]) for a in argv if a.startswith("--node_rank=")), 0)
    _api._is_local_ip = lambda address: rank == 0  # only read to decide "start the scheduler here"
    sys.argv = ["msrun", *argv]
    return msrun.main() or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
