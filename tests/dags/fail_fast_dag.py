"""A fine-tune whose base checkpoint does not exist, with retries Airflow must not use: the DAG of the test
that a missing checkpoint fails at once with its line at the log's top level (tests/test_operators_airflow.py)."""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import DAG

from operators import MsrunFinetuneOperator
from operators.dag_helpers.failures import log_failure_summary

with DAG("test_fail_fast", schedule=None, params={"data": "", "out": "", "port": 8118}):
    MsrunFinetuneOperator(
        task_id="finetune",
        config="finetune_tiny_cpu.yaml",
        dataset_path="{{ params.data }}",
        output_dir="{{ params.out }}/{{ run_id }}",
        load_checkpoint="/nonexistent/Qwen2.5-Math-7B-Instruct",
        master_port="{{ params.port }}",
        retries=2,
        retry_delay=timedelta(seconds=30),
        on_failure_callback=log_failure_summary,
    )
