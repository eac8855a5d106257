"""Faults on the Celery deployment during one distill_r1 run (broker, database, scheduler, triggerer and a CPU
worker lost mid-run): did the run succeed, was any completion lost or paid twice, did training ever run twice?

    .venv/bin/python bench/chaos.py --json /tmp/chaos.json [--problems 400]

Needs Debian's postgresql and redis-server (as the cluster test). See distilled_plugins/devtools/chaos.py for the
faults and when each happens; the README's "Faults on the cluster" table holds the last run's figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

from distilled_plugins.devtools import chaos


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path, required=True, help="where the figures go")
    p.add_argument("--workdir", type=Path, help="Airflow's home, logs and outputs (default: a new temporary folder)")
    for name, default in chaos.SIZE.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="distill-chaos-"))
    figures = chaos.run(workdir, **{name: getattr(args, name) for name in chaos.SIZE})
    args.json.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps({k: v for k, v in figures.items() if k not in ("tries", "settings")}, indent=2))
    ok = figures["run_state"] == "success" and figures["lost"] == 0 and figures["duplicated"] == 0
    ok = ok and abs(figures["teacher_requests"] - figures["expected_requests"]) <= 0.1 * figures["expected_requests"]
    ok = ok and figures["concurrent_msrun_jobs_max"] <= 1 and not figures["missed_faults"]
    ok = ok and not any("error" in fault for fault in figures["faults"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
