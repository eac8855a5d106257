"""Airflow's REST API (v2) as a user's scripts call it: logins, triggers, clears, runs, task instances and XComs.

:class:`AirflowRest` is the REST half of :class:`~distilled_plugins.devtools.local_airflow.LocalAirflow`, which
gives it ``url``, ``token``, ``passwords_file`` and ``home``. Nothing here imports Airflow.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from pathlib import Path

from distilled_plugins.devtools.airflow_setup import AirflowError

logger = logging.getLogger(__name__)

FINAL_STATES = ("success", "failed")
TASK_FINISHED_STATES = ("success", "failed", "skipped", "upstream_failed", "removed")


def ti_name(ti: dict) -> str:
    """A task instance of the REST API as the UI names it: ``task_id``, or ``task_id[map_index]`` when mapped."""
    return ti["task_id"] + (f"[{ti['map_index']}]" if ti["map_index"] >= 0 else "")


class AirflowRest:
    url: str
    token: str | None
    passwords_file: Path
    home: Path

    def health(self) -> dict:
        """``/api/v2/monitor/health``: each component's ``status`` (``healthy``/``unhealthy``) and last heartbeat."""
        return self.api("GET", "/api/v2/monitor/health")

    def password(self, user: str) -> str:
        """The password the Simple auth manager generated for ``user`` (``users`` given)."""
        return json.loads(self.passwords_file.read_text())[user]

    def login(self, user: str, password: str | None = None) -> str:
        """Log in (``POST /auth/token``, as docker/README.md shows) and send the token with every later call."""
        body = {"username": user, "password": password if password is not None else self.password(user)}
        self.token = self.api("POST", "/auth/token", body, token="")["access_token"]  # the login goes anonymously
        return self.token

    def api(self, method: str, path: str, body: dict | None = None, token: str | None = None):
        """One REST call with this instance's token (``token=""``: anonymously); HTTP errors raise AirflowError
        with the status code in the message (``HTTP 401: ...``)."""
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"}
        token = self.token if token is None else token
        if token:
            headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        for attempt in range(1, 4):
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    text = response.read().decode()
                break
            except urllib.error.HTTPError as e:
                raise AirflowError(f"{method} {path}: HTTP {e.code}: {e.read().decode()[:2000]}") from None
            except (TimeoutError, urllib.error.URLError) as e:
                # a loaded machine (training on every core) can stall the API server for a while: a read is asked
                # again (reads are safe to repeat, writes are not); a refused connection (no server up yet, as
                # while Airflow starts) is the caller's to handle, at once
                reason = getattr(e, "reason", e)
                if method != "GET" or attempt == 3 or isinstance(reason, ConnectionRefusedError):
                    raise
                logger.info("GET %s: %s; asking again", path, reason)
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
                time.sleep(1)

    def _writing(self, what: str, method: str, path: str, body: dict) -> dict:
        """A REST call that writes, asked again when SQLite was locked for a moment by the scheduler on a loaded
        machine (HTTP 500 "Database error"): the transaction was rolled back, so asking again writes once."""
        for attempt in range(1, 4):
            try:
                return self.api(method, path, body)
            except AirflowError as e:
                if "HTTP 500" not in str(e) or "Database error" not in str(e) or attempt == 3:
                    raise
                logger.info("%s hit a locked database; asking again", what)
                time.sleep(2 * attempt)
        raise AssertionError("unreachable")

    def trigger(self, dag_id: str, conf: dict) -> str:
        path = f"/api/v2/dags/{dag_id}/dagRuns"
        return self._writing(f"triggering {dag_id}", "POST", path, {"logical_date": None, "conf": conf})["dag_run_id"]

    def set_run_state(self, dag_id: str, run_id: str, state: str) -> dict:
        """Mark a run ``failed`` or ``success`` (the UI's "Mark as")."""
        path = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}"
        return self._writing(f"marking {run_id} {state}", "PATCH", path, {"state": state})

    def set_task_state(self, dag_id: str, run_id: str, task_id: str, state: str) -> dict:
        """Mark a task instance ``failed`` or ``success`` (the UI's "Mark as" on a task)."""
        path = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}"
        return self._writing(f"marking {task_id} {state}", "PATCH", path, {"new_state": state})

    def clear(self, dag_id: str, run_id: str, task_ids: list, downstream: bool = False) -> list[dict]:
        """Clear task instances of a run as the UI's *Clear* does (a mapped task's every index, or ``[task_id,
        map_index]``; ``downstream``: with its downstream tasks); returns the task instances cleared."""
        body = {
            "dry_run": False,
            "dag_run_id": run_id,
            "task_ids": task_ids,
            "include_downstream": downstream,
            "only_failed": False,
            "reset_dag_runs": True,
        }
        path = f"/api/v2/dags/{dag_id}/clearTaskInstances"
        return self._writing(f"clearing {task_ids} of {run_id}", "POST", path, body)["task_instances"]

    def runs(self, dag_id: str) -> list[dict]:
        return self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns?order_by=-start_date")["dag_runs"]

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        return self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 900, progress: bool = True) -> str:
        started, shown = time.monotonic(), {}
        deadline = started + timeout
        while True:
            run = self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")
            if progress:
                tis = self.task_instances(dag_id, run_id)
                finished = sum(t["state"] in TASK_FINISHED_STATES for t in tis)
                for ti in tis:
                    if ti["state"] and shown.get(name := ti_name(ti)) != ti["state"]:
                        shown[name] = ti["state"]
                        seconds = time.monotonic() - started
                        logger.info(
                            "%-22s %-10s (%d/%d tasks finished, %.0f s)", name, ti["state"], finished, len(tis), seconds
                        )
            if run["state"] in FINAL_STATES:
                return run["state"]
            if time.monotonic() > deadline:
                raise AirflowError(f"run {run_id} of {dag_id} did not finish within {timeout:g} s")
            time.sleep(1)

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value", map_index: int = -1):
        path = (
            f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}"
            f"?map_index={map_index}&deserialize=true"
        )
        return self.api("GET", path)["value"]
