"""Generation in batch mode, deferred while the batch runs, and a one-task DAG that needs a worker slot: the DAGs
of the tests that watch a deferred batch task in a real Airflow (tests/test_operators_airflow.py)."""

from __future__ import annotations

from airflow.sdk import DAG, task

from operators import GenerateReasoningOperator

with DAG("test_generate_batch", schedule=None, params={"seed": "", "out": ""}) as generate_batch_dag:
    GenerateReasoningOperator(
        task_id="generate",
        dataset_name="{{ params.seed }}",
        model="teacher",
        teacher_conn_id="teacher_batch_test",
        output_file="{{ params.out }}/{{ run_id }}/gen.jsonl",
        num_generations=2,
        teacher_mode="batch",
        batch_poll_seconds=0.5,
        max_attempts=1,  # a request that fails once is given up: a user's cancel must not count as a failure
        retries=0,
    )

with DAG("test_slot_probe", schedule=None) as slot_probe_dag:

    @task
    def probe() -> str:
        return "ran"

    probe()
