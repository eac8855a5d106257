"""One deferred fine-tune task on the tiny profile, no retries, quick heartbeat checks: the DAG of the tests that
stop training through the REST API and kill a job's supervisor (tests/test_operators_airflow.py)."""

from __future__ import annotations

from airflow.sdk import DAG

from operators import MsrunFinetuneOperator

with DAG(
    "test_finetune_control", schedule=None, params={"config": "", "data": "", "out": "", "port": 8118}
) as finetune_control_dag:
    MsrunFinetuneOperator(
        task_id="finetune",
        config="{{ params.config }}",
        dataset_path="{{ params.data }}",
        output_dir="{{ params.out }}",
        master_port="{{ params.port }}",
        # long enough to be stopped while it trains: 2,000 steps of ~40 ms, where the tests stop it after the first
        overrides={"runner_config.epochs": 200},
        deferrable=True,
        poll_interval=1.0,
        dead_after=10.0,
        retries=0,
    )
