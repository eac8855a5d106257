"""A hub dataset seed watched in a real Airflow (api-server, scheduler, dag-processor, triggerer on 127.0.0.1,
SQLite), against the local hub stand-in (``HF_ENDPOINT`` in the services' environment: never the real hub), with
the replay teacher on 127.0.0.1.
"""

from __future__ import annotations

import json
import time

import pytest

from distilled_plugins.devtools.demo import airflow_for_demo, demo_settings, make_seed
from distilled_plugins.devtools.hub_standin import HubStandin
from distilled_plugins.devtools.local_airflow import free_port
from distilled_plugins.devtools.teacher_server import ServerThread
from operators.triggers.seed_change import STATE_KEY
from tests.support import MATH_TRAIN_SOLUTIONS, read_jsonl, wait_until

DAG_ID = "distill_r1"
REPO_ID = "standin/math-seed"
pytestmark = [pytest.mark.slow, pytest.mark.airflow]


def test_a_new_hub_commit_starts_a_run_that_reads_exactly_that_commit(replay_teacher, tmp_path):
    problems = make_seed(tmp_path / "problems.jsonl", 7).read_text().splitlines(keepends=True)
    hub = HubStandin()
    first_sha = hub.publish(REPO_ID, {"train.jsonl": "".join(problems[:4])})
    teacher, teacher_url = replay_teacher(solutions=MATH_TRAIN_SOLUTIONS)
    with ServerThread(hub.app()) as hub_server:
        settings = {**demo_settings(tmp_path, tmp_path / "unused"), "seed_dataset": REPO_ID}
        airflow = airflow_for_demo(tmp_path, teacher_url, free_port(), settings, seed_poll_seconds=1)
        airflow.env.update(
            HF_ENDPOINT=hub_server.url,
            HF_HOME=str(tmp_path / "hf-home"),
            HF_HUB_OFFLINE="0",
            HF_DATASETS_OFFLINE="0",
        )
        with airflow:
            airflow.wait_for_dag(DAG_ID)
            asset = airflow.api("GET", "/api/v2/assets?name_pattern=distill_seed")["assets"][0]
            assert asset["uri"] == f"hf://datasets/{REPO_ID}"

            def fingerprint():
                try:
                    return airflow.api("GET", f"/api/v2/assets/{asset['id']}/state-store/{STATE_KEY}")["value"]
                except Exception:
                    return None

            def seed_events():
                return airflow.api("GET", f"/api/v2/assets/events?asset_id={asset['id']}")["asset_events"]

            def polled(times: int) -> None:
                asked = hub.requests
                wait_until(lambda: hub.requests >= asked + times, 60, f"the watcher did not ask the hub {times} times")

            baseline = wait_until(fingerprint, 120, "the seed watcher recorded no baseline fingerprint")
            assert baseline["digest"] == baseline["revision"] == first_sha

            # the same commit, asked again and again; then an outage (HTTP 500): nothing fires, the watcher lives on
            polled(5)
            hub.failing = 500
            polled(3)
            hub.failing = None
            assert airflow.runs(DAG_ID) == [] and seed_events() == []

            # a new commit: a run starts by itself (no REST call) and reads exactly that commit
            second_sha = hub.publish(REPO_ID, {"train.jsonl": "".join(problems[:6])})
            published = time.monotonic()
            run = wait_until(lambda: airflow.runs(DAG_ID), 60, "a new commit on the hub started no run")[0]
            assert run["run_type"] == "asset_triggered" and time.monotonic() - published < 60
            run_id = run["dag_run_id"]
            seed_info = wait_until(
                lambda: (
                    {ti["task_id"]: ti["state"] for ti in airflow.task_instances(DAG_ID, run_id)}.get("seed")
                    == "success"
                    and airflow.xcom(DAG_ID, run_id, "seed")
                ),
                120,
                "the refresh run's seed task did not finish",
                interval=2,
            )
            assert seed_info == {
                "seed": f"{REPO_ID}@{second_sha}",
                "fingerprint": second_sha,
                "rows": 6,
                "uri": f"hf://datasets/{REPO_ID}@{second_sha}",
            }
            (event,) = seed_events()
            assert event["extra"]["payload"]["path"] == f"{REPO_ID}@{second_sha}"

            # a commit while the run is active: its generate tasks still read the run's commit (6 problems) ...
            hub.publish(REPO_ID, {"train.jsonl": "".join(problems)})
            wait_until(lambda: len(seed_events()) == 2, 60, "the third commit fired no event")

            def merged():
                states = {ti["task_id"]: ti["state"] for ti in airflow.task_instances(DAG_ID, run_id)}
                assert states.get("merge") != "failed" and "failed" not in states.values(), states
                return states.get("merge") == "success"

            wait_until(merged, 300, "the refresh run's generation did not get through merge", interval=2)
            rows = read_jsonl(airflow.xcom(DAG_ID, run_id, "merge"))
            expected = [json.loads(line)["problem"] for line in problems[:6]]
            assert sorted(r["problem"] for r in rows) == sorted(expected)
            assert teacher.requests == 6 * settings["num_generations"]
            # ... and that commit is not lost: it starts the next run once this one ends
            airflow.set_run_state(DAG_ID, run_id, "failed")
            runs = wait_until(lambda: len(airflow.runs(DAG_ID)) == 2 and airflow.runs(DAG_ID), 120, "no queued run")
            queued = next(r["dag_run_id"] for r in runs if r["dag_run_id"] != run_id)
            airflow.set_run_state(DAG_ID, queued, "failed")
