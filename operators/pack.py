"""PackDatasetOperator: stage 4 as an Airflow task."""

from __future__ import annotations

import json
from pathlib import Path

from airflow.sdk import Context

from distilled_plugins.core.schema import STATS_FILE
from distilled_plugins.pack.config import PackConfig
from operators.dag_helpers.assets import emit
from operators.dag_helpers.failures import fails_clearly
from operators.stage import StageOperator


class PackDatasetOperator(StageOperator):
    """Pack handled samples into rows of the fine-tune config's ``seq_length`` (or an explicit one).

    Takes the fields of :class:`~distilled_plugins.pack.config.PackConfig`. Written to a temporary folder and renamed at
    the end, so a retry starts clean. Returns the output folder.
    """

    config_class = PackConfig
    ui_color = "#e6f4ea"

    @fails_clearly
    def execute(self, context: Context) -> str:
        from distilled_plugins.pack.stage import run  # here, not at the top: the DAG file parses fast

        out = Path(run(self.stage_config()))
        stats = json.loads((out / STATS_FILE).read_text())
        emit(
            context,
            self,
            {
                "path": str(out),
                "rows": stats["packs"],
                "seq_length": stats["seq_length"],
                "efficiency": stats["efficiency"],
            },
        )
        return str(out)
