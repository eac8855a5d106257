"""Small pieces the distillation DAG is built from, kept out of ``dags/`` (which holds definitions only)."""

from __future__ import annotations

import logging

from airflow.sdk import task

logger = logging.getLogger(__name__)

# what to do when a task fails, by task id: the last line of a failed task's log
WHAT_TO_DO = {
    "shard_plan": "check the 'shards' parameter",
    "generate": "check the teacher connection and model name; clearing the task resumes its shard, "
    "completions already received are kept",
    "merge": "a shard output is incomplete: clear the generate task of that shard",
    "reject_sampling": "check the seed's answer column and the evaluation sets; clearing the task rewrites its output",
    "handle": "check the tokenizer folder and the messages column; clearing the task rewrites its output",
    "pack": "check seq_length against the fine-tune config and the overlong policy",
    "finetune": "read the worker log tail above; clearing the task resumes from the newest checkpoint",
    "evaluate": "check the evaluation source (checkpoint or endpoint); clearing the task keeps the completions",
}


@task
def shard_plan(shards: int) -> list[int]:
    """The shard indices to map the generate task over."""
    if int(shards) < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    return list(range(int(shards)))


def log_failure_summary(context) -> None:
    """``on_failure_callback``: end the task log with one line saying what failed and what to do."""
    ti = context["ti"]
    error = context.get("exception")
    first_line = str(error).strip().splitlines()[0] if error else "unknown error"
    hint = WHAT_TO_DO.get(ti.task_id, "read the error above, fix its cause, then clear the task")
    logger.error(
        "FAILED %s (run %s, try %s): %s -- what to do: %s", ti.task_id, ti.run_id, ti.try_number, first_line, hint
    )
