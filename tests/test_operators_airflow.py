"""The project's operators in one real Airflow (api-server, scheduler, dag-processor, triggerer; the DAGs of
tests/dags; one worker slot), driven through its REST API as a user's clicks drive it:

- a deferred fine-tune: marking the task failed stops training; killing the job's supervisor fails the task with
  the log tail; a missing base checkpoint fails at once, without the retries the DAG allows, its line at the
  log's top level;
- a generate task in batch mode: it defers while the batch runs, freeing its slot for another task, logs the
  batch's progress and collects the batch when it ends; marking it failed cancels the batch at the provider,
  clearing it keeps the batch for the next try.

One Airflow serves the module (starting one takes seconds each time); the tests run in file order.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import psutil
import pytest

from distilled_plugins.core import configs
from distilled_plugins.devtools.local_airflow import LocalAirflow, free_port
from distilled_plugins.teacher.batch_api import STATE_FILE, batch_folder
from tests.support import REPO, SECRET, job_processes, math_train_rows, read_jsonl, wait_until, write_jsonl

FINETUNE_DAG = "test_finetune_control"
BATCH_DAG = "test_generate_batch"
FAIL_FAST_DAG = "test_fail_fast"
TEST_DAGS = REPO / "tests" / "dags"
wait_for = functools.partial(wait_until, interval=0.5)

pytestmark = [pytest.mark.slow, pytest.mark.airflow]


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
    bundle = {"name": "test-dags", "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle"}
    env = {
        "AIRFLOW_CONN_TEACHER_BATCH_TEST": json.dumps(conn),
        # one worker slot in all: a task deferred on a batch must free it for another (the slot probe)
        "AIRFLOW__CORE__PARALLELISM": "1",
        "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST": json.dumps([{**bundle, "kwargs": {"path": str(TEST_DAGS)}}]),
    }
    home = tmp_path_factory.mktemp("airflow-operators")
    with LocalAirflow(home, free_port(), dags_folder=TEST_DAGS, env=env) as running:
        for dag_id in (FINETUNE_DAG, FAIL_FAST_DAG, BATCH_DAG, "test_slot_probe"):
            running.wait_for_dag(dag_id)
        yield running


# ---- a deferred fine-tune ----


def start_training(airflow: LocalAirflow, tiny_packed, out: Path) -> tuple[str, Path]:
    """Trigger a run and wait until its task is deferred and the job logged a training step."""
    conf = {
        "config": str(configs.CONFIG_DIR / "finetune_tiny_cpu.yaml"),
        "data": str(tiny_packed),
        "out": str(out),
        "port": free_port(),
    }
    run_id = airflow.trigger(FINETUNE_DAG, conf)

    def training() -> Path | None:
        logs = list(out.glob("job-*/msrun_log/worker_0.log"))
        return logs[0].parent.parent if logs and "step:[" in logs[0].read_text() else None

    job = wait_for(training, 300, "a logged training step")
    state = airflow.task_instances(FINETUNE_DAG, run_id)[0]["state"]
    assert state == "deferred", state
    return run_id, job


def finetune_log(airflow: LocalAirflow, run_id: str) -> str:
    path = f"/api/v2/dags/{FINETUNE_DAG}/dagRuns/{run_id}/taskInstances/finetune/logs/1?full_content=true"
    return json.dumps(airflow.api("GET", path))


def test_marking_the_deferred_task_failed_stops_training(airflow, tiny_packed, tmp_path):
    run_id, job = start_training(airflow, tiny_packed, tmp_path / "out")
    assert job_processes(tmp_path)
    airflow.set_task_state(FINETUNE_DAG, run_id, "finetune", "failed")
    marked = time.monotonic()
    wait_for(lambda: not job_processes(tmp_path), 30, "every process of the job to end")
    assert time.monotonic() - marked < 30
    assert "stopped by a user" in json.loads((job / "stop.json").read_text())["reason"]
    status = json.loads((job / "node-0.status.json").read_text())
    assert status["stopped"] and status["returncode"] != 0
    assert airflow.wait_for_run(FINETUNE_DAG, run_id, timeout=120, progress=False) == "failed"


def test_a_killed_supervisor_fails_the_task_with_the_log_tail(airflow, tiny_packed, tmp_path):
    run_id, job = start_training(airflow, tiny_packed, tmp_path / "out")
    supervisor = json.loads((job / "node-0.json").read_text())["pid"]
    psutil.Process(supervisor).kill()  # as if its container went away; msrun and the worker are left behind
    assert airflow.wait_for_run(FINETUNE_DAG, run_id, timeout=240, progress=False) == "failed"
    log = finetune_log(airflow, run_id)
    assert "training node 0 of" in log and "dead (its supervisor on this host is gone" in log  # known at once here
    assert "last lines of" in log and "worker_0.log" in log
    wait_for(lambda: not job_processes(tmp_path), 60, "the leftovers of the job to be stopped")


def test_a_missing_checkpoint_fails_at_once_with_the_line_at_top_level(airflow, tiny_packed, tmp_path):
    conf = {"data": str(tiny_packed), "out": str(tmp_path / "out"), "port": free_port()}
    run_id = airflow.trigger(FAIL_FAST_DAG, conf)
    assert airflow.wait_for_run(FAIL_FAST_DAG, run_id, timeout=300) == "failed"
    (ti,) = airflow.task_instances(FAIL_FAST_DAG, run_id)
    assert ti["state"] == "failed" and ti["try_number"] == 1  # no retry: none can fix a missing checkpoint
    path = f"/api/v2/dags/{FAIL_FAST_DAG}/dagRuns/{run_id}/taskInstances/finetune/logs/1?full_content=true"
    events = [str(e.get("event", "")) if isinstance(e, dict) else str(e) for e in airflow.api("GET", path)["content"]]
    failed = [i for i, e in enumerate(events) if e.startswith("FAILED finetune")]
    assert len(failed) == 1, events  # once: the failure callback does not repeat it
    assert "/nonexistent/Qwen2.5-Math-7B-Instruct" in events[failed[0]]
    assert "what to do: set the 'Base checkpoint' parameter" in events[failed[0]]
    post = events.index("::group::Post Execute")
    assert failed[0] < post, events  # shown at the top level, before Airflow's collapsed group
    assert events.count("::endgroup::") >= 1 and events.index("::endgroup::") < failed[0]  # after "Pre Execute"


# ---- generation in batch mode ----


def start_deferred(airflow: LocalAirflow, provider, tmp_path) -> str:
    """Hold the provider's batches, trigger a run and wait until its task is deferred on a running batch."""
    provider.held = True
    seed = write_jsonl(tmp_path / "seed.jsonl", math_train_rows(12))
    before = len(provider.batches)
    run_id = airflow.trigger(BATCH_DAG, {"seed": str(seed), "out": str(tmp_path)})
    wait_for(lambda: len(provider.batches) > before, 180, "the batch to be submitted")
    wait_for(lambda: airflow.task_instances(BATCH_DAG, run_id)[0]["state"] == "deferred", 120, "the task to defer")
    # and until the triggerer watches the batch: a task marked or cleared before its trigger started has no
    # trigger to stop (under load the triggerer takes a few seconds to pick a new one up)
    batch_id = list(provider.batches)[-1]
    wait_for(lambda: f"batch {batch_id} in_progress" in batch_log(airflow, run_id), 120, "the trigger to watch it")
    return run_id


def batch_log(airflow: LocalAirflow, run_id: str) -> str:
    path = f"/api/v2/dags/{BATCH_DAG}/dagRuns/{run_id}/taskInstances/generate/logs/1?full_content=true"
    return json.dumps(airflow.api("GET", path))


def test_the_deferred_batch_task_frees_its_slot_and_collects_the_batch(airflow, provider, tmp_path):
    run_id = start_deferred(airflow, provider, tmp_path)
    # one worker slot in all (parallelism 1): another task runs only if the deferred one holds none
    probe = airflow.trigger("test_slot_probe", {})
    assert airflow.wait_for_run("test_slot_probe", probe, timeout=180, progress=False) == "success"
    assert airflow.task_instances(BATCH_DAG, run_id)[0]["state"] == "deferred"
    provider.release()
    assert airflow.wait_for_run(BATCH_DAG, run_id, timeout=300, progress=False) == "success"
    result = airflow.xcom(BATCH_DAG, run_id, "generate")
    assert len(read_jsonl(result["output"])) == 12
    stats = json.loads(open(result["stats"]).read())
    assert stats["teacher_mode"] == "batch" and len(stats["batches"]) == 1
    assert stats["requests_sent"] == stats["completions_ok"] == 24  # over the task's two steps
    assert stats["spent_total"]["requests_sent"] == 24  # the steps' figures are not added twice
    log = batch_log(airflow, run_id)
    batch_id = stats["batches"][0]["batch_id"]
    assert f"submitted batch {batch_id}: 24 requests" in log
    assert f"batch {batch_id} in_progress: 0/24 completed" in log
    assert f"batch {batch_id} completed: 24/24 completed, 0 failed" in log
    assert SECRET not in log


def test_marking_the_deferred_task_failed_cancels_its_batch_and_a_rerun_sends_it_again(airflow, provider, tmp_path):
    run_id = start_deferred(airflow, provider, tmp_path)
    batch_id = list(provider.batches)[-1]
    airflow.set_task_state(BATCH_DAG, run_id, "generate", "failed")
    try:
        wait_for(lambda: provider.batches[batch_id]["status"] == "cancelled", 60, "the batch to be cancelled")
    except AssertionError as e:  # what the triggerer did meanwhile
        said = (airflow.home / "logs" / "triggerer.log").read_text(errors="replace")
        raise AssertionError(f"{e}; the triggerer's log ends:\n{said[-4000:]}") from None
    assert provider.batches[batch_id]["request_counts"]["completed"] == 0  # held: nothing of it was answered
    assert airflow.wait_for_run(BATCH_DAG, run_id, timeout=120, progress=False) == "failed"

    # the user's stop was no failure of the requests: cleared, the task sends them again without spending an
    # attempt (the DAG allows one), in one new batch
    before = len(provider.batches)
    provider.release()
    airflow.clear(BATCH_DAG, run_id, ["generate"])
    assert airflow.wait_for_run(BATCH_DAG, run_id, timeout=300, progress=False) == "success"
    assert len(provider.batches) == before + 1
    result = airflow.xcom(BATCH_DAG, run_id, "generate")
    assert len(read_jsonl(result["output"])) == 12
    assert json.loads((batch_folder(result["output"]) / STATE_FILE).read_text())["attempts"] == {}


def test_clearing_the_deferred_task_keeps_its_batch_for_the_next_try(airflow, provider, tmp_path):
    run_id = start_deferred(airflow, provider, tmp_path)
    batch_id, before = list(provider.batches)[-1], len(provider.batches)
    airflow.clear(BATCH_DAG, run_id, ["generate"])
    logs = airflow.home / "logs"
    wait_for(  # the trigger's on_kill ran and chose to keep the batch
        lambda: any("the task was cleared" in p.read_text(errors="replace") for p in logs.rglob("*.log*")),
        60,
        "the trigger to say it keeps the batch",
    )
    wait_for(
        lambda: (ti := airflow.task_instances(BATCH_DAG, run_id)[0])["try_number"] == 2 and ti["state"] == "deferred",
        120,
        "the next try to defer on the same batch",
    )
    assert provider.batches[batch_id]["status"] == "in_progress" and len(provider.batches) == before
    provider.release()
    assert airflow.wait_for_run(BATCH_DAG, run_id, timeout=300, progress=False) == "success"
    stats = json.loads(open(airflow.xcom(BATCH_DAG, run_id, "generate")["stats"]).read())
    assert [b["batch_id"] for b in stats["batches"]] == [batch_id] and len(provider.batches) == before
    assert stats["requests_sent"] == stats["completions_ok"] == stats["spent_total"]["requests_sent"] == 24
