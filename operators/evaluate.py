"""Math500EvalOperator: stage 6 as an Airflow task."""

from __future__ import annotations

import json
from typing import Any, ClassVar

from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowException

from distilled_plugins.core.settings import is_empty
from distilled_plugins.evaluate.config import EvalConfig, Protocol
from distilled_plugins.teacher.settings import RequestSettings
from operators.dag_helpers.assets import emit
from operators.dag_helpers.failures import fails_clearly
from operators.hooks import TeacherEndpointHook
from operators.stage import StageOperator

SOURCES = ("endpoint", "checkpoint")


class Math500EvalOperator(StageOperator):
    """Evaluate on MATH-500 and write report.json / report.md / accuracy.png; returns the report's path.

    Takes the fields of :class:`~distilled_plugins.evaluate.EvalConfig` and of its sampling
    :class:`~distilled_plugins.evaluate.Protocol` (``n_samples``, ``max_new_tokens``, ``temperature``, ...) as
    keyword arguments, with their defaults. Completions come from an endpoint (``endpoint_conn_id`` + ``model``:
    the connection's whole fleet, as generation uses it), from a stage 5 checkpoint through mindformers
    (``checkpoint`` + ``mindformers_config``), or from a file (``rescore``); ``source`` (``endpoint`` or
    ``checkpoint``) picks one when several are configured. They are kept in ``out``, so a retry requests only what
    is missing. With ``baseline`` and ``fail_below_baseline`` the task fails when the model scores below the
    baseline's pass@1.
    """

    config_class = EvalConfig
    nested: ClassVar[dict[str, type]] = {"protocol": Protocol}
    not_arguments = ("api_addr", "api_key", "endpoints", "retry")
    # literal braces (the user turn's {prompt}, the system prompt's \boxed{}) are not Jinja
    not_templated = ("prompt_template", "system_prompt", "fail_below_baseline")
    operator_arguments: ClassVar[dict[str, Any]] = {
        "source": None,  # "endpoint" or "checkpoint": which of the configured sources to use
        "endpoint_conn_id": None,
        "fail_below_baseline": False,
    }
    ui_color = "#f3e8fd"

    @fails_clearly
    def execute(self, context: Context) -> str:
        from distilled_plugins.evaluate.stage import run  # the implementation: when the task runs, not at parse time

        source = None if is_empty(self.source) else self.source
        if source not in (None, *SOURCES):
            raise ValueError(f"source must be 'endpoint' or 'checkpoint', got {self.source!r}")
        conn_id = None if source == "checkpoint" or is_empty(self.endpoint_conn_id) else self.endpoint_conn_id
        chosen = {"checkpoint": None} if source == "endpoint" else {}
        if conn_id:  # the connection's whole fleet (its host, then extra["endpoints"]) and request settings
            fleet = TeacherEndpointHook(conn_id).get_fleet()
            chosen.update(endpoints=fleet.endpoints, retry=RequestSettings(**fleet.settings))
        report_path = run(self.stage_config(**chosen))
        report = json.loads(report_path.read_text())
        self.log.info(
            "MATH-500 pass@1 %.2f%% (95%% CI %s) over %d problems x %d samples; report %s",
            report["pass@1"],
            report["ci95"],
            report["problems"],
            report["protocol"]["n_samples"],
            report_path,
        )
        if self.fail_below_baseline and report.get("baseline") and report["baseline"]["difference"] < 0:
            raise AirflowException(
                f"task {self.task_id}: pass@1 {report['pass@1']:.2f} is below the baseline's "
                f"{report['baseline']['pass@1']:.2f} ({report['baseline']['difference']:+.2f} points); "
                f"see {report_path.with_suffix('.md')}"
            )
        emit(
            context,
            self,
            {
                "report": str(report_path),
                "pass@1": report["pass@1"],
                "ci95": report["ci95"],
                "n": report["problems"],
                "n_samples": report["protocol"]["n_samples"],
            },
        )
        return str(report_path)
