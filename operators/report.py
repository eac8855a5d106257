"""The report task: the run's distillation report written among its artifacts (``report/report.html``).

A teardown at the end of the DAG: it runs whatever happened before it (a failed or rejected run gets its report
too, up to where it stopped) and does not decide the run's state. Its companion ``fail_if_stopped`` does, in the one
case Airflow gets wrong (below).
"""

from __future__ import annotations

import json
from pathlib import Path

from airflow.sdk import get_current_context, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException


# no retry: the report reads what exists, so another try would read the same
@task(retries=0)
def write_report(run_dir: str) -> str:
    """Write ``{run_dir}/report/report.html`` (``python -m distilled_plugins.report``); return its path."""
    from distilled_plugins.report.config import ReportConfig
    from distilled_plugins.report.stage import run

    if not Path(run_dir).is_dir():  # the run stopped before any stage wrote a file (its first task failed)
        raise AirflowSkipException(f"nothing to report: {run_dir} was never written")
    return str(run(ReportConfig(run_dir=run_dir)))


# The run's state when a user stops it (Mark as failed): Airflow skips the tasks that have not run, leaves the run
# open while teardowns are pending (apache/airflow#45530), then ends it by its last task, evaluate, now skipped:
# "success". A teardown that fails the run (on_failure_fail_dagrun) is the only way to end it failed; placed after
# the report, not after evaluate, whose state Airflow would otherwise ignore (a task followed by such a teardown is
# no last task for it), so a failed task still fails the run by itself.
@task(retries=0)
def fail_if_stopped(run_dir: str, last_task_id: str = "evaluate") -> None:
    """Fail (and so fail the run) when ``last_task_id`` was skipped and not by a rejection at the approval gate."""
    ti = get_current_context()["ti"]
    states = ti.get_task_states(dag_id=ti.dag_id, run_ids=[ti.run_id]).get(ti.run_id, {})
    last = states.get(last_task_id)
    if last != "skipped":  # success, or failed/upstream_failed: Airflow's own state is right
        return
    from distilled_plugins.core.schema import DECISION

    decision = Path(run_dir) / DECISION
    if decision.is_file() and json.loads(decision.read_text()).get("approved") is False:
        return  # rejected before fine-tuning: the run ends without training, as the gate says
    raise AirflowFailException(
        f"the run was stopped before {last_task_id} ran (its tasks that had not run are skipped); the run is failed, "
        "not successful: clear the skipped tasks to finish it"
    )
