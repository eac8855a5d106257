"""The project's Airflow plugin: a *Report* tab on every run's page, served by the API server.

Registered through the package's ``airflow.plugins`` entry point (``pyproject.toml``), so every Airflow process
of an environment where the project is installed loads it: the Docker image, ``make demo``, the tests' private
Airflow. Its FastAPI app is mounted by the API server at ``/distill-report``; ``GET /distill-report/run?dag_id=
...&run_id=...`` answers the run's report (``distilled_plugins.report``), built from the artifacts as they are
now, so a run in progress shows the stages finished so far. The external view puts it on the run page as the
tab *Report* (destination ``dag_run``; the UI fills in ``{DAG_ID}`` and ``{RUN_ID}``).

Access: the API server's own authentication and authorization (``requires_access_dag`` on the run's DAG, as
Airflow's ``/api/v2/dags/{dag_id}/dagRuns`` endpoints do): the UI's session cookie or a bearer token; anonymous
requests get 401. The folder read is ``{output_root}/{dag_id}/{run_id}`` of a run that exists in the metadata
database (``output_root`` from its conf, else the deployment's default), and it must resolve to a direct child of
``{output_root}/{dag_id}``: a run id such as ``..`` is refused (403), an unknown run is 404.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.core_api.security import requires_access_dag
from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import HTMLResponse

logger = logging.getLogger(__name__)

URL_PREFIX = "/distill-report"
URL_ROUTE = "distill-report"  # the tab's route on the run page: /dags/{dag}/runs/{run}/plugin/distill-report

app = FastAPI(title="Distillation report", description="The report of a distill_r1 run, from its artifacts")


def run_folder(dag_id: str, run_id: str) -> Path:
    """The artifact folder of an existing run, checked to lie inside its DAG's runs folder."""
    from airflow.models.dagrun import DagRun
    from airflow.models.variable import Variable
    from airflow.utils.session import create_session
    from sqlalchemy import select

    from operators.dag_helpers import deployment

    with create_session() as session:
        run = session.scalar(select(DagRun).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id))
        if run is None:
            raise HTTPException(404, f"no run {run_id!r} of DAG {dag_id!r}")
        conf = dict(run.conf or {})
    root = conf.get("output_root") or deployment.output_root(
        deployment.parse(Variable.get(deployment.VARIABLE, default_var=None))
    )
    runs = (Path(root) / dag_id).resolve()
    folder = (runs / run_id).resolve()
    if folder.parent != runs or run_id in ("", ".", ".."):
        raise HTTPException(403, f"run {run_id!r}: its folder would lie outside the runs' folder {runs}")
    return folder


@app.get(
    "/run",
    response_class=HTMLResponse,
    dependencies=[Depends(requires_access_dag(method="GET", access_entity=DagAccessEntity.RUN))],
)
def run_report(dag_id: str, run_id: str) -> HTMLResponse:
    """The report page of run ``run_id`` of ``dag_id`` (a sync route: FastAPI runs it in a worker thread)."""
    from distilled_plugins.report.collect import collect
    from distilled_plugins.report.render import render

    folder = run_folder(dag_id, run_id)
    if not folder.is_dir():
        return HTMLResponse(
            f"<!DOCTYPE html><html><body><h1>Distillation report</h1><p>No artifacts yet for run "
            f"{html.escape(run_id)} (expected under <code>{html.escape(str(folder))}</code>).</p></body></html>"
        )
    return HTMLResponse(render(collect(folder)))


class DistillReportPlugin(AirflowPlugin):
    name = "distill_report"
    # Airflow reads these class attributes (AirflowPlugin's API)
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": "Distillation report"}]  # noqa: RUF012
    external_views = [  # noqa: RUF012
        {
            "name": "Report",
            "href": URL_PREFIX + "/run?dag_id={DAG_ID}&run_id={RUN_ID}",
            "destination": "dag_run",
            "url_route": URL_ROUTE,
        }
    ]
