"""Where each task runs: Celery queues and pools come from the deployment's configuration, not from DAG edits.

One place: the Airflow Variable ``distill_deployment`` (a JSON object), which every component reads the same
way -- from the metadata database, or from ``AIRFLOW_VAR_DISTILL_DEPLOYMENT`` in the services' environment::

    {"cpu_queue": "cpu", "npu_queue": "npu", "teacher_pool": "teacher", "training_pool": "npu_training"}

Every key is optional. Queues default to ``default`` (a LocalExecutor or a single Celery worker serves all
tasks); pools default to none (``default_pool``). A pool named here must exist: create it with
``airflow pools set teacher 4 "teacher shards" --include-deferred`` (the deferred fine-tune holds its training
slot while it waits in the triggerer, so the cap holds although the Celery slot is freed).

``queue`` and ``pool`` are not templated and, on mapped tasks, are partial-only: they are fixed when the DAG is
parsed, by the dag-processor, which is what the scheduler routes by.
"""

from __future__ import annotations

import json
import logging

logger = logging.getLogger(__name__)

VARIABLE = "distill_deployment"
DEFAULT_QUEUE = "default"
KEYS = {"cpu_queue", "npu_queue", "teacher_pool", "training_pool"}

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
    operators.deployment.DeploymentConfigError: Variable distill_deployment: unknown key(s) npu_qeue; known: cpu_queue, npu_queue, teacher_pool, training_pool
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
    for key, value in config.items():
        if not isinstance(value, str) or not value:
            raise DeploymentConfigError(f"Variable {VARIABLE}: {key} must be a non-empty string, got {value!r}")
    return config


def load() -> dict:
    """Read the Variable (environment first, then the metadata database, as Airflow does)."""
    from airflow.sdk import Variable

    return parse(Variable.get(VARIABLE, default=None))


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
