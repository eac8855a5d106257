"""RejectSamplingOperator: stage 2 as an Airflow task."""

from __future__ import annotations

from typing import Any, ClassVar

from airflow.sdk import Context

from distilled_plugins.core.schema import STATS_ROWS_IN, STATS_ROWS_OUT
from distilled_plugins.core.settings import is_empty
from distilled_plugins.reject_sampling.config import RejectSamplingConfig
from distilled_plugins.teacher.settings import RequestSettings
from operators.dag_helpers.assets import emit
from operators.dag_helpers.failures import fails_clearly
from operators.dag_helpers.xcom import with_fields
from operators.hooks import JudgeEndpointHook
from operators.stage import StageOperator


class RejectSamplingOperator(StageOperator):
    """Keep the generations that math_verify proves correct; drop examples that overlap evaluation sets.

    Takes the fields of :class:`~distilled_plugins.reject_sampling.config.RejectSamplingConfig`. Grading runs in worker
    processes, never in the task process (math_verify's ``signal.alarm`` would cancel Airflow's
    ``execution_timeout``). Output is written atomically, so a retry rewrites the same files.
    ``judge_conn_id`` names the Connection of an LLM judge asked about what math_verify rejects (see
    :class:`JudgeEndpointHook`; empty: no judge); its verdicts are cached in ``judge_cache_dir``, so a retry or a
    rerun asks only what it has not answered yet.
    Returns ``{"output": <jsonl>, "verdicts": <jsonl>, "stats": <json>}``.
    """

    config_class = RejectSamplingConfig
    not_arguments = ("judge_api_addr", "judge_api_key", "judge_endpoints", "judge_requests")
    operator_arguments: ClassVar[dict[str, Any]] = {"judge_conn_id": None}
    ui_color = "#fef3e0"

    @fails_clearly
    def execute(self, context: Context) -> dict:
        from distilled_plugins.reject_sampling.stage import run  # heavy: not at DAG parse time

        judge = {}
        if not is_empty(self.judge_conn_id):  # the connection's endpoints and request settings
            fleet = JudgeEndpointHook(self.judge_conn_id).get_fleet()
            judge = {"judge_endpoints": fleet.endpoints, "judge_requests": RequestSettings(**fleet.settings)}
        result = run(self.stage_config(**judge))
        stats = result.stats
        emit(
            context,
            self,
            {
                "path": str(result.output),
                "kept": stats[STATS_ROWS_OUT],
                "rejected": stats[STATS_ROWS_IN] - stats[STATS_ROWS_OUT],
                "generations_correct": stats["generations_correct"],
                "judge_recovered": (stats["judge"] or {}).get("recovered", 0),
            },
        )
        return with_fields(
            context, {"output": str(result.output), "verdicts": str(result.verdicts), "stats": str(result.stats_file)}
        )
