"""PackDatasetOperator: stage 4 as an Airflow task."""

from __future__ import annotations

from airflow.sdk import Context

from distilled_plugins import pack
from operators.pipeline import fails_clearly
from operators.stage import StageOperator


class PackDatasetOperator(StageOperator):
    """Pack handled samples into rows of the fine-tune config's ``seq_length`` (or an explicit one).

    Takes the fields of :class:`~distilled_plugins.pack.PackConfig`. Written to a temporary folder and renamed at
    the end, so a retry starts clean. Returns the output folder.
    """

    config_class = pack.PackConfig
    ui_color = "#e6f4ea"

    @fails_clearly
    def execute(self, context: Context) -> str:
        return str(pack.run(self.stage_config()))
