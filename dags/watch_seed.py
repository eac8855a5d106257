"""Fallback seed watcher: checks the seed on a schedule and announces the ``distill_seed`` asset when it changed.

Only for deployments where the seed asset's ``AssetWatcher`` cannot run (no triggerer, a seed on a disk the
triggerer does not see, or a hub dataset seed the triggerer cannot reach); created paused: unpause it there. A run
whose check finds no change (or cannot reach the hub) is skipped.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import DAG, Param, task

from operators.dag_helpers import deployment
from operators.dag_helpers.assets import seed_asset
from operators.watch import check_seed

DEPLOYMENT = deployment.load()  # read once for the whole parse
SEED = seed_asset(DEPLOYMENT)

with DAG(
    dag_id="watch_seed",
    description="Announce the distill_seed asset when the seed's content changes (fallback for the watcher)",
    # every watch_seed_seconds of the Variable distill_deployment (operators/dag_helpers/deployment.py), 300 by default
    schedule=timedelta(seconds=deployment.seconds(DEPLOYMENT, "watch_seed_seconds")),
    params={
        "seed_path": Param(
            SEED.path,
            type="string",
            minLength=1,
            description="Seed to fingerprint: a file or folder, or a Hugging Face dataset name",
        ),
    },
    is_paused_upon_creation=True,
    max_active_runs=1,
    catchup=False,
    tags=["distillation"],
    doc_md=__doc__,
) as dag:
    task(check_seed, task_id="check_seed", outlets=[SEED.asset])("{{ params.seed_path }}")
