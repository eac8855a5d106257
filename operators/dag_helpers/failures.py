"""The failure contract of every task: on an error, one line at the top level of the task log saying what failed
and what to do about *that* error, and an error no retry can fix fails the task at once instead of waiting out its
retries. Whether a retry can fix an error is the engine's table (``distilled_plugins.core.errors.RETRY_CAN_FIX``);
what to do about it is said here, by the error's type (and, for an error of no listed type, by the task).
"""

from __future__ import annotations

import functools
import logging

from airflow.sdk.exceptions import (
    AirflowFailException,
    AirflowNotFoundException,
    AirflowRescheduleException,
    AirflowSkipException,
    DagRunTriggerException,
    DownstreamTasksSkipped,
)

from distilled_plugins.core import errors
from distilled_plugins.core.cli import one_line

logger = logging.getLogger(__name__)

# what to do when a task fails with an error the rules below do not name, by task id
WHAT_TO_DO = {
    "choose_source": "correct each setting named above in the trigger form (or create what it points to) and "
    "trigger a new run",
    "shard_plan": "check the 'Generation shards' parameter",
    "generate": "check the teacher connection and model name; clearing the task resumes its shard, "
    "completions already received are kept",
    "merge": "a shard output is incomplete: clear the generate task of that shard",
    "reject_sampling": "check the seed's answer column and the evaluation sets; clearing the task rewrites its output",
    "handle": "check the tokenizer folder and the messages column; clearing the task rewrites its output",
    "pack": "check seq_length against the fine-tune config and the overlong policy",
    "finetune": "read the worker log tail above; clearing the task resumes from the newest checkpoint",
    "evaluate": "check the evaluation source (checkpoint or endpoint); clearing the task keeps the completions",
}
DEFAULT_WHAT_TO_DO = "read the error above, fix its cause, then clear the task"

# what to do about an error, by its type: the first class it is an instance of (subclasses before their bases)
HINTS: tuple[tuple[type[BaseException], str], ...] = (
    (
        AirflowNotFoundException,
        "define the connection named in the error (Admin > Connections, or an AIRFLOW_CONN_<ID> environment "
        "variable of the Airflow services), then clear the task",
    ),
    (
        errors.EndpointUnreachable,
        "start the endpoint or correct host and port of its connection (Admin > Connections), then clear the "
        "task: completions already received are kept",
    ),
    (
        errors.FatalRequestError,
        "the endpoint refused the request: correct the API key (the connection's password) or the model name "
        "as the server's message says, then clear the task",
    ),
    (
        errors.BatchError,
        "the teacher's Batch API refused the call: correct the API key (the connection's password) as the error "
        "says, or set 'Teacher mode' to online if the server has no Batch API, then clear the task: batches "
        "already submitted are re-attached, not paid twice",
    ),
    (
        errors.BudgetReached,
        "the run spent its budget: raise 'Budget per run' (or give a new one) and clear the task; what was "
        "received is kept and only the rest is requested",
    ),
    (
        errors.GenerationIncomplete,
        "some requests still failed after every attempt: clearing the task requests only the missing rows "
        "(raise 'Attempts per request' if the teacher is overloaded)",
    ),
    (
        errors.CheckpointMissing,
        "set the 'Base checkpoint' parameter to the folder of the base model weights (empty: the profile's own "
        "load_checkpoint) and trigger a new run",
    ),
    (
        errors.SeqLengthMismatch,
        "pack with the model's seq_length or change the fine-tune profile as the error says, then trigger a new run",
    ),
    (
        errors.MissingColumn,
        "name an existing column in the Data section ('Problem column', 'Problem id column', 'Gold answer "
        "column') and trigger a new run",
    ),
    (
        errors.DataError,
        "fix the file or folder named in the error (or the parameter pointing to it), then trigger a new run",
    ),
    (
        errors.FinetuneStoppedByUser,
        "a user stopped the training: clear the finetune task of every node to resume from the newest checkpoint",
    ),
    (
        errors.FinetuneFailed,
        "read the worker log tail above; clearing the task resumes from the newest checkpoint",
    ),
    (
        errors.ChildFailed,
        "read the program's last lines above (mindformers' generation, a grading worker); clearing the task keeps "
        "what was already made",
    ),
    (
        FileNotFoundError,
        "create the missing file or point the parameter at an existing one, then trigger a new run",
    ),
    (
        ValueError,
        "a setting is invalid: correct the parameter or configuration value named in the error and trigger a new run",
    ),
)

# Airflow's control flow: never a failure
PASS_THROUGH = (
    AirflowSkipException,
    AirflowRescheduleException,
    DownstreamTasksSkipped,
    DagRunTriggerException,
)


def classify(task_id: str, error: BaseException) -> tuple[bool, str]:
    """(whether a retry can fix the error, what to do about it)."""
    fixable = False if isinstance(error, AirflowNotFoundException) else errors.retry_can_fix(error)
    hint = next((hint for kind, hint in HINTS if isinstance(error, kind)), None)
    # an error of no listed type is retried (it may be passing) and told about in the task's own words
    return fixable is not False, hint or WHAT_TO_DO.get(task_id, DEFAULT_WHAT_TO_DO)


def summary_line(task_id: str, ti, error: BaseException, hint: str, retrying: bool) -> str:
    first = one_line(error)  # the same first line the stage's command line prints
    where = f"{task_id}" + (f"[{ti.map_index}]" if getattr(ti, "map_index", -1) not in (None, -1) else "")
    outcome = "Airflow retries it; if every try fails: " if retrying else ""
    return (
        f"FAILED {where} (run {getattr(ti, 'run_id', '?')}, try {getattr(ti, 'try_number', '?')}): "
        f"{first} -- what to do: {outcome}{hint}"
    )


def fails_clearly(method):
    """Decorate an operator's ``execute`` (or resume method) with the one-line failure summary and fail-fast."""

    @functools.wraps(method)
    def wrapper(self, context, *args, **kwargs):
        try:
            return method(self, context, *args, **kwargs)
        except PASS_THROUGH:
            raise
        except Exception as error:
            ti = context["ti"]
            retryable, hint = classify(self.task_id, error)
            if isinstance(error, AirflowFailException):
                retryable = False
            tries_left = retryable and (getattr(ti, "try_number", 1) or 1) <= int(getattr(ti, "max_tries", 0) or 0)
            line = summary_line(self.task_id, ti, error, hint, tries_left)
            self.log.error("%s", line)
            self._failure_summarised = True
            if not retryable and not isinstance(error, AirflowFailException):
                raise AirflowFailException(line) from error
            raise

    return wrapper


def log_failure_summary(context) -> None:
    """``on_failure_callback``: the one-line summary for failures :func:`fails_clearly` did not see (it runs in
    Airflow's collapsed "Post Execute" group, so the operators log it themselves first)."""
    if getattr(context.get("task"), "_failure_summarised", False):
        return
    ti = context["ti"]
    error = context.get("exception")
    hint = classify(ti.task_id, error)[1] if isinstance(error, BaseException) else DEFAULT_WHAT_TO_DO
    logger.error("%s", summary_line(ti.task_id, ti, error or RuntimeError("unknown error"), hint, False))
