"""A generate task in batch mode in a real Airflow (api-server, scheduler, dag-processor, triggerer; one worker
slot): it defers while the batch runs, freeing its slot for another task, logs the batch's progress, and
collects the batch when it ends; marking the deferred task failed cancels the batch at the provider, clearing it
keeps the batch for the next try."""

from __future__ import annotations

import functools
import json

import pytest

from distilled_plugins.devtools.local_airflow import LocalAirflow, free_port
from distilled_plugins.teacher.batch_api import STATE_FILE, batch_folder
from tests.support import REPO, SECRET, math_train_rows, read_jsonl, wait_until, write_jsonl

DAG_ID = "test_generate_batch"
wait_for = functools.partial(wait_until, interval=0.5)


@pytest.fixture(scope="module")
def provider():
    from distilled_plugins.devtools.batch_server import BatchTeacher
    from distilled_plugins.devtools.teacher_server import ReplayTeacher, ServerThread
    from tests.support import answer_with_solution

    batch_teacher = BatchTeacher(ReplayTeacher(answer_with_solution), api_key=SECRET, hold=True)
    with ServerThread(batch_teacher.app()) as server:
        batch_teacher.url = server.url
        yield batch_teacher


@pytest.fixture(scope="module")
def airflow(provider, tmp_path_factory):
    port = int(provider.url.rpartition(":")[2])
    conn = {"conn_type": "http", "host": "127.0.0.1", "port": port, "password": SECRET}
    env = {"AIRFLOW_CONN_TEACHER_BATCH_TEST": json.dumps(conn), "AIRFLOW__CORE__PARALLELISM": "1"}
    home = tmp_path_factory.mktemp("airflow-batch")
    with LocalAirflow(home, free_port(), dags_folder=REPO / "tests" / "dags", env=env) as running:
        running.wait_for_dag(DAG_ID)
        running.wait_for_dag("test_slot_probe")
        yield running


def start_deferred(airflow: LocalAirflow, provider, tmp_path) -> str:
    """Hold the provider's batches, trigger a run and wait until its task is deferred on a running batch."""
    provider.held = True
    seed = write_jsonl(tmp_path / "seed.jsonl", math_train_rows(12))
    before = len(provider.batches)
    run_id = airflow.trigger(DAG_ID, {"seed": str(seed), "out": str(tmp_path)})
    wait_for(lambda: len(provider.batches) > before, 180, "the batch to be submitted")
    wait_for(lambda: airflow.task_instances(DAG_ID, run_id)[0]["state"] == "deferred", 120, "the task to defer")
    # and until the triggerer watches the batch: a task marked or cleared before its trigger started has no
    # trigger to stop (under load the triggerer takes a few seconds to pick a new one up)
    batch_id = list(provider.batches)[-1]
    wait_for(lambda: f"batch {batch_id} in_progress" in task_log(airflow, run_id), 120, "the trigger to watch it")
    return run_id


def task_log(airflow: LocalAirflow, run_id: str) -> str:
    path = f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/generate/logs/1?full_content=true"
    return json.dumps(airflow.api("GET", path))


@pytest.mark.slow
def test_the_deferred_batch_task_frees_its_slot_and_collects_the_batch(airflow, provider, tmp_path):
    run_id = start_deferred(airflow, provider, tmp_path)
    # one worker slot in all (parallelism 1): another task runs only if the deferred one holds none
    probe = airflow.trigger("test_slot_probe", {})
    assert airflow.wait_for_run("test_slot_probe", probe, timeout=180, progress=False) == "success"
    assert airflow.task_instances(DAG_ID, run_id)[0]["state"] == "deferred"
    provider.release()
    assert airflow.wait_for_run(DAG_ID, run_id, timeout=300, progress=False) == "success"
    result = airflow.xcom(DAG_ID, run_id, "generate")
    assert len(read_jsonl(result["output"])) == 12
    stats = json.loads(open(result["stats"]).read())
    assert stats["teacher_mode"] == "batch" and len(stats["batches"]) == 1
    assert stats["requests_sent"] == stats["completions_ok"] == 24  # over the task's two steps
    assert stats["spent_total"]["requests_sent"] == 24  # the steps' figures are not added twice
    log = task_log(airflow, run_id)
    batch_id = stats["batches"][0]["batch_id"]
    assert f"submitted batch {batch_id}: 24 requests" in log
    assert f"batch {batch_id} in_progress: 0/24 completed" in log
    assert f"batch {batch_id} completed: 24/24 completed, 0 failed" in log
    assert SECRET not in log


@pytest.mark.slow
def test_marking_the_deferred_task_failed_cancels_its_batch_and_a_rerun_sends_it_again(airflow, provider, tmp_path):
    run_id = start_deferred(airflow, provider, tmp_path)
    batch_id = list(provider.batches)[-1]
    airflow.set_task_state(DAG_ID, run_id, "generate", "failed")
    try:
        wait_for(lambda: provider.batches[batch_id]["status"] == "cancelled", 60, "the batch to be cancelled")
    except AssertionError as e:  # what the triggerer did meanwhile
        said = (airflow.home / "logs" / "triggerer.log").read_text(errors="replace")
        raise AssertionError(f"{e}; the triggerer's log ends:\n{said[-4000:]}") from None
    assert provider.batches[batch_id]["request_counts"]["completed"] == 0  # held: nothing of it was answered
    assert airflow.wait_for_run(DAG_ID, run_id, timeout=120, progress=False) == "failed"

    # the user's stop was no failure of the requests: cleared, the task sends them again without spending an
    # attempt (the DAG allows one), in one new batch
    before = len(provider.batches)
    provider.release()
    airflow.clear(DAG_ID, run_id, ["generate"])
    assert airflow.wait_for_run(DAG_ID, run_id, timeout=300, progress=False) == "success"
    assert len(provider.batches) == before + 1
    result = airflow.xcom(DAG_ID, run_id, "generate")
    assert len(read_jsonl(result["output"])) == 12
    assert json.loads((batch_folder(result["output"]) / STATE_FILE).read_text())["attempts"] == {}


@pytest.mark.slow
def test_clearing_the_deferred_task_keeps_its_batch_for_the_next_try(airflow, provider, tmp_path):
    run_id = start_deferred(airflow, provider, tmp_path)
    batch_id, before = list(provider.batches)[-1], len(provider.batches)
    airflow.clear(DAG_ID, run_id, ["generate"])
    logs = airflow.home / "logs"
    wait_for(  # the trigger's on_kill ran and chose to keep the batch
        lambda: any("the task was cleared" in p.read_text(errors="replace") for p in logs.rglob("*.log*")),
        60,
        "the trigger to say it keeps the batch",
    )
    wait_for(
        lambda: (ti := airflow.task_instances(DAG_ID, run_id)[0])["try_number"] == 2 and ti["state"] == "deferred",
        120,
        "the next try to defer on the same batch",
    )
    assert provider.batches[batch_id]["status"] == "in_progress" and len(provider.batches) == before
    provider.release()
    assert airflow.wait_for_run(DAG_ID, run_id, timeout=300, progress=False) == "success"
    stats = json.loads(open(airflow.xcom(DAG_ID, run_id, "generate")["stats"]).read())
    assert [b["batch_id"] for b in stats["batches"]] == [batch_id] and len(provider.batches) == before
    assert stats["requests_sent"] == stats["completions_ok"] == stats["spent_total"]["requests_sent"] == 24
