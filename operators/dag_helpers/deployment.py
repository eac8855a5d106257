"""A deployment's configuration, in one place every component reads: the Airflow Variable ``distill_deployment``.

Where each task runs (Celery queues and pools), the defaults of the run settings (the trigger form's defaults, and
the settings of runs started without ``conf``: seed refreshes, ``publish_model``), the seed the asset watches and
the output root, the retry delay and the polling intervals -- none of it comes from a service's environment.
The Variable lives in the metadata database (``airflow variables set distill_deployment "$(cat deployment.json)"``,
Admin > Variables, or ``POST /api/v2/variables``), so the dag-processor (whose parse renders the form and fixes
the asset's watcher, the queues and pools, which the scheduler and triggerer use) and every worker (whose parse
of the same file renders the task's ``params``) read the same value, whatever image or host they run on::

    {"cpu_queue": "cpu", "npu_queue": "npu", "teacher_pool": "teacher", "training_pool": "npu_training",
     "defaults": {"seed_dataset": "/data/seed/seed.parquet", "output_root": "/distill", "num_generations": 4},
     "retry_delay_seconds": 60, "seed_poll_seconds": 10, "watch_seed_seconds": 300, "training_poll_seconds": 5,
     "approval": {"seed_refresh": true, "timeout_hours": 24, "on_timeout": "Reject"}}

Every key is optional. Queues default to ``default`` (a LocalExecutor or a single Celery worker serves all
tasks); pools default to none (``default_pool``). A pool named here must exist: create it with
``airflow pools set teacher 4 "teacher shards" --include-deferred`` (the deferred fine-tune holds its training
slot while it waits in the triggerer, so the cap holds although the Celery slot is freed). ``defaults`` maps
``distill_r1`` parameter names to values (an unknown name is refused when the DAG is parsed); its
``seed_dataset`` is also the file the ``distill_seed`` asset watches and its ``output_root`` the root
``publish_model`` records under. ``approval`` sets the gate before fine-tuning (``operators/approval.py``): with
``seed_refresh`` true, a run started by a seed refresh waits for a person's Approve after ``pack`` (runs started
from the form follow its *Approve before fine-tuning* field); nobody answering within ``timeout_hours`` means
``on_timeout`` (``Reject`` or ``Approve``).

``AIRFLOW_VAR_DISTILL_DEPLOYMENT`` in one process's environment would override the database for that process
only (Airflow reads environment variables first): a worker built from another image would then run with other
defaults than the dag-processor rendered. :func:`load` logs a warning naming the host whenever it sees one.

``queue`` and ``pool`` are not templated and, on mapped tasks, are partial-only: they are fixed when the DAG is
parsed, by the dag-processor, which is what the scheduler routes by.
"""

from __future__ import annotations

import json
import logging
import os
import socket

logger = logging.getLogger(__name__)

VARIABLE = "distill_deployment"
ENV_OVERRIDE = "AIRFLOW_VAR_" + VARIABLE.upper()
DEFAULT_QUEUE = "default"
DEFAULT_OUTPUT_ROOT = "/opt/airflow/distill"
ROUTING_KEYS = {"cpu_queue", "npu_queue", "teacher_pool", "training_pool"}
# key -> (default, minimum): seconds
SECONDS = {
    "retry_delay_seconds": (60.0, 0.0),
    "seed_poll_seconds": (10.0, 0.1),
    "watch_seed_seconds": (300.0, 1.0),
    "training_poll_seconds": (5.0, 0.1),  # how often the deferred fine-tune task's trigger looks at its job
}
# the approval gate before fine-tuning (operators/approval.py): whether runs a seed refresh starts wait for a
# person, how long they wait, and what happens then
APPROVAL_DEFAULTS = {"seed_refresh": False, "timeout_hours": 24.0, "on_timeout": "Reject"}
KEYS = ROUTING_KEYS | set(SECONDS) | {"defaults", "approval"}

# task kind -> (queue key, pool key)
KINDS = {
    "cpu": ("cpu_queue", None),  # shard plan, merge, reject sampling, handle, pack
    "teacher": ("cpu_queue", "teacher_pool"),  # generation shards: each holds a teacher slot
    "npu": ("npu_queue", "training_pool"),  # fine-tuning: each holds a training slot, deferred or not
    "npu_eval": ("npu_queue", None),  # checkpoint evaluation on the training nodes
}


class DeploymentConfigError(ValueError):
    pass


def parse(text: str | None) -> dict:
    """The deployment configuration from the Variable's JSON text; ``None`` or empty: all defaults.

    >>> parse('{"npu_queue": "npu"}')["npu_queue"]
    'npu'
    >>> parse(None)
    {}
    >>> parse('{"npu_qeue": "npu"}')
    Traceback (most recent call last):
    ...
    operators.dag_helpers.deployment.DeploymentConfigError: Variable distill_deployment: unknown key(s) npu_qeue; known: approval, cpu_queue, defaults, npu_queue, retry_delay_seconds, seed_poll_seconds, teacher_pool, training_poll_seconds, training_pool, watch_seed_seconds
    """
    if not text or not text.strip():
        return {}
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise DeploymentConfigError(f"Variable {VARIABLE} is not JSON ({e}): fix it in Admin > Variables") from None
    if not isinstance(config, dict):
        raise DeploymentConfigError(f"Variable {VARIABLE} must be a JSON object, got {type(config).__name__}")
    unknown = sorted(set(config) - KEYS)
    if unknown:
        raise DeploymentConfigError(
            f"Variable {VARIABLE}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(KEYS))}"
        )
    for key in ROUTING_KEYS & set(config):
        if not isinstance(config[key], str) or not config[key]:
            raise DeploymentConfigError(f"Variable {VARIABLE}: {key} must be a non-empty string, got {config[key]!r}")
    for key, (_, minimum) in SECONDS.items():
        value = config.get(key, minimum)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
            raise DeploymentConfigError(f"Variable {VARIABLE}: {key} must be a number >= {minimum:g}, got {value!r}")
    if not isinstance(config.get("defaults", {}), dict):
        raise DeploymentConfigError(
            f"Variable {VARIABLE}: defaults must be an object of distill_r1 parameter -> value, "
            f"got {config['defaults']!r}"
        )
    approval = config.get("approval", {})
    if not isinstance(approval, dict) or set(approval) - set(APPROVAL_DEFAULTS):
        raise DeploymentConfigError(
            f"Variable {VARIABLE}: approval must be an object with keys among {', '.join(APPROVAL_DEFAULTS)}, "
            f"got {approval!r}"
        )
    gate = {**APPROVAL_DEFAULTS, **approval}
    hours = gate["timeout_hours"]
    if (
        not isinstance(gate["seed_refresh"], bool)
        or isinstance(hours, bool)
        or not isinstance(hours, (int, float))
        or hours <= 0
        or gate["on_timeout"] not in ("Approve", "Reject")
    ):
        raise DeploymentConfigError(
            f"Variable {VARIABLE}: approval needs seed_refresh true/false, timeout_hours > 0 and on_timeout "
            f"Approve or Reject, got {approval!r}"
        )
    return config


def approval(config: dict) -> dict:
    """The approval gate's settings (``seed_refresh``, ``timeout_hours``, ``on_timeout``), defaults filled in.

    >>> approval({"approval": {"seed_refresh": True}})
    {'seed_refresh': True, 'timeout_hours': 24.0, 'on_timeout': 'Reject'}
    """
    return {**APPROVAL_DEFAULTS, **config.get("approval", {})}


def load() -> dict:
    """Read the Variable as Airflow does (environment first, then the metadata database); warn when this
    process's environment overrides the database."""
    from airflow.sdk import Variable

    if ENV_OVERRIDE in os.environ:
        logger.warning(
            "%s is set in the environment of this process on host %s: it overrides the Variable %s of the "
            "metadata database here only, so this host may run with other settings than the dag-processor "
            "rendered. Remove it and keep the deployment's settings in the database (docker/README.md).",
            ENV_OVERRIDE,
            socket.gethostname(),
            VARIABLE,
        )
    text = Variable.get(VARIABLE, default=None)
    if text is None:  # not set, or not readable just now (Airflow answers both the same way): say so, loudly
        logger.warning(
            "Variable %s not found (or not readable) on host %s: using the built-in defaults (queue %r, no pools, "
            "output root %s). Set it as docker/deployment.json shows (docker/README.md).",
            VARIABLE,
            socket.gethostname(),
            DEFAULT_QUEUE,
            DEFAULT_OUTPUT_ROOT,
        )
    return parse(text)


def defaults(config: dict) -> dict:
    """The deployment's defaults of ``distill_r1``'s parameters (parameter name -> value)."""
    return dict(config.get("defaults", {}))


def output_root(config: dict) -> str:
    """Where artifacts and the generation store live: the ``output_root`` default, else /opt/airflow/distill."""
    return str(defaults(config).get("output_root") or DEFAULT_OUTPUT_ROOT)


def seconds(config: dict, key: str) -> float:
    """One of the intervals (``retry_delay_seconds``, ``seed_poll_seconds``, ``watch_seed_seconds``,
    ``training_poll_seconds``)."""
    return float(config.get(key, SECONDS[key][0]))


def check_defaults(config: dict, params: dict) -> None:
    """Refuse a default for a parameter the DAG does not have (a typo would otherwise be ignored).

    >>> check_defaults({"defaults": {"num_generation": 2}}, {"num_generations": 1, "shards": 1})
    Traceback (most recent call last):
    ...
    operators.dag_helpers.deployment.DeploymentConfigError: Variable distill_deployment: defaults names unknown parameter(s) num_generation; the parameters are: num_generations, shards
    """
    unknown = sorted(set(defaults(config)) - set(params))
    if unknown:
        raise DeploymentConfigError(
            f"Variable {VARIABLE}: defaults names unknown parameter(s) {', '.join(unknown)}; the parameters are: "
            f"{', '.join(sorted(params))}"
        )


def task_kwargs(kind: str, config: dict) -> dict:
    """``queue=`` and, when configured, ``pool=`` for a task of this kind.

    >>> task_kwargs("npu", {"npu_queue": "npu", "training_pool": "npu_training"})
    {'queue': 'npu', 'pool': 'npu_training'}
    >>> task_kwargs("teacher", {})
    {'queue': 'default'}
    """
    queue_key, pool_key = KINDS[kind]
    kwargs = {"queue": config.get(queue_key, DEFAULT_QUEUE)}
    if pool_key and config.get(pool_key):
        kwargs["pool"] = config[pool_key]
    return kwargs
