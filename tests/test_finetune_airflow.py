"""Stopping fine-tuning in a real Airflow (api-server, scheduler, dag-processor, triggerer), through its REST API:
marking the deferred task failed stops training; killing the job's supervisor fails the task with the log tail."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import psutil
import pytest

from distilled_plugins.core import configs
from distilled_plugins.devtools.local_airflow import LocalAirflow, free_port
from tests.support import REPO, wait_until

DAG_ID = "test_finetune_control"


def job_processes(folder: Path) -> list[psutil.Process]:
    """Live processes of jobs under ``folder``: supervisor, msrun and workers carry it in their command line."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["status"] != psutil.STATUS_ZOMBIE and any(str(folder) in p for p in proc.info["cmdline"] or []):
            found.append(proc)
    return found


wait_for = functools.partial(wait_until, interval=1)  # polls every 1 s


@pytest.fixture(scope="module")
def airflow(tmp_path_factory):
    home = tmp_path_factory.mktemp("airflow-finetune")
    with LocalAirflow(home, free_port(), dags_folder=REPO / "tests" / "dags") as running:
        running.wait_for_dag(DAG_ID)
        yield running


def start_training(airflow: LocalAirflow, tiny_packed, out: Path) -> tuple[str, Path]:
    """Trigger a run and wait until its task is deferred and the job logged a training step."""
    conf = {
        "config": str(configs.CONFIG_DIR / "finetune_tiny_cpu.yaml"),
        "data": str(tiny_packed),
        "out": str(out),
        "port": free_port(),
    }
    run_id = airflow.trigger(DAG_ID, conf)

    def training() -> Path | None:
        logs = list(out.glob("job-*/msrun_log/worker_0.log"))
        return logs[0].parent.parent if logs and "step:[" in logs[0].read_text() else None

    job = wait_for(training, 300, "a logged training step")
    state = airflow.task_instances(DAG_ID, run_id)[0]["state"]
    assert state == "deferred", state
    return run_id, job


def task_log(airflow: LocalAirflow, run_id: str) -> str:
    path = f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/finetune/logs/1?full_content=true"
    return json.dumps(airflow.api("GET", path))


@pytest.mark.slow
def test_marking_the_deferred_task_failed_stops_training(airflow, tiny_packed, tmp_path):
    run_id, job = start_training(airflow, tiny_packed, tmp_path / "out")
    assert job_processes(tmp_path)
    airflow.set_task_state(DAG_ID, run_id, "finetune", "failed")
    marked = time.monotonic()
    wait_for(lambda: not job_processes(tmp_path), 30, "every process of the job to end")
    assert time.monotonic() - marked < 30
    assert "stopped by a user" in json.loads((job / "stop.json").read_text())["reason"]
    status = json.loads((job / "node-0.status.json").read_text())
    assert status["stopped"] and status["returncode"] != 0
    assert airflow.wait_for_run(DAG_ID, run_id, timeout=120, progress=False) == "failed"


@pytest.mark.slow
def test_a_killed_supervisor_fails_the_task_with_the_log_tail(airflow, tiny_packed, tmp_path):
    run_id, job = start_training(airflow, tiny_packed, tmp_path / "out")
    supervisor = json.loads((job / "node-0.json").read_text())["pid"]
    psutil.Process(supervisor).kill()  # as if its container went away; msrun and the worker are left behind
    assert airflow.wait_for_run(DAG_ID, run_id, timeout=240, progress=False) == "failed"
    log = task_log(airflow, run_id)
    assert "training node 0 of" in log and "dead (its supervisor on this host is gone" in log  # known at once here
    assert "last lines of" in log and "worker_0.log" in log
    wait_for(lambda: not job_processes(tmp_path), 60, "the leftovers of the job to be stopped")
