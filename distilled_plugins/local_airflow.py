"""A private Airflow 3 on this machine (SQLite, LocalExecutor): the demo's and the end-to-end tests' Airflow.

Starts ``api-server``, ``scheduler``, ``dag-processor`` and ``triggerer`` as processes of the project's
environment, with their own ``AIRFLOW_HOME`` and logs, and drives Airflow through its REST API (v2).
Nothing here imports Airflow: it talks to it the way a user's scripts do.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
SERVICES = ("api-server", "scheduler", "dag-processor", "triggerer")
FINAL_STATES = ("success", "failed")


class AirflowError(RuntimeError):
    pass


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalAirflow:
    def __init__(
        self, home: str | Path, port: int = 8080, dags_folder: str | Path = REPO / "dags", env: dict | None = None
    ):
        self.home, self.port = Path(home).resolve(), port
        self.url = f"http://127.0.0.1:{port}"
        self.env = {
            **os.environ,
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{self.home}/airflow.db",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(Path(dags_folder).resolve()),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",  # a private instance: no login
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",  # new DAG files appear within seconds
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
            "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "1",
            # the workers' and triggerer's log servers (8793/8794 by default) get free ports too
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
            **(env or {}),
        }
        self.processes: dict[str, subprocess.Popen] = {}

    # ---- lifecycle ----
    def airflow(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [str(Path(sys.executable).parent / "airflow"), *args], env=self.env, capture_output=True, text=True
        )
        if check and done.returncode:
            raise AirflowError(f"airflow {' '.join(args)} failed:\n{done.stderr[-2000:]}")
        return done

    def start(self, timeout: float = 180) -> LocalAirflow:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "logs").mkdir(exist_ok=True)
        self.airflow("db", "migrate")
        for service in SERVICES:
            log = open(self.home / "logs" / f"{service}.log", "ab")
            self.processes[service] = subprocess.Popen(
                [str(Path(sys.executable).parent / "airflow"), service],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                health = self.api("GET", "/api/v2/monitor/health")
                if health["scheduler"]["status"] == "healthy" and health["triggerer"]["status"] == "healthy":
                    return self
            except (AirflowError, OSError, KeyError):
                pass
            for service, proc in self.processes.items():
                if proc.poll() is not None:
                    raise AirflowError(
                        f"airflow {service} exited ({proc.returncode}); see {self.home / 'logs' / (service + '.log')}"
                    )
            if time.monotonic() > deadline:
                raise AirflowError(f"Airflow did not become healthy within {timeout:g} s; logs in {self.home}/logs")
            time.sleep(1)

    def stop(self) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.processes.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        self.processes.clear()

    def __enter__(self) -> LocalAirflow:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- REST API ----
    def api(self, method: str, path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        for attempt in range(4):
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    text = response.read().decode()
                break
            except urllib.error.HTTPError as e:
                raise AirflowError(f"{method} {path}: HTTP {e.code}: {e.read().decode()[:2000]}") from None
            except (TimeoutError, urllib.error.URLError):
                if method != "GET" or attempt == 3:  # reads are safe to repeat when a loaded machine is slow
                    raise
                logger.warning("GET %s timed out; asking again", path)
        return json.loads(text) if text else None

    def wait_for_dag(self, dag_id: str, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                dag = self.api("GET", f"/api/v2/dags/{dag_id}")
                if dag.get("is_paused"):
                    self.api("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})
                return dag
            except AirflowError:
                if time.monotonic() > deadline:
                    raise AirflowError(
                        f"DAG {dag_id} did not appear within {timeout:g} s; see {self.home}/logs/dag-processor.log"
                    ) from None
                time.sleep(2)

    def trigger(self, dag_id: str, conf: dict) -> str:
        run = self.api("POST", f"/api/v2/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf})
        return run["dag_run_id"]

    def runs(self, dag_id: str) -> list[dict]:
        return self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns?order_by=-start_date")["dag_runs"]

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        return self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 900, progress: bool = True) -> str:
        deadline, shown = time.monotonic() + timeout, {}
        while True:
            run = self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")
            if progress:
                for ti in self.task_instances(dag_id, run_id):
                    name = ti["task_id"] + (f"[{ti['map_index']}]" if ti["map_index"] >= 0 else "")
                    if ti["state"] and shown.get(name) != ti["state"]:
                        shown[name] = ti["state"]
                        logger.info("%-22s %s", name, ti["state"])
            if run["state"] in FINAL_STATES:
                return run["state"]
            if time.monotonic() > deadline:
                raise AirflowError(f"run {run_id} of {dag_id} did not finish within {timeout:g} s")
            time.sleep(2)

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value", map_index: int = -1):
        path = (
            f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}"
            f"?map_index={map_index}&deserialize=true"
        )
        return self.api("GET", path)["value"]
