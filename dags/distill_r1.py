"""Distil DeepSeek-R1 chain-of-thought into Qwen2.5-Math-7B with MindSpore Transformers.

```
shard_plan -> generate[0..N-1] -> merge -> reject_sampling -> handle -> pack -> approve_finetune -> finetune
finetune -> evaluate -> report -> fail_if_stopped
choose_source -> seed -> shard_plan
choose_source -> from_openr1 -> handle
choose_source -> from_packed -> approve_finetune
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

from distilled_plugins.core import schema
from distilled_plugins.core.configs import QWEN_TOKENIZER
from distilled_plugins.core.settings import DATA, EVALUATION, FINETUNE, OUTPUT, PROCESSING, TEACHER
from distilled_plugins.evaluate.config import EvalConfig, Protocol
from distilled_plugins.finetune.config import FinetuneConfig
from distilled_plugins.generate.config import GenerateConfig
from distilled_plugins.handle.config import HandleConfig
from distilled_plugins.pack.config import PackConfig
from distilled_plugins.reject_sampling.config import RejectSamplingConfig
from distilled_plugins.teacher.batch_api import BatchSettings
from distilled_plugins.teacher.settings import RequestSettings
from operators import (
    GenerateReasoningOperator,
    HandleDatasetOperator,
    Math500EvalOperator,
    MergeShardsOperator,
    MsrunFinetuneOperator,
    PackDatasetOperator,
    RejectSamplingOperator,
)
from operators.approval import FinetuneApprovalOperator
from operators.dag_helpers.assets import EVAL_REPORT, FILTERED, MODEL, PACKED, seed_asset
from operators.dag_helpers.deployment import approval, check_defaults, defaults, output_root, seconds, task_kwargs
from operators.dag_helpers.deployment import load as load_deployment
from operators.dag_helpers.failures import log_failure_summary
from operators.dag_helpers.params import field_param, form_param, whole_numbers_in_form
from operators.finetune import node_ranks
from operators.generate import shard_plan
from operators.hooks import CONNECTION_SETTINGS, TeacherEndpointHook
from operators.report import fail_if_stopped, write_report
from operators.sources import ChooseSourceOperator, from_openr1, from_packed, seed

# the deployment's configuration, read from the metadata database by the dag-processor and every worker alike:
# the Airflow Variable distill_deployment (operators/dag_helpers/deployment.py): queues and pools per task kind, the
# parameters' defaults (also those of runs started without conf, by seed refreshes), the retry delay
DEPLOYMENT = load_deployment()  # read once for the whole parse
SEED = seed_asset(DEPLOYMENT)
OUTPUT_ROOT = output_root(DEPLOYMENT)
RETRY_DELAY = timedelta(seconds=seconds(DEPLOYMENT, "retry_delay_seconds"))
RUN_DIR = "{{ params.output_root }}/{{ dag.dag_id }}/{{ run_id }}"
DEFAULTS = defaults(DEPLOYMENT)


def default(name: str, value):
    return DEFAULTS.get(name, value)


# Every setting is a field of the trigger form: a title, a description and a section (the form's collapsible
# groups, shown in the order of settings.SECTIONS). A setting of a stage is a field of that stage's config
# (settings.setting(default, help=..., title=..., section=...)) and its param is field_param("name", Config,
# "field", defaults=DEFAULTS): the default, description, type and range come from the field. Only settings of no
# stage (the seed, the entry point, the connections, the output folder) are written here with form_param.
params = {
    # ---- Data ----
    "seed_dataset": form_param(
        default("seed_dataset", SEED.path),
        "Seed dataset",
        DATA,
        "Problems to distil: a local jsonl/json/parquet/arrow file or folder, or a Hugging Face dataset name",
        type="string",
        minLength=1,
    ),
    "prompt_column": field_param("prompt_column", GenerateConfig, "prompt_column", defaults=DEFAULTS, minLength=1),
    "uuid_column": field_param("uuid_column", GenerateConfig, "uuid_column", defaults=DEFAULTS),
    "answer_column": field_param(
        "answer_column", RejectSamplingConfig, "answer_column", defaults=DEFAULTS, minLength=1
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
    # read only by their own entry point: optional in the form (the run's first task checks the one it needs)
    "openr1_dataset": form_param(
        default("openr1_dataset", f"{OUTPUT_ROOT}/inputs/openr1_math_220k"),
        "OpenR1 dataset",
        DATA,
        "Read only when the entry point is 'OpenR1-style distilled dataset': a parquet/jsonl file or folder of "
        "distilled conversations with a 'messages' column (OpenR1-Math-220k's data/*.parquet)",
        type=["null", "string"],
    ),
    "packed_dataset": form_param(
        default("packed_dataset", f"{OUTPUT_ROOT}/inputs/packed"),
        "Packed dataset",
        DATA,
        "Read only when the entry point is 'Packed dataset': a folder written by this DAG's pack task (or "
        "python -m distilled_plugins.pack), packed at the fine-tune profile's sequence length",
        type=["null", "string"],
    ),
    # ---- Teacher ----
    "teacher_conn_id": form_param(
        default("teacher_conn_id", TeacherEndpointHook.default_conn_name),
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
    "num_generations": field_param("num_generations", GenerateConfig, "num_generations", defaults=DEFAULTS, maximum=16),
    "max_tokens": field_param("max_tokens", GenerateConfig, "max_tokens", defaults=DEFAULTS, minimum=16),
    "max_concurrent": field_param("max_concurrent", GenerateConfig, "max_concurrent", defaults=DEFAULTS, maximum=2000),
    "request_attempts": field_param("request_attempts", RequestSettings, "max_attempts", defaults=DEFAULTS, maximum=50),
    "shards": form_param(
        default("shards", 2),
        "Generation shards",
        TEACHER,
        "Generation tasks run side by side, each on a share of the seed (1 to 64)",
        type="integer",
        minimum=1,
        maximum=64,
    ),
    # the teacher's Batch API (distilled_plugins/generate/batch.py): half the price, results within 24 h, the
    # task deferred meanwhile
    "teacher_mode": field_param(
        "teacher_mode",
        BatchSettings,
        "teacher_mode",
        defaults=DEFAULTS,
        values_display={
            "online": "Online: requests one by one, results as they come",
            "batch": "Batch API: about half the price, results within 24 h (the task waits deferred)",
        },
    ),
    "teacher_batch_poll_seconds": field_param(
        "teacher_batch_poll_seconds", BatchSettings, "batch_poll_seconds", defaults=DEFAULTS
    ),
    # requests to the teacher fleet, from RequestSettings' fields. Left empty (the default), a setting is not set
    # here: the teacher connection's extra decides, else the server's x-ratelimit headers or the built-in default
    **{
        f"teacher_{field}": field_param(
            f"teacher_{field}",
            RequestSettings,
            field,
            defaults=DEFAULTS,
            unset=unset,
            **({"title": "Budget per shard task"} if field == "max_cost" else {}),
        )
        for field, unset in CONNECTION_SETTINGS.items()
    },
    # ---- Processing ----
    "tokenizer_dir": form_param(
        default("tokenizer_dir", str(QWEN_TOKENIZER)),
        "Tokenizer folder",
        PROCESSING,
        "Folder of the Qwen2.5 tokenizer (tokenizer.json with the chat template): the training data is tokenized "
        "with it, and the fine-tuned model's evaluation too. The tiny CPU profile has its own, cut to its "
        "vocabulary: configs/tokenizer_tiny",
        type="string",
        minLength=1,
    ),
    "max_length": field_param("max_length", HandleConfig, "max_length", defaults=DEFAULTS),
    "truncation": field_param(
        "truncation",
        HandleConfig,
        "truncation",
        defaults=DEFAULTS,
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
        defaults=DEFAULTS,
        values_display={"split": "Split into pieces", "truncate": "Truncate", "drop": "Drop the sample"},
    ),
    # rejection sampling's LLM judge, for what math_verify rejects (no connection: math_verify alone), and the
    # difficulty band kept (pass rate: correct / all generations of a problem)
    "judge_conn_id": form_param(
        default("judge_conn_id", None),
        "Judge connection",
        PROCESSING,
        "Airflow connection of an OpenAI-compatible LLM judge asked about the generations math_verify rejects "
        "(host, port, schema; password = API key; extra as the teacher's); empty: no judge",
        type=["null", "string"],
    ),
    "judge_model": field_param("judge_model", RejectSamplingConfig, "judge_model", defaults=DEFAULTS, minLength=1),
    "judge_policy": field_param(
        "judge_policy",
        RejectSamplingConfig,
        "judge_policy",
        defaults=DEFAULTS,
        values_display={
            "recover": "Keep what math_verify or the judge accepts",
            "audit": "Ask and record; keep by math_verify only",
        },
    ),
    "judge_audit_sample": field_param(
        "judge_audit_sample", RejectSamplingConfig, "judge_audit_sample", defaults=DEFAULTS
    ),
    "min_pass_rate": field_param("min_pass_rate", RejectSamplingConfig, "min_pass_rate", defaults=DEFAULTS),
    "max_pass_rate": field_param("max_pass_rate", RejectSamplingConfig, "max_pass_rate", defaults=DEFAULTS),
    # ---- Fine-tune ----
    "finetune_config": field_param(
        "finetune_config",
        FinetuneConfig,
        "config",
        defaults=DEFAULTS,
        enum=["finetune_qwen_2_5_7b.yaml", "finetune_tiny_cpu.yaml"],
        values_display={
            "finetune_qwen_2_5_7b.yaml": "Qwen2.5-Math-7B on Ascend",
            "finetune_tiny_cpu.yaml": "Tiny CPU model (demo)",
        },
    ),
    "base_checkpoint": field_param("base_checkpoint", FinetuneConfig, "load_checkpoint", defaults=DEFAULTS),
    "epochs": field_param("epochs", FinetuneConfig, "epochs", defaults=DEFAULTS, maximum=100),
    "learning_rate": field_param("learning_rate", FinetuneConfig, "learning_rate", defaults=DEFAULTS, maximum=1),
    # the layout of the job: one finetune task (msrun launcher) per node, mapped over the node ranks; the
    # engine's worker_num is nodes x workers_per_node, its local_worker_num workers_per_node
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
    # ---- Fine-tune: the approval gate before it (operators/approval.py) ----
    "approve_before_finetune": form_param(
        default("approve_before_finetune", False),
        "Approve before fine-tuning",
        FINETUNE,
        "Wait after packing until someone approves the data (the task approve_finetune shows its summary and the "
        "report); Reject ends the run without training. Runs started by a seed refresh follow the deployment's "
        "approval.seed_refresh instead",
        type="boolean",
    ),
    # ---- Multi-node ----
    "master_addr": field_param("master_addr", FinetuneConfig, "master_addr", defaults=DEFAULTS, minLength=1),
    "master_port": field_param("master_port", FinetuneConfig, "master_port", defaults=DEFAULTS),
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
    "eval_samples": field_param("eval_samples", Protocol, "n_samples", defaults=DEFAULTS),
    "eval_limit": field_param("eval_limit", EvalConfig, "limit", defaults=DEFAULTS, maximum=500),
    "eval_max_new_tokens": field_param("eval_max_new_tokens", Protocol, "max_new_tokens", defaults=DEFAULTS),
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
whole_numbers_in_form(params)  # the form cannot refuse a fraction: the run's first task does, naming the field

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
    schedule=[SEED.asset],
    params=params,
    default_args=default_args,
    max_active_runs=1,
    catchup=False,
    tags=["distillation", "mindformers"],
    doc_md=__doc__,
) as dag:
    cpu = task_kwargs("cpu", DEPLOYMENT)
    # the run's first task: checks every input the entry point needs (one line per problem), then branches
    entry = ChooseSourceOperator(task_id="choose_source", **cpu)
    seed_info = seed.override(**cpu)("{{ params.seed_dataset }}")
    openr1 = from_openr1.override(**cpu)("{{ params.openr1_dataset }}")
    prepacked = from_packed.override(**cpu)("{{ params.packed_dataset }}", RUN_DIR)
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
        **{name: f"{{{{ params.teacher_{name} }}}}" for name in CONNECTION_SETTINGS},
        teacher_mode="{{ params.teacher_mode }}",
        batch_poll_seconds="{{ params.teacher_batch_poll_seconds }}",
        output_file=f"{RUN_DIR}/{schema.SHARD_OUTPUT.format('{{ ti.map_index }}')}",
        store_dir="{{ params.output_root }}/generation_store",
    ).expand(shard_index=shards)
    merged = MergeShardsOperator(
        task_id="merge",
        **task_kwargs("cpu", DEPLOYMENT),
        shards=generate.output,
        prompt_column="{{ params.prompt_column }}",
        uuid_column="{{ params.uuid_column }}",
        output_file=f"{RUN_DIR}/{schema.MERGED}",
    )
    filtered = RejectSamplingOperator(
        task_id="reject_sampling",
        **task_kwargs("cpu", DEPLOYMENT),
        src=merged.output,
        dst=f"{RUN_DIR}/{schema.FILTERED}",
        answer_column="{{ params.answer_column }}",
        problem_column="{{ params.prompt_column }}",
        judge_conn_id="{{ params.judge_conn_id }}",
        judge_model="{{ params.judge_model }}",
        judge_policy="{{ params.judge_policy }}",
        judge_audit_sample="{{ params.judge_audit_sample }}",
        judge_cache_dir="{{ params.output_root }}/judge_cache",
        min_pass_rate="{{ params.min_pass_rate }}",
        max_pass_rate="{{ params.max_pass_rate }}",
        outlets=[FILTERED],
    )
    handled = HandleDatasetOperator(
        task_id="handle",
        **task_kwargs("cpu", DEPLOYMENT),
        # from whichever entry point ran: rejection sampling's output or the OpenR1-style dataset
        src="{{ ti.xcom_pull(task_ids='reject_sampling', key='output') or ti.xcom_pull(task_ids='from_openr1') }}",
        trigger_rule="none_failed_min_one_success",
        dst=f"{RUN_DIR}/{schema.HANDLED}",
        tokenizer="{{ params.tokenizer_dir }}",
        max_length="{{ params.max_length }}",
        truncation="{{ params.truncation }}",
    )
    packed = PackDatasetOperator(
        task_id="pack",
        **task_kwargs("cpu", DEPLOYMENT),
        src=handled.output,
        dst=f"{RUN_DIR}/{schema.PACKED}",
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
        output_dir=f"{RUN_DIR}/{schema.FINETUNE}",
        load_checkpoint="{{ params.base_checkpoint }}",
        epochs="{{ params.epochs }}",
        learning_rate="{{ params.learning_rate }}",
        worker_num="{{ params.nodes * params.workers_per_node }}",
        local_worker_num="{{ params.workers_per_node }}",
        master_addr="{{ params.master_addr }}",
        master_port="{{ params.master_port }}",
        poll_interval=seconds(DEPLOYMENT, "training_poll_seconds"),  # the trigger's look at the job
    ).expand(node_rank=node_ranks.override(task_id="node_ranks", **cpu)("{{ params.nodes }}"))
    evaluated = Math500EvalOperator(
        task_id="evaluate",
        **task_kwargs("npu_eval", DEPLOYMENT),
        out=f"{RUN_DIR}/{schema.EVALUATED}",
        source="{{ params.eval_source }}",
        checkpoint="{{ ti.xcom_pull(task_ids='finetune', map_indexes=0)['checkpoint_dir'] }}",
        mindformers_config="{{ params.finetune_config }}",
        tokenizer="{{ params.tokenizer_dir }}",  # the one the training data was tokenized with
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

    # ---- the human gate before fine-tuning and the run's report (README: "The run's report and the approval
    # gate"): approve_finetune waits after pack (or from_packed) when the run asks for it (skipped at once when
    # not); the report task writes {run_dir}/report/report.html at the end, whatever happened (a teardown: not the run's state)
    gate = approval(DEPLOYMENT)
    approve = FinetuneApprovalOperator(
        task_id="approve_finetune",
        **cpu,
        enabled="{{ params.approve_before_finetune }}",
        seed_refresh=gate["seed_refresh"],
        timeout_hours=gate["timeout_hours"],
        on_timeout=gate["on_timeout"],
        run_dir=RUN_DIR,
        trigger_rule="none_failed_min_one_success",  # after whichever of pack and from_packed ran
    )
    chain([packed, prepacked], approve, finetuned)
    report = write_report.override(task_id="report", **cpu)(RUN_DIR).as_teardown()
    # a run stopped by a user ends failed, not successful (see fail_if_stopped); after the report, so evaluate
    # stays a last task of the run for Airflow (a teardown that can fail the run hides the tasks before it)
    evaluated >> report >> fail_if_stopped.override(**cpu)(RUN_DIR).as_teardown(on_failure_fail_dagrun=True)
