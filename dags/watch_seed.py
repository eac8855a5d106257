"""Fallback seed watcher: checks the seed on a schedule and announces the ``distill_seed`` asset when it changed.

Only for deployments where the seed asset's ``AssetWatcher`` cannot run (no triggerer, a seed on a disk the
triggerer does not see, or a hub dataset seed the triggerer cannot reach); created paused: unpause it there. A run
whose check finds no change (or cannot reach the hub) is skipped.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import DAG, Param, task

from operators import deployment
from operators.assets import SEED, SEED_PATH
from operators.watch import check_seed

with DAG(
    dag_id="watch_seed",
    description="Announce the distill_seed asset when the seed's content changes (fallback for the watcher)",
    # every watch_seed_seconds of the Variable distill_deployment (operators/deployment.py), 300 by default
    schedule=timedelta(seconds=deployment.seconds(deployment.load(), "watch_seed_seconds")),
    params={
        "seed_path": Param(SEED_PATH, type="string", minLength=1, description="Seed file or folder to fingerprint"),
    },
    is_paused_upon_creation=True,
    max_active_runs=1,
    catchup=False,
    tags=["distillation"],
    doc_md=__doc__,
) as dag:
    task(check_seed, task_id="check_seed", outlets=[SEED])("{{ params.seed_path }}")
