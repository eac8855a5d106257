"""HandleDatasetOperator: stage 3 as an Airflow task."""

from __future__ import annotations

from airflow.sdk import Context

from distilled_plugins.handle.config import HandleConfig
from operators.dag_helpers.failures import fails_clearly
from operators.stage import StageOperator


class HandleDatasetOperator(StageOperator):
    """Tokenize conversations with the chat template and mask the prompt out of the labels.

    Takes the fields of :class:`~distilled_plugins.handle.config.HandleConfig`. Written to a temporary folder and
    renamed at the end, so a retry starts clean. Returns the output folder.
    """

    config_class = HandleConfig
    ui_color = "#e6f4ea"

    @fails_clearly
    def execute(self, context: Context) -> str:
        from distilled_plugins.handle.stage import run  # here, not at the top: the DAG file parses fast

        return str(run(self.stage_config()))
