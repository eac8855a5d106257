"""RejectSamplingOperator: stage 2 as an Airflow task."""

from __future__ import annotations

from airflow.sdk import Context

from distilled_plugins import reject_sampling
from distilled_plugins.schema import STATS_ROWS_IN, STATS_ROWS_OUT
from operators.assets import emit
from operators.pipeline import fails_clearly
from operators.stage import StageOperator
from operators.xcom import with_fields


class RejectSamplingOperator(StageOperator):
    """Keep the generations that math_verify proves correct; drop examples that overlap evaluation sets.

    Takes the fields of :class:`~distilled_plugins.reject_sampling.RejectSamplingConfig`. Grading runs in worker
    processes, never in the task process (math_verify's ``signal.alarm`` would cancel Airflow's
    ``execution_timeout``). Output is written atomically, so a retry rewrites the same files.
    Returns ``{"output": <jsonl>, "verdicts": <jsonl>, "stats": <json>}``.
    """

    config_class = reject_sampling.RejectSamplingConfig
    ui_color = "#fef3e0"

    @fails_clearly
    def execute(self, context: Context) -> dict:
        result = reject_sampling.run(self.stage_config())
        stats = result.stats
        emit(
            context,
            self,
            {
                "path": str(result.output),
                "kept": stats[STATS_ROWS_OUT],
                "rejected": stats[STATS_ROWS_IN] - stats[STATS_ROWS_OUT],
                "generations_correct": stats["generations_correct"],
            },
        )
        return with_fields(
            context, {"output": str(result.output), "verdicts": str(result.verdicts), "stats": str(result.stats_file)}
        )
