"""An example of chaining onto distill_r1: runs whenever a new fine-tuned model is announced.

The ``distill_model`` asset's event carries the checkpoint URI, the training steps and the final loss (see
``operators/dag_helpers/assets.py``). This DAG only records each announced model in a registry file,
``{output_root}/published/models.jsonl`` (the deployment's default ``output_root``, from the Variable
``distill_deployment``: ``operators/dag_helpers/deployment.py``); a team would copy the checkpoint to its model store or
deploy it to a serving endpoint here instead.
"""

from __future__ import annotations

import os

from airflow.sdk import DAG, get_current_context, task

from operators.dag_helpers import deployment
from operators.dag_helpers.assets import MODEL

REGISTRY = os.path.join(deployment.output_root(deployment.load()), "published", "models.jsonl")


@task
def record_model(registry: str) -> list[dict]:
    from operators.publish import record_model_events

    return record_model_events(get_current_context(), registry)


with DAG(
    dag_id="publish_model",
    description="Record every model distill_r1 fine-tunes (an example of scheduling on its outlet assets)",
    schedule=[MODEL],
    max_active_runs=1,
    catchup=False,
    tags=["distillation", "example"],
    doc_md=__doc__,
) as dag:
    record_model(REGISTRY)
