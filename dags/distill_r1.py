"""Distil DeepSeek-R1 chain-of-thought into Qwen2.5-Math-7B-Instruct with MindSpore Transformers.

choose_source -> seed -> shard_plan -> generate (mapped over shards) -> merge -> reject_sampling -> handle -> pack
              -> from_openr1 -----------------------------------------------------------------> handle
              -> from_packed ------------------------------------------------------------------------------> finetune
finetune -> evaluate

Runs when triggered from the UI (every setting is a parameter of the trigger form) and by itself whenever the
seed's content changes (the seed asset's watcher fires; the run reads the seed from that event). The ``source``
parameter picks the entry point; the stages that do not apply are skipped. Outlets: the filtered and packed
datasets, the fine-tuned model and the evaluation report, as assets other DAGs can schedule on.
Artifacts live under {output_root}/{dag_id}/{run_id}/{task_id}/; XCom carries paths only.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta

from airflow.sdk import DAG, Param, chain

from distilled_plugins.configs import SHARED_DATA
from operators import (
    GenerateReasoningOperator,
    HandleDatasetOperator,
    Math500EvalOperator,
    MergeShardsOperator,
    MsrunFinetuneOperator,
    PackDatasetOperator,
    RejectSamplingOperator,
)
from operators.assets import EVAL_REPORT, FILTERED, MODEL, PACKED, SEED, SEED_PATH
from operators.pipeline import log_failure_summary, shard_plan
from operators.sources import choose_source, from_openr1, from_packed, seed

OUTPUT_ROOT = os.environ.get("DISTILL_OUTPUT_ROOT", "/opt/airflow/distill")
RETRY_DELAY = timedelta(seconds=float(os.environ.get("DISTILL_RETRY_DELAY_SECONDS", "60")))
RUN_DIR = "{{ params.output_root }}/{{ dag.dag_id }}/{{ run_id }}"
# a deployment's own defaults (JSON object of parameter -> value), e.g. for runs started by seed refreshes
DEFAULTS = json.loads(os.environ.get("DISTILL_DEFAULTS", "{}"))


def default(name: str, value):
    return DEFAULTS.get(name, value)


params = {
    "seed_dataset": Param(
        default("seed_dataset", SEED_PATH),
        type="string",
        minLength=1,
        title="Seed dataset",
        description="Problems to distil: a local jsonl/json/parquet/arrow file or folder, or a "
        "Hugging Face dataset name",
    ),
    "prompt_column": Param(
        default("prompt_column", "problem"), type="string", minLength=1, description="Column holding the problem text"
    ),
    "uuid_column": Param(
        default("uuid_column", "problem"),
        type="string",
        minLength=1,
        description="Column identifying a problem (generations are stored and reused by it)",
    ),
    "answer_column": Param(
        default("answer_column", "answer"), type="string", minLength=1, description="Column holding the gold answer"
    ),
    "teacher_conn_id": Param(
        default("teacher_conn_id", "teacher_default"),
        type="string",
        minLength=1,
        description="Airflow connection of the OpenAI-compatible teacher endpoint "
        "(host, port, schema; password = API key)",
    ),
    "teacher_model": Param(
        default("teacher_model", "deepseek-ai/DeepSeek-R1"),
        type="string",
        minLength=1,
        description="Model name sent to the teacher endpoint",
    ),
    "num_generations": Param(
        default("num_generations", 4), type="integer", minimum=1, maximum=16, description="Completions per problem"
    ),
    "max_tokens": Param(
        default("max_tokens", 16384),
        type="integer",
        minimum=16,
        maximum=131072,
        description="Longest teacher completion, in tokens",
    ),
    "max_concurrent": Param(
        default("max_concurrent", 100),
        type="integer",
        minimum=1,
        maximum=2000,
        description="Teacher requests in flight at once, per shard",
    ),
    "request_attempts": Param(
        default("request_attempts", 12),
        type="integer",
        minimum=1,
        maximum=50,
        description="Attempts per teacher request before the shard task fails (it resumes on retry)",
    ),
    "shards": Param(
        default("shards", 2), type="integer", minimum=1, maximum=64, description="Generation tasks run side by side"
    ),
    "tokenizer_dir": Param(
        default("tokenizer_dir", str(SHARED_DATA / "tokenizer" / "qwen2.5")),
        type="string",
        minLength=1,
        description="Folder of the Qwen2.5 tokenizer (tokenizer.json with the chat template)",
    ),
    "max_length": Param(
        default("max_length", 20480),
        type="integer",
        minimum=16,
        maximum=131072,
        description="Longest handled sample; longer ones follow the truncation policy",
    ),
    "truncation": Param(
        default("truncation", "tutorial"),
        type="string",
        enum=["tutorial", "drop", "none"],
        description="Samples over max_length: keep head + closing tokens (tutorial), drop, keep",
    ),
    "overlong": Param(
        default("overlong", "split"),
        type="string",
        enum=["split", "truncate", "drop"],
        description="Packing: samples longer than the model's seq_length are split, truncated or "
        "dropped (always counted)",
    ),
    "finetune_config": Param(
        default("finetune_config", "finetune_qwen_2_5_7b.yaml"),
        type="string",
        enum=["finetune_qwen_2_5_7b.yaml", "finetune_tiny_cpu.yaml"],
        description="Fine-tune profile in configs/: the 7B recipe (Ascend) or the tiny CPU model",
    ),
    "base_checkpoint": Param(
        default("base_checkpoint", ""),
        type="string",
        description="Folder of the base model weights (Qwen2.5-Math-7B-Instruct safetensors); "
        "empty: the profile's own value",
    ),
    "nodes": Param(default("nodes", 1), type="integer", minimum=1, maximum=512, description="Training nodes"),
    "workers_per_node": Param(
        default("workers_per_node", 8),
        type="integer",
        minimum=1,
        maximum=16,
        description="msrun workers (NPUs) per node",
    ),
    "node_rank": Param(
        default("node_rank", 0), type="integer", minimum=0, description="This node's rank among the training nodes"
    ),
    "master_addr": Param(
        default("master_addr", "127.0.0.1"), type="string", minLength=1, description="Address of training node 0"
    ),
    "master_port": Param(
        default("master_port", 8118), type="integer", minimum=1024, maximum=65535, description="msrun's master port"
    ),
    "eval_source": Param(
        default("eval_source", "checkpoint"),
        type="string",
        enum=["checkpoint", "endpoint"],
        description="Evaluate the fine-tuned checkpoint with mindformers, or a model served at an endpoint",
    ),
    "eval_conn_id": Param(
        default("eval_conn_id", "eval_endpoint"),
        type="string",
        minLength=1,
        description="Connection of the endpoint serving the fine-tuned model (eval_source endpoint)",
    ),
    "eval_model": Param(
        default("eval_model", "OpenR1-Qwen-7B"), type="string", minLength=1, description="Model name at that endpoint"
    ),
    "eval_samples": Param(
        default("eval_samples", 4), type="integer", minimum=1, maximum=64, description="Samples per MATH-500 problem"
    ),
    "eval_limit": Param(
        default("eval_limit", 0),
        type="integer",
        minimum=0,
        maximum=500,
        description="Evaluate the first N MATH-500 problems only (0: all 500)",
    ),
    "eval_max_new_tokens": Param(
        default("eval_max_new_tokens", 32768),
        type="integer",
        minimum=1,
        maximum=131072,
        description="Longest evaluated completion, in tokens",
    ),
    "output_root": Param(
        default("output_root", OUTPUT_ROOT),
        type="string",
        minLength=1,
        description="Where artifacts and the shared generation store live",
    ),
    # ---- entry point (issue 16): which stages run; the others are skipped ----
    "source": Param(
        default("source", "generate"),
        type="string",
        enum=["generate", "openr1_dataset", "packed_dataset"],
        title="Entry point",
        description="generate: from the seed, every stage; openr1_dataset: from OpenR1-Math-220k's distilled "
        "parquet, handle onwards; packed_dataset: from an already packed dataset, fine-tune and evaluate only",
    ),
    "openr1_dataset": Param(
        default("openr1_dataset", f"{OUTPUT_ROOT}/inputs/openr1_math_220k"),
        type="string",
        minLength=1,
        title="OpenR1 dataset",
        description="Entry point openr1_dataset: parquet/jsonl file or folder of distilled conversations "
        "with a 'messages' column (OpenR1-Math-220k's data/*.parquet)",
    ),
    "packed_dataset": Param(
        default("packed_dataset", f"{OUTPUT_ROOT}/inputs/packed"),
        type="string",
        minLength=1,
        title="Packed dataset",
        description="Entry point packed_dataset: a folder written by python -m distilled_plugins.pack, "
        "packed at the fine-tune profile's seq_length",
    ),
}

default_args = {
    "retries": 2,
    "retry_delay": RETRY_DELAY,
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(hours=1),
    "on_failure_callback": log_failure_summary,
}

with DAG(
    dag_id="distill_r1",
    description="Distil DeepSeek-R1 chain-of-thought into Qwen2.5-Math-7B with MindSpore Transformers",
    schedule=[SEED],
    params=params,
    default_args=default_args,
    max_active_runs=1,
    catchup=False,
    tags=["distillation", "mindformers"],
    doc_md=__doc__,
) as dag:
    entry = choose_source("{{ params.source }}")
    seed_info = seed("{{ params.seed_dataset }}")
    openr1 = from_openr1("{{ params.openr1_dataset }}")
    prepacked = from_packed("{{ params.packed_dataset }}")
    shards = shard_plan.override(task_id="shard_plan")("{{ params.shards }}")
    generate = GenerateReasoningOperator.partial(
        task_id="generate",
        dataset_name="{{ ti.xcom_pull(task_ids='seed', key='seed') }}",
        model="{{ params.teacher_model }}",
        teacher_conn_id="{{ params.teacher_conn_id }}",
        prompt_column="{{ params.prompt_column }}",
        uuid_column="{{ params.uuid_column }}",
        num_generations="{{ params.num_generations }}",
        max_tokens="{{ params.max_tokens }}",
        max_concurrent="{{ params.max_concurrent }}",
        num_shards="{{ params.shards }}",
        max_attempts="{{ params.request_attempts }}",
        output_file=RUN_DIR + "/generate/shard-{{ ti.map_index }}.jsonl",
        store_dir="{{ params.output_root }}/generation_store",
    ).expand(shard_index=shards)
    merged = MergeShardsOperator(
        task_id="merge",
        shards=generate.output,
        uuid_column="{{ params.uuid_column }}",
        output_file=RUN_DIR + "/merge/generations.jsonl",
    )
    filtered = RejectSamplingOperator(
        task_id="reject_sampling",
        src=merged.output,
        dst=RUN_DIR + "/reject_sampling/filtered.jsonl",
        answer_column="{{ params.answer_column }}",
        problem_column="{{ params.prompt_column }}",
        outlets=[FILTERED],
    )
    handled = HandleDatasetOperator(
        task_id="handle",
        # from whichever entry point ran: rejection sampling's output or the OpenR1-style dataset
        src="{{ ti.xcom_pull(task_ids='reject_sampling', key='output') or ti.xcom_pull(task_ids='from_openr1') }}",
        trigger_rule="none_failed_min_one_success",
        dst=RUN_DIR + "/handle",
        tokenizer="{{ params.tokenizer_dir }}",
        max_length="{{ params.max_length }}",
        truncation="{{ params.truncation }}",
    )
    packed = PackDatasetOperator(
        task_id="pack",
        src=handled.output,
        dst=RUN_DIR + "/pack",
        finetune_config="{{ params.finetune_config }}",
        overlong="{{ params.overlong }}",
        outlets=[PACKED],
    )
    finetuned = MsrunFinetuneOperator(
        task_id="finetune",
        config="{{ params.finetune_config }}",
        dataset_path="{{ ti.xcom_pull(task_ids='pack') or ti.xcom_pull(task_ids='from_packed') }}",
        trigger_rule="none_failed_min_one_success",
        outlets=[MODEL],
        output_dir=RUN_DIR + "/finetune",
        load_checkpoint="{{ params.base_checkpoint }}",
        worker_num="{{ params.nodes * params.workers_per_node }}",
        local_worker_num="{{ params.workers_per_node }}",
        node_rank="{{ params.node_rank }}",
        master_addr="{{ params.master_addr }}",
        master_port="{{ params.master_port }}",
    )
    evaluated = Math500EvalOperator(
        task_id="evaluate",
        output_dir=RUN_DIR + "/evaluate",
        source="{{ params.eval_source }}",
        checkpoint=finetuned.output["checkpoint_dir"],
        mindformers_config="{{ params.finetune_config }}",
        endpoint_conn_id="{{ params.eval_conn_id }}",
        model="{{ params.eval_model }}",
        n_samples="{{ params.eval_samples }}",
        limit="{{ params.eval_limit }}",
        max_new_tokens="{{ params.eval_max_new_tokens }}",
        outlets=[EVAL_REPORT],
    )
    chain(entry, seed_info, shards, generate, merged, filtered, handled, packed, finetuned, evaluated)
    chain(entry, openr1, handled)
    chain(entry, prepacked, finetuned)
