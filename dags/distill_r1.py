"""Distil DeepSeek-R1 chain-of-thought into Qwen2.5-Math-7B with MindSpore Transformers.

```
shard_plan -> generate[0..N-1] -> merge -> reject_sampling -> handle -> pack -> finetune -> evaluate
choose_source -> seed -> shard_plan
choose_source -> from_openr1 -> handle
choose_source -> from_packed -> finetune
```

**Entry point** (the *source* field): `generate` runs every stage from the seed; `openr1_dataset` starts at
`handle` from OpenR1-Math-220k's distilled parquet; `packed_dataset` starts at `finetune` from a packed
dataset. The stages that do not apply are skipped (grey in the grid).

Artifacts live under `{output_root}/distill_r1/{run_id}/{task_id}/`; XCom carries paths only.

**Start a run**: *Trigger* (top right). Every setting is a field of the form, grouped in sections (Data, Teacher,
Processing, Fine-tune, Multi-node, Evaluation, Output; click a section to open it); the defaults can be submitted
as they are.

**Rerun when the seed changes**: nothing to do. The asset `distill_seed` (its page shows the seed file's URI)
has a watcher: a few seconds after the seed file's content changes (rows appended or replaced; a `touch` alone
does not count) a new run appears by itself, reading the seed named in the event. A hub dataset seed
(`owner/name`) is watched by its commit sha: a new commit starts a run that loads exactly that commit (the
triggerer and workers must reach the hub; where only the workers do, unpause `watch_seed`). A producer can also
announce it: *Assets* > `distill_seed` > *Create Event*, `POST /api/v2/assets/events`, or a task with the asset as outlet.

A run started by the asset uses the deployment's defaults (the Variable `distill_deployment`). Only new problems
go to the teacher: finished generations are reused from `{output_root}/generation_store/`.

**Outlets**: `distill_filtered_dataset`, `distill_packed_dataset`, `distill_model`, `distill_eval_report`; their
events' extra carries the run's figures; `publish_model` is scheduled on `distill_model`.

**When a task fails** its log says, in one line at the top level, what failed and what to do. Errors no retry can
fix (bad configuration, missing files, bad parameters or data) fail the task at once; the others are retried
twice with a growing delay, each task resuming its work.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import DAG, chain

from distilled_plugins.client import RequestSettings
from distilled_plugins.configs import SHARED_DATA
from distilled_plugins.generate import GenerateConfig
from distilled_plugins.handle import HandleConfig
from distilled_plugins.pack import PackConfig
from distilled_plugins.reject_sampling import RejectSamplingConfig
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
from operators.deployment import check_defaults, defaults, output_root, seconds, task_kwargs
from operators.deployment import load as load_deployment
from operators.finetune import node_ranks
from operators.pipeline import field_param, form_param, log_failure_summary, shard_plan
from operators.sources import choose_source, from_openr1, from_packed, seed

# the deployment's configuration, read from the metadata database by the dag-processor and every worker alike:
# the Airflow Variable distill_deployment (operators/deployment.py): queues and pools per task kind, the
# parameters' defaults (also those of runs started without conf, by seed refreshes), the retry delay
DEPLOYMENT = load_deployment()
OUTPUT_ROOT = output_root(DEPLOYMENT)
RETRY_DELAY = timedelta(seconds=seconds(DEPLOYMENT, "retry_delay_seconds"))
RUN_DIR = "{{ params.output_root }}/{{ dag.dag_id }}/{{ run_id }}"
DEFAULTS = defaults(DEPLOYMENT)


def default(name: str, value):
    return DEFAULTS.get(name, value)


# Every setting is a field of the trigger form: a title, a description and a section (the form's collapsible
# groups, shown in this order). To add one, copy an entry: form_param(default("name", value), "Title", SECTION,
# "What it does", **JSON-schema keywords). Optional settings take type=["null", ...] and default None.
DATA, TEACHER, PROCESSING, FINETUNE, MULTINODE, EVALUATION, OUTPUT = (
    "Data",
    "Teacher",
    "Processing",
    "Fine-tune",
    "Multi-node (rarely changed)",
    "Evaluation",
    "Output",
)

params = {
    # ---- Data ----
    "seed_dataset": form_param(
        default("seed_dataset", SEED_PATH),
        "Seed dataset",
        DATA,
        "Problems to distil: a local jsonl/json/parquet/arrow file or folder, or a Hugging Face dataset name",
        type="string",
        minLength=1,
    ),
    "prompt_column": field_param(
        "prompt_column", GenerateConfig, "prompt_column", "Problem column", DATA, DEFAULTS, minLength=1
    ),
    "uuid_column": form_param(
        default("uuid_column", "problem"),
        "Problem id column",
        DATA,
        "Column identifying a problem: generations are stored and reused by it",
        type="string",
        minLength=1,
    ),
    "answer_column": field_param(
        "answer_column", RejectSamplingConfig, "answer_column", "Gold answer column", DATA, DEFAULTS, minLength=1
    ),
    # ---- Data: the entry point (which stages run; the others are skipped) and the inputs each needs ----
    "source": form_param(
        default("source", "generate"),
        "Entry point",
        DATA,
        "generate: from the seed, every stage; openr1_dataset: from OpenR1-Math-220k's distilled parquet, handle "
        "onwards; packed_dataset: from an already packed dataset, fine-tune and evaluate only",
        type="string",
        enum=["generate", "openr1_dataset", "packed_dataset"],
        values_display={
            "generate": "Generate from the seed (every stage)",
            "openr1_dataset": "OpenR1-style distilled dataset (handle onwards)",
            "packed_dataset": "Packed dataset (fine-tune and evaluate)",
        },
    ),
    "openr1_dataset": form_param(
        default("openr1_dataset", f"{OUTPUT_ROOT}/inputs/openr1_math_220k"),
        "OpenR1 dataset",
        DATA,
        "Entry point openr1_dataset: parquet/jsonl file or folder of distilled conversations with a 'messages' "
        "column (OpenR1-Math-220k's data/*.parquet)",
        type="string",
        minLength=1,
    ),
    "packed_dataset": form_param(
        default("packed_dataset", f"{OUTPUT_ROOT}/inputs/packed"),
        "Packed dataset",
        DATA,
        "Entry point packed_dataset: a folder written by python -m distilled_plugins.pack, packed at the "
        "fine-tune profile's seq_length",
        type="string",
        minLength=1,
    ),
    # ---- Teacher ----
    "teacher_conn_id": form_param(
        default("teacher_conn_id", "teacher_default"),
        "Teacher connection",
        TEACHER,
        "Airflow connection of the OpenAI-compatible teacher endpoint (host, port, schema; password = API key)",
        type="string",
        minLength=1,
    ),
    "teacher_model": form_param(
        default("teacher_model", "deepseek-ai/DeepSeek-R1"),
        "Teacher model",
        TEACHER,
        "Model name sent to the teacher endpoint",
        type="string",
        minLength=1,
    ),
    "num_generations": field_param(
        "num_generations", GenerateConfig, "num_generations", "Completions per problem", TEACHER, DEFAULTS, maximum=16
    ),
    "max_tokens": field_param(
        "max_tokens", GenerateConfig, "max_tokens", "Longest completion (tokens)", TEACHER, DEFAULTS, minimum=16
    ),
    "max_concurrent": field_param(
        "max_concurrent", GenerateConfig, "max_concurrent", "Requests in flight", TEACHER, DEFAULTS, maximum=2000
    ),
    "request_attempts": field_param(
        "request_attempts", RequestSettings, "max_attempts", "Attempts per request", TEACHER, DEFAULTS, maximum=50
    ),
    "shards": form_param(
        default("shards", 2),
        "Generation shards",
        TEACHER,
        "Generation tasks run side by side, each on a share of the seed (1 to 64)",
        type="integer",
        minimum=1,
        maximum=64,
    ),
    # requests to the teacher fleet. 0 means "not set here": the teacher connection's extra (endpoints,
    # max_rpm, max_tpm, prices, max_cost) or the server's x-ratelimit headers decide.
    "teacher_max_rpm": form_param(
        default("teacher_max_rpm", 0),
        "Requests per minute per endpoint",
        TEACHER,
        "Rate limit per teacher endpoint (0: from the connection, else learnt from the server)",
        type="number",
        minimum=0,
    ),
    "teacher_max_tpm": form_param(
        default("teacher_max_tpm", 0),
        "Tokens per minute per endpoint",
        TEACHER,
        "Token rate limit per teacher endpoint: prompt + max_tokens until the reply's usage (0: from the connection, else learnt from the server)",
        type="number",
        minimum=0,
    ),
    "teacher_stream": form_param(
        default("teacher_stream", False),
        "Stream replies",
        TEACHER,
        "Server-sent events: keeps minutes-long replies alive through proxies; a cut stream is retried",
        type="boolean",
    ),
    "teacher_request_timeout": form_param(
        default("teacher_request_timeout", 1800),
        "Request timeout (s)",
        TEACHER,
        "Seconds for one whole teacher request, reply included",
        type="number",
        minimum=1,
    ),
    "teacher_price_per_mtok_in": form_param(
        default("teacher_price_per_mtok_in", 0),
        "Price per million prompt tokens",
        TEACHER,
        "For the running cost estimate (0: from the connection, else no estimate)",
        type="number",
        minimum=0,
    ),
    "teacher_price_per_mtok_out": form_param(
        default("teacher_price_per_mtok_out", 0),
        "Price per million completion tokens",
        TEACHER,
        "For the running cost estimate (0: from the connection, else no estimate)",
        type="number",
        minimum=0,
    ),
    "teacher_max_cost": form_param(
        default("teacher_max_cost", 0),
        "Budget per shard task",
        TEACHER,
        "Stop a shard's generation cleanly once its estimated cost reaches this; a rerun resumes (0: from the connection, else no budget)",
        type="number",
        minimum=0,
    ),
    # ---- Processing ----
    "tokenizer_dir": form_param(
        default("tokenizer_dir", str(SHARED_DATA / "tokenizer" / "qwen2.5")),
        "Tokenizer folder",
        PROCESSING,
        "Folder of the Qwen2.5 tokenizer (tokenizer.json with the chat template)",
        type="string",
        minLength=1,
    ),
    "max_length": field_param(
        "max_length", HandleConfig, "max_length", "Longest sample (tokens)", PROCESSING, DEFAULTS
    ),
    "truncation": field_param(
        "truncation",
        HandleConfig,
        "truncation",
        "Samples over the longest length",
        PROCESSING,
        DEFAULTS,
        values_display={
            "tutorial": "Keep the head and the closing tokens (tutorial)",
            "drop": "Drop the sample",
            "none": "Keep it whole",
        },
    ),
    "overlong": field_param(
        "overlong",
        PackConfig,
        "overlong",
        "Samples over the model's sequence length",
        PROCESSING,
        DEFAULTS,
        values_display={"split": "Split into pieces", "truncate": "Truncate", "drop": "Drop the sample"},
    ),
    # ---- Fine-tune ----
    "finetune_config": form_param(
        default("finetune_config", "finetune_qwen_2_5_7b.yaml"),
        "Fine-tune profile",
        FINETUNE,
        "Profile in configs/: the tutorial's 7B recipe on Ascend NPUs, or the tiny CPU model of the demo",
        type="string",
        enum=["finetune_qwen_2_5_7b.yaml", "finetune_tiny_cpu.yaml"],
        values_display={
            "finetune_qwen_2_5_7b.yaml": "Qwen2.5-Math-7B on Ascend",
            "finetune_tiny_cpu.yaml": "Tiny CPU model (demo)",
        },
    ),
    "base_checkpoint": form_param(
        default("base_checkpoint", None),
        "Base checkpoint",
        FINETUNE,
        "Folder of the base model weights (Qwen2.5-Math-7B-Instruct safetensors); leave empty to use the "
        "profile's own load_checkpoint",
        type=["null", "string"],
    ),
    "nodes": form_param(
        default("nodes", 1),
        "Training nodes",
        FINETUNE,
        "Machines taking part in fine-tuning (more than 1: set the Multi-node section on each)",
        type="integer",
        minimum=1,
        maximum=512,
    ),
    "workers_per_node": form_param(
        default("workers_per_node", 8),
        "Workers per node",
        FINETUNE,
        "msrun workers (NPUs) per node",
        type="integer",
        minimum=1,
        maximum=16,
    ),
    # ---- Multi-node ----
    "master_addr": form_param(
        default("master_addr", "auto"),
        "Master address",
        MULTINODE,
        "Address of training node 0 (msrun's scheduler), reachable from every node; auto: node 0's host "
        "publishes its own",
        type="string",
        minLength=1,
    ),
    "master_port": form_param(
        default("master_port", 8118),
        "Master port",
        MULTINODE,
        "msrun's master port on node 0 (1024 to 65535)",
        type="integer",
        minimum=1024,
        maximum=65535,
    ),
    # ---- Evaluation ----
    "eval_source": form_param(
        default("eval_source", "checkpoint"),
        "Evaluate",
        EVALUATION,
        "Generate from the fine-tuned checkpoint with mindformers, or ask a model served at an endpoint",
        type="string",
        enum=["checkpoint", "endpoint"],
        values_display={
            "checkpoint": "The fine-tuned checkpoint (mindformers)",
            "endpoint": "A model served at an endpoint",
        },
    ),
    "eval_conn_id": form_param(
        default("eval_conn_id", "eval_endpoint"),
        "Evaluation endpoint connection",
        EVALUATION,
        "Connection of the endpoint serving the fine-tuned model (used when evaluating an endpoint)",
        type="string",
        minLength=1,
    ),
    "eval_model": form_param(
        default("eval_model", "OpenR1-Qwen-7B"),
        "Evaluated model name",
        EVALUATION,
        "Model name at the evaluation endpoint (used when evaluating an endpoint)",
        type="string",
        minLength=1,
    ),
    "eval_samples": form_param(
        default("eval_samples", 4),
        "Samples per problem",
        EVALUATION,
        "Completions per MATH-500 problem; pass@1 is averaged over them (1 to 64)",
        type="integer",
        minimum=1,
        maximum=64,
    ),
    "eval_limit": form_param(
        default("eval_limit", 0),
        "Problems evaluated",
        EVALUATION,
        "Evaluate the first N MATH-500 problems only (0: all 500)",
        type="integer",
        minimum=0,
        maximum=500,
    ),
    "eval_max_new_tokens": form_param(
        default("eval_max_new_tokens", 32768),
        "Longest evaluated completion (tokens)",
        EVALUATION,
        "Longest completion generated per evaluated sample, in tokens",
        type="integer",
        minimum=1,
        maximum=131072,
    ),
    # ---- Output ----
    "output_root": form_param(
        default("output_root", OUTPUT_ROOT),
        "Output folder",
        OUTPUT,
        "Where artifacts ({output_root}/distill_r1/{run_id}/) and the shared generation store live",
        type="string",
        minLength=1,
    ),
}
check_defaults(DEPLOYMENT, params)  # a mistyped name in the Variable is refused

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
    cpu = task_kwargs("cpu", DEPLOYMENT)
    entry = choose_source.override(**cpu)("{{ params.source }}")
    seed_info = seed.override(**cpu)("{{ params.seed_dataset }}")
    openr1 = from_openr1.override(**cpu)("{{ params.openr1_dataset }}")
    prepacked = from_packed.override(**cpu)("{{ params.packed_dataset }}")
    shards = shard_plan.override(task_id="shard_plan", **cpu)("{{ params.shards }}")
    generate = GenerateReasoningOperator.partial(
        task_id="generate",
        **task_kwargs("teacher", DEPLOYMENT),
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
        request_timeout="{{ params.teacher_request_timeout }}",
        max_rpm="{{ params.teacher_max_rpm }}",
        max_tpm="{{ params.teacher_max_tpm }}",
        stream="{{ params.teacher_stream }}",
        price_per_mtok_in="{{ params.teacher_price_per_mtok_in }}",
        price_per_mtok_out="{{ params.teacher_price_per_mtok_out }}",
        max_cost="{{ params.teacher_max_cost }}",
        output_file=RUN_DIR + "/generate/shard-{{ ti.map_index }}.jsonl",
        store_dir="{{ params.output_root }}/generation_store",
    ).expand(shard_index=shards)
    merged = MergeShardsOperator(
        task_id="merge",
        **task_kwargs("cpu", DEPLOYMENT),
        shards=generate.output,
        uuid_column="{{ params.uuid_column }}",
        output_file=RUN_DIR + "/merge/generations.jsonl",
    )
    filtered = RejectSamplingOperator(
        task_id="reject_sampling",
        **task_kwargs("cpu", DEPLOYMENT),
        src=merged.output,
        dst=RUN_DIR + "/reject_sampling/filtered.jsonl",
        answer_column="{{ params.answer_column }}",
        problem_column="{{ params.prompt_column }}",
        outlets=[FILTERED],
    )
    handled = HandleDatasetOperator(
        task_id="handle",
        **task_kwargs("cpu", DEPLOYMENT),
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
        **task_kwargs("cpu", DEPLOYMENT),
        src=handled.output,
        dst=RUN_DIR + "/pack",
        finetune_config="{{ params.finetune_config }}",
        overlong="{{ params.overlong }}",
        outlets=[PACKED],
    )
    # one launcher per training node: the finetune task mapped over the node ranks (README, stage 5)
    finetuned = MsrunFinetuneOperator.partial(
        task_id="finetune",
        **task_kwargs("npu", DEPLOYMENT),
        config="{{ params.finetune_config }}",
        dataset_path="{{ ti.xcom_pull(task_ids='pack') or ti.xcom_pull(task_ids='from_packed') }}",
        trigger_rule="none_failed_min_one_success",
        outlets=[MODEL],
        output_dir=RUN_DIR + "/finetune",
        load_checkpoint="{{ params.base_checkpoint or '' }}",
        worker_num="{{ params.nodes * params.workers_per_node }}",
        local_worker_num="{{ params.workers_per_node }}",
        master_addr="{{ params.master_addr }}",
        master_port="{{ params.master_port }}",
    ).expand(node_rank=node_ranks.override(task_id="node_ranks", **cpu)("{{ params.nodes }}"))
    evaluated = Math500EvalOperator(
        task_id="evaluate",
        **task_kwargs("npu_eval", DEPLOYMENT),
        output_dir=RUN_DIR + "/evaluate",
        source="{{ params.eval_source }}",
        checkpoint="{{ ti.xcom_pull(task_ids='finetune', map_indexes=0)['checkpoint_dir'] }}",
        mindformers_config="{{ params.finetune_config }}",
        prompt_template=GenerateConfig.prompt_template,  # the user turn as the training data had it
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
