"""The human gate before fine-tuning: a person looks at the data and approves or rejects spending the NPUs on it.

``FinetuneApprovalOperator`` is the standard provider's ``ApprovalOperator`` (Airflow's human-in-the-loop): after
``pack`` it waits in *awaiting input* (no worker slot, no triggerer) until someone chooses **Approve** or
**Reject** in the UI (the task's *Required Actions*, or the run's page). Its body shows the data summary (kept
rows, tokens, truncated share, teacher cost) and links the run's *Report* tab.

- Whether it waits: the form field *Approve before fine-tuning* for runs started by a person (off by default);
  the deployment's ``approval.seed_refresh`` for runs a seed refresh starts (``operators/dag_helpers/deployment.py``). Off,
  the task is skipped at once and ``finetune`` starts as before.
- **Approve**: ``finetune`` starts. **Reject**: ``finetune`` and ``evaluate`` are skipped, the run ends without
  training, and ``decision.json`` in the task's folder (shown at the top of the report) says who rejected it.
- Nobody answers within ``approval.timeout_hours`` (24 by default): the deployment's ``approval.on_timeout`` is
  taken (``Reject`` by default: no NPU hours are spent on data nobody looked at).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowSkipException

from operators.dag_helpers.deployment import APPROVAL_DEFAULTS

logger = logging.getLogger(__name__)

TASK_ID = "approve_finetune"
REPORT_ROUTE = "distill-report"  # the Report tab's url_route (operators/report_plugin.py)
SEED_REFRESH_RUN_TYPE = "asset_triggered"


def report_tab_url(base_url: str, dag_id: str, run_id: str) -> str:
    """The run page's Report tab.

    >>> report_tab_url("http://af:8080/", "distill_r1", "manual__2026-01-01T00:00:00+00:00")
    'http://af:8080/dags/distill_r1/runs/manual__2026-01-01T00%3A00%3A00%2B00%3A00/plugin/distill-report'
    """
    return f"{base_url.rstrip('/')}/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}/plugin/{REPORT_ROUTE}"


def _percent(share: float | None) -> str:
    return "n/a" if share is None else f"{100 * share:.1f}%"


def body_markdown(summary: dict, report_url: str, report_file: str, timeout_hours: float, on_timeout: str) -> str:
    """The gate's body: the figures to decide on, the report, what happens if nobody answers."""
    tokens = summary["tokens"]
    return "\n".join(
        [
            "The training data is ready. Look at it before fine-tuning starts on the NPUs.",
            "",
            "| | |",
            "|---|---|",
            f"| Kept rows (after rejection sampling) | {summary['kept_rows']} |",
            f"| Packed rows | {summary['packed_rows']} |",
            f"| Tokens to train on (per epoch) | {tokens:,} |" if tokens is not None else "| Tokens | n/a |",
            f"| Truncated share of the teacher's completions | {_percent(summary['truncated_share'])} |",
            f"| Teacher tokens | {summary['teacher_tokens']:,} |",
            f"| Teacher cost (estimate) | {summary['teacher_cost']:.2f} |",
            "",
            f"[Open the distillation report]({report_url}) (also written to `{report_file}`).",
            "",
            "**Approve**: fine-tuning starts. **Reject**: the run ends without training.",
            f"Without an answer within {timeout_hours:g} h: **{on_timeout}**.",
        ]
    )


class FinetuneApprovalOperator(ApprovalOperator):
    """Wait for Approve/Reject before ``finetune`` when ``enabled`` (manual runs) or ``seed_refresh`` (runs a seed
    refresh started) says so; else skip at once. ``run_dir`` is the run's artifact folder."""

    template_fields = (*ApprovalOperator.template_fields, "enabled", "run_dir")
    ui_color = "#fff4d6"

    def __init__(
        self,
        *,
        enabled: str | bool,
        run_dir: str,
        seed_refresh: bool = APPROVAL_DEFAULTS["seed_refresh"],
        timeout_hours: float = APPROVAL_DEFAULTS["timeout_hours"],
        on_timeout: str = APPROVAL_DEFAULTS["on_timeout"],
        **kwargs,
    ) -> None:
        super().__init__(
            subject="Approve fine-tuning on this data?",
            body="(filled in when the task runs: the data summary and the report's link)",
            defaults=on_timeout,
            response_timeout=timedelta(hours=timeout_hours),
            **kwargs,
        )
        self.enabled = enabled
        self.run_dir = run_dir
        self.seed_refresh = seed_refresh
        self.timeout_hours = timeout_hours
        self.on_timeout = on_timeout

    def gate_on(self, context: Context) -> bool:
        if context["dag_run"].run_type == SEED_REFRESH_RUN_TYPE:
            return bool(self.seed_refresh)
        return str(self.enabled).strip().lower() in ("true", "1", "yes", "on")

    def execute(self, context: Context) -> Any:
        from airflow.providers.common.compat.sdk import conf

        from distilled_plugins.report.approval import data_summary
        from distilled_plugins.report.collect import collect
        from distilled_plugins.report.config import ReportConfig
        from distilled_plugins.report.stage import run as write_report

        if not self.gate_on(context):
            raise AirflowSkipException(
                "approval before fine-tuning is off for this run (form field 'Approve before fine-tuning'; "
                "seed refreshes: the deployment's approval.seed_refresh): fine-tuning starts without waiting"
            )
        run_dir = Path(self.run_dir)
        report_file = write_report(ReportConfig(run_dir=str(run_dir)))  # the data's figures, as of now
        summary = data_summary(collect(run_dir))
        ti = context["ti"]
        url = report_tab_url(conf.get("api", "base_url", fallback="") or "", ti.dag_id, ti.run_id)
        self.body = body_markdown(summary, url, str(report_file), self.timeout_hours, self.on_timeout)
        logger.info(
            "waiting for Approve or Reject (timeout %g h, then %s):\n%s", self.timeout_hours, self.on_timeout, self.body
        )
        return super().execute(context)

    def execute_complete(self, context: Context, event: dict[str, Any]) -> Any:
        from distilled_plugins.core.io import write_json

        chosen = event.get("chosen_options") or []
        user = event.get("responded_by_user") or {}
        record = {
            "chosen": chosen[0] if chosen else None,
            "approved": chosen == [self.APPROVE],
            "responded_by": user.get("name") if isinstance(user, dict) else None,
            "responded_at": str(event.get("responded_at", "")),
            "timed_out": bool(event.get("timedout")),
        }
        if "error" not in event:
            write_json(Path(self.run_dir) / TASK_ID / "decision.json", record)
        if record["approved"]:
            logger.info("fine-tuning approved by %s", record["responded_by"] or "the timeout's default")
        elif record["chosen"] == self.REJECT:
            logger.warning(
                "REJECTED by %s%s: finetune and evaluate are skipped, the run ends without training",
                record["responded_by"] or "nobody",
                f" (no answer within {self.timeout_hours:g} h)" if record["timed_out"] else "",
            )
        return super().execute_complete(context, event)
