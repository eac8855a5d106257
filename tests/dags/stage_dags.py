"""Small one-operator DAGs for the operator tests; paths and settings come from the run's conf (params)."""

from __future__ import annotations

from airflow.sdk import DAG

from operators import (
    GenerateReasoningOperator,
    HandleDatasetOperator,
    Math500EvalOperator,
    MsrunFinetuneOperator,
    PackDatasetOperator,
    RejectSamplingOperator,
)

with DAG("test_generate_operator", schedule=None, params={"seed": "", "out": "", "n": 2}) as generate_dag:
    GenerateReasoningOperator(
        task_id="generate",
        dataset_name="{{ params.seed }}",
        model="teacher",
        teacher_conn_id="teacher_test",
        output_file="{{ params.out }}/{{ dag.dag_id }}/{{ run_id }}/gen.jsonl",
        num_generations="{{ params.n }}",
        max_concurrent=4,
    )

with DAG("test_reject_sampling_operator", schedule=None, params={"src": "", "out": "", "judge": ""}) as reject_dag:
    RejectSamplingOperator(
        task_id="reject_sampling",
        src="{{ params.src }}",
        dst="{{ params.out }}/{{ run_id }}/filtered.jsonl",
        workers=2,
        judge_conn_id="{{ params.judge }}",
        judge_model="judge",
        judge_cache_dir="{{ params.out }}/judge_cache",
    )

with DAG(
    "test_handle_pack_operators", schedule=None, params={"src": "", "tokenizer": "", "out": "", "seq_length": 1024}
) as handle_pack_dag:
    handled = HandleDatasetOperator(
        task_id="handle",
        src="{{ params.src }}",
        tokenizer="{{ params.tokenizer }}",
        dst="{{ params.out }}/{{ run_id }}/handled",
    )
    PackDatasetOperator(
        task_id="pack",
        src=handled.output,
        dst="{{ params.out }}/{{ run_id }}/packed",
        seq_length="{{ params.seq_length }}",
    )

with DAG(
    "test_finetune_operator", schedule=None, params={"config": "", "data": "", "out": "", "port": 8118}
) as finetune_dag:
    MsrunFinetuneOperator(
        task_id="finetune",
        config="{{ params.config }}",
        dataset_path="{{ params.data }}",
        output_dir="{{ params.out }}/{{ run_id }}",
        master_port="{{ params.port }}",
        deferrable=True,
        poll_interval=1.0,
        stall_timeout=600,
    )

with DAG("test_evaluate_operator", schedule=None, params={"out": "", "baseline": ""}) as evaluate_dag:
    Math500EvalOperator(
        task_id="evaluate",
        out="{{ params.out }}/{{ run_id }}",
        endpoint_conn_id="model_endpoint",
        model="reference",
        limit=10,
        n_samples=1,
        baseline="{{ params.baseline }}",
        fail_below_baseline=True,
    )
