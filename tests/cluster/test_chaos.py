"""The Celery deployment of tests/cluster meets, during one ``distill_r1`` run, every fault of
``bench/chaos.py`` (smaller: fewer problems): the broker and the database restarted, the scheduler, the triggerer
(twice, once left down until counted dead) and a CPU worker SIGKILLed mid-run. The run must succeed with no
completion lost or paid twice and never two training jobs at once. Needs Debian's ``postgresql`` and
``redis-server``, as the cluster test."""

from __future__ import annotations

import os
import signal
from datetime import datetime

import pytest

from distilled_plugins.devtools import chaos
from distilled_plugins.devtools.cluster_services import ServerUnavailable
from distilled_plugins.devtools.local_airflow import LocalAirflow, free_port
from tests.support import read_jsonl, wait_until, write_jsonl


@pytest.mark.slow
@pytest.mark.airflow
@pytest.mark.timeout(1800)
def test_a_run_meeting_broker_database_scheduler_triggerer_and_worker_faults_finishes_and_loses_nothing(tmp_path):
    try:
        figures = chaos.run(tmp_path, **chaos.TEST_SIZE)
    except ServerUnavailable as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must install the cluster test's servers (.ci/run): {e}")
        pytest.skip(str(e))
    assert figures["run_state"] == "success", f"logs in {figures['logs']}"
    # every fault happened, in the task it waits for, none missed nor failing
    assert figures["missed_faults"] == [] and not [f for f in figures["faults"] if "error" in f], figures["faults"]
    kinds = [fault["what"].split()[0] for fault in figures["faults"]]
    assert kinds == ["broker", "worker", "scheduler", "database", "triggerer", "triggerer"], figures["faults"]
    hit = {fault["what"].split()[0]: fault["during"].split("[")[0] for fault in figures["faults"]}
    assert hit["broker"] == hit["worker"] == hit["scheduler"] == "generate" and hit["triggerer"] == "finetune"
    assert hit["database"] in chaos.DATA_STAGES
    # the shard whose worker died was retried on the new worker and resumed; no other fault cost a task a try
    lost_shard = figures["faults"][1]["during"]
    assert figures["tries"].pop(lost_shard) == [2, "cpu-node-2"]
    assert {task: tries for task, (tries, _host) in figures["tries"].items() if tries != 1} == {}
    assert figures["lost"] == 0 and figures["duplicated"] == 0, figures
    # only the requests in flight when the worker died are sent again
    expected = figures["expected_requests"]
    assert expected <= figures["teacher_requests"] <= expected + chaos.TEST_SIZE["max_concurrent"], figures
    # training ran (the sampler saw it) and never twice at once, however often its watcher was lost
    assert figures["concurrent_msrun_jobs_max"] == 1, figures


def test_the_counts_see_a_lost_and_a_duplicated_completion(tmp_path):
    seed = write_jsonl(tmp_path / "seed.jsonl", [{"problem": p} for p in ("a", "b", "c")])
    shards = [
        write_jsonl(tmp_path / "shard-0.jsonl", [{"problem": "a", "generations": ["x", "y"]}]),
        write_jsonl(
            tmp_path / "shard-1.jsonl",
            [
                {"problem": "b", "generations": ["x", ""]},  # its second completion never came
                {"problem": "c", "generations": ["x", "y"]},
                {"problem": "c", "generations": ["x", "y"]},  # generated twice: two completions paid twice
            ],
        ),
    ]
    merged = write_jsonl(tmp_path / "merged.jsonl", [row for s in shards for row in read_jsonl(s)][:3])  # one c
    figures = chaos.completions(merged, shards, seed, generations=2)
    assert figures == {"expected": 6, "kept": 5, "lost": 1, "duplicated": 2}


@pytest.mark.slow
@pytest.mark.airflow
def test_a_service_that_exits_by_itself_is_started_again_as_restart_always_does(tmp_path):
    (tmp_path / "dags").mkdir()
    with LocalAirflow(tmp_path / "airflow", free_port(), dags_folder=tmp_path / "dags", restart_exited=True) as af:
        scheduler = af.processes["scheduler"]
        # it ends by itself (as on a database outage, or killed from outside): not through kill_service
        os.killpg(scheduler.pid, signal.SIGKILL)
        restart = wait_until(lambda: af.restarts, 30, "the scheduler started again", interval=0.5)[0]
        assert (restart["process"], restart["exit_code"]) == ("scheduler", -signal.SIGKILL)
        assert af.processes["scheduler"].pid != scheduler.pid

        def heartbeat_since_restart() -> bool:
            health = af.health()["scheduler"]
            beat = health["latest_scheduler_heartbeat"]
            return health["status"] == "healthy" and datetime.fromisoformat(beat).timestamp() > restart["at"]

        wait_until(heartbeat_since_restart, 120, "a heartbeat of the new scheduler", interval=1)
