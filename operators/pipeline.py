"""Small pieces the distillation DAG is built from, kept out of ``dags/`` (which holds definitions only).

- :func:`form_param`: a trigger-form field (title, description, section) from one line per setting.
- :func:`fails_clearly`: wraps an operator's ``execute``; on an error it logs one line saying what failed and
  what to do about *that* error, at the top level of the task log (not inside a collapsed group), and turns
  errors no retry can fix (bad configuration, missing files, bad parameters, bad data) into
  ``AirflowFailException`` so the task fails at once instead of waiting out its retries.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from airflow.sdk import Param, task
from airflow.sdk.exceptions import (
    AirflowFailException,
    AirflowNotFoundException,
    AirflowRescheduleException,
    AirflowSkipException,
    DagRunTriggerException,
    DownstreamTasksSkipped,
)

from distilled_plugins.core.cli import one_line
from distilled_plugins.core.io import DataError
from distilled_plugins.core.settings import param_spec
from distilled_plugins.finetune import FinetuneFailed, FinetuneStoppedByUser
from distilled_plugins.generate import GenerationIncomplete
from distilled_plugins.teacher.batch_api import BatchError
from distilled_plugins.teacher.client import FatalRequestError

logger = logging.getLogger(__name__)


def form_param(default: Any, title: str, section: str, description: str, **schema) -> Param:
    """One field of the trigger form: ``title`` is its label, ``section`` the collapsible group it sits in."""
    return Param(default, title=title, section=section, description=description, **schema)


# trigger-form param -> the stage config field it sets (tests check that their defaults agree) ...
FORM_FIELDS: dict[str, tuple[type, str]] = {}
# ... and those left empty by default, meaning "not set here" (the operator's default is None too)
UNSET_BY_DEFAULT: set[str] = set()


def field_param(
    name: str,
    config: type,
    field: str,
    title: str | None = None,
    section: str | None = None,
    defaults: dict | None = None,
    *,
    unset: str | None = None,
    **schema,
) -> Param:
    """A form field for a stage setting: its default, title, section, description, type, choices and range come
    from the config dataclass field (``distilled_plugins.core.settings``); ``title``/``section`` given here replace the
    field's, ``defaults`` (a deployment's own) and ``schema`` refine it.

    ``unset`` makes the field empty by default, meaning "not set here", and says what decides then (``{default}``
    is the field's default), e.g. ``unset="the connection's extra, else {default}"``.
    """
    spec = param_spec(config, field)
    FORM_FIELDS[name] = (config, field)
    keywords = {k: spec[k] for k in ("type", "enum", "minimum", "maximum") if k in spec}
    description, default = spec["description"], spec["default"]
    if unset is not None:
        UNSET_BY_DEFAULT.add(name)
        kind = keywords["type"]
        keywords["type"] = kind if isinstance(kind, list) else ["null", kind]
        shown = ("on" if default else "off") if isinstance(default, bool) else default
        shown = f"{shown:g}" if isinstance(shown, float) else shown
        description += f" (empty: {unset.format(default=shown)})"
        default = None
    if spec.get("section") is None and section is None:
        raise ValueError(f"{config.__name__}.{field}: no form section; give one in setting(section=...)")
    return form_param(
        (defaults or {}).get(name, default),
        title or spec["title"],
        section or spec["section"],
        description,
        **{**keywords, **schema},
    )


# params that take only whole numbers: Airflow 3.3's trigger form shows "integer" and "number" fields alike and lets
# a fraction through, which the API then refuses with a bare "Bad Request" toast that names no field. So the form
# takes them as numbers, their descriptions say so, and the run's first task (choose_source) names the field.
WHOLE_NUMBERS: set[str] = set()
WHOLE_NUMBER_NOTE = "; a whole number (a fraction fails the run's first task, which names this field)"


def whole_numbers_in_form(params: dict[str, Param]) -> dict[str, Param]:
    """``params`` with each integer field made a number field that says it takes whole numbers (see above)."""
    for name, param in params.items():
        kinds = param.schema.get("type")
        kinds = kinds if isinstance(kinds, list) else [kinds]
        if "integer" in kinds:
            WHOLE_NUMBERS.add(name)
            numbers = ["number" if k == "integer" else k for k in kinds]
            param.schema["type"] = numbers if len(numbers) > 1 else "number"
            param.description = (param.description or "") + WHOLE_NUMBER_NOTE
    return params


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

# (error class, task id or None for any, text in the message or None, retry can fix it, what to do): first match
RULES: list[tuple[type[BaseException], str | None, str | None, bool, str]] = [
    (
        AirflowNotFoundException,
        None,
        None,
        False,
        "define the connection named in the error (Admin > Connections, or an AIRFLOW_CONN_<ID> environment "
        "variable of the Airflow services), then clear the task",
    ),
    (
        FatalRequestError,
        None,
        "cannot reach",
        False,
        "start the endpoint or correct host and port of its connection (Admin > Connections), then clear the "
        "task: completions already received are kept",
    ),
    (
        FatalRequestError,
        None,
        None,
        False,
        "the endpoint refused the request: correct the API key (the connection's password) or the model name "
        "as the server's message says, then clear the task",
    ),
    (
        BatchError,
        None,
        None,
        False,
        "the teacher's Batch API refused the call: correct the API key (the connection's password) as the error "
        "says, or set 'Teacher mode' to online if the server has no Batch API, then clear the task: batches "
        "already submitted are re-attached, not paid twice",
    ),
    (
        GenerationIncomplete,
        None,
        None,
        True,
        "some requests still failed after every attempt: clearing the task requests only the missing rows "
        "(raise 'Attempts per request' if the teacher is overloaded)",
    ),
    (
        DataError,
        "finetune",
        "load_checkpoint",
        False,
        "set the 'Base checkpoint' parameter to the folder of the base model weights (empty: the profile's own "
        "load_checkpoint) and trigger a new run",
    ),
    (
        DataError,
        "finetune",
        "seq_length",
        False,
        "pack with the model's seq_length or change the fine-tune profile as the error says, then trigger a new run",
    ),
    (
        DataError,
        None,
        "column",
        False,
        "name an existing column in the Data section ('Problem column', 'Problem id column', 'Gold answer "
        "column') and trigger a new run",
    ),
    (
        DataError,
        None,
        None,
        False,
        "fix the file or folder named in the error (or the parameter pointing to it), then trigger a new run",
    ),
    (
        FinetuneStoppedByUser,
        None,
        None,
        False,
        "a user stopped the training: clear the finetune task of every node to resume from the newest checkpoint",
    ),
    (
        FinetuneFailed,
        None,
        None,
        True,
        "read the worker log tail above; clearing the task resumes from the newest checkpoint",
    ),
    (
        FileNotFoundError,
        None,
        None,
        False,
        "create the missing file or point the parameter at an existing one, then trigger a new run",
    ),
    (
        ValueError,
        None,
        None,
        False,
        "a setting is invalid: correct the parameter or configuration value named in the error and trigger a new run",
    ),
]

# Airflow's control flow: never a failure
PASS_THROUGH = (
    AirflowSkipException,
    AirflowRescheduleException,
    DownstreamTasksSkipped,
    DagRunTriggerException,
)


def classify(task_id: str, error: BaseException) -> tuple[bool, str]:
    """(whether a retry can fix the error, what to do about it)."""
    message = str(error)
    for kind, rule_task, text, retryable, hint in RULES:
        if isinstance(error, kind) and rule_task in (None, task_id) and (text is None or text in message):
            return retryable, hint
    return True, WHAT_TO_DO.get(task_id, DEFAULT_WHAT_TO_DO)


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


@task
def shard_plan(shards: int) -> list[int]:
    """The shard indices to map the generate task over."""
    if int(shards) < 1:
        raise AirflowFailException(f"shards must be at least 1, got {shards} -- what to do: {WHAT_TO_DO['shard_plan']}")
    return list(range(int(shards)))


def log_failure_summary(context) -> None:
    """``on_failure_callback``: the one-line summary for failures :func:`fails_clearly` did not see (it runs in
    Airflow's collapsed "Post Execute" group, so the operators log it themselves first)."""
    if getattr(context.get("task"), "_failure_summarised", False):
        return
    ti = context["ti"]
    error = context.get("exception")
    hint = classify(ti.task_id, error)[1] if isinstance(error, BaseException) else DEFAULT_WHAT_TO_DO
    logger.error("%s", summary_line(ti.task_id, ti, error or RuntimeError("unknown error"), hint, False))
