"""Retry as users do it, in a real Airflow (api-server, scheduler, dag-processor, triggerer on 127.0.0.1): after a
successful run every task is cleared (through the REST API, as the UI's *Clear* does), with or without its
downstream tasks, and the run succeeds again with only the cleared tasks rerun; a failed run is cleared and
succeeds; a run with bad inputs fails in its first task, one line per problem.

One Airflow serves the module's tests (starting one takes a minute here); they run in file order.
"""

from __future__ import annotations

import json
import shutil
import urllib.parse
from pathlib import Path

import pytest

from distilled_plugins.devtools.airflow_rest import ti_name
from distilled_plugins.devtools.demo import airflow_for_demo, demo_settings, make_seed
from distilled_plugins.devtools.local_airflow import free_port
from tests.support import MATH_TRAIN_SOLUTIONS

DAG_ID = "distill_r1"
pytestmark = [pytest.mark.slow, pytest.mark.airflow]
# skipped in a generate run: the entry points it does not take, and the approval gate (off unless asked for)
SKIPPED_BRANCHES = {"from_openr1", "from_packed", "approve_finetune"}


class Run:
    """One run of the DAG, seen through the REST API."""

    def __init__(self, airflow, run_id: str):
        self.airflow, self.run_id = airflow, run_id

    def tries(self) -> dict[str, tuple[str, int]]:
        """task (``name[i]`` for a mapped one) -> (state, try number)."""
        return {ti_name(ti): (ti["state"], ti["try_number"]) for ti in self.airflow.task_instances(DAG_ID, self.run_id)}

    def events(self, asset: str) -> list[dict]:
        asset_id = self.airflow.api("GET", f"/api/v2/assets?name_pattern={asset}")["assets"][0]["id"]
        query = urllib.parse.urlencode({"asset_id": asset_id, "source_run_id": self.run_id})
        events = self.airflow.api("GET", f"/api/v2/assets/events?{query}")["asset_events"]
        return sorted(events, key=lambda e: e["timestamp"])

    def xcom(self, task_id: str, **kwargs):
        return self.airflow.xcom(DAG_ID, self.run_id, task_id, **kwargs)

    def clear(self, task_ids: list, downstream: bool, expect: set[str], timeout: float = 900) -> dict:
        """Clear ``task_ids``, wait for the run to end, check it succeeded with exactly ``expect`` rerun (each one
        try more, every other task as it was); returns the tries after."""
        before = self.tries()
        cleared = self.airflow.clear(DAG_ID, self.run_id, task_ids, downstream)
        names = {ti_name(t) for t in cleared}
        assert names == expect | (SKIPPED_BRANCHES & names), (task_ids, names)
        state = self.airflow.wait_for_run(DAG_ID, self.run_id, timeout=timeout)
        after = self.tries()
        assert state == "success", (task_ids, after)
        for task, (was, tried) in before.items():
            now, tries = after[task]
            if task in expect:
                assert (now, tries) == ("success", tried + 1), (task_ids, task, before[task], after[task])
            else:  # not cleared, or a branch not taken: skipped again
                assert (now, tries) == (was, tried) or (task in SKIPPED_BRANCHES and now == "skipped"), (
                    task_ids,
                    task,
                    before[task],
                    after[task],
                )
        return after


@pytest.fixture(scope="module")
def env(tmp_path_factory, module_replay_teacher):
    tmp = tmp_path_factory.mktemp("clear-airflow")
    seed = make_seed(tmp / "seed" / "seed.jsonl", 4)
    settings = {
        **demo_settings(tmp, seed),
        "num_generations": 1,
        "epochs": 1,
        "eval_limit": 1,
        "eval_max_new_tokens": 4,
    }
    teacher, url = module_replay_teacher(solutions=MATH_TRAIN_SOLUTIONS)
    airflow = airflow_for_demo(tmp, url, free_port(), settings, retry_delay_seconds=1)
    with airflow:
        airflow.wait_for_dag(DAG_ID)
        yield airflow, teacher, settings, tmp


def test_every_task_cleared_and_the_run_succeeds_again_with_only_the_cleared_tasks_rerun(env):
    airflow, teacher, settings, _tmp = env
    run = Run(airflow, airflow.trigger(DAG_ID, settings))
    assert airflow.wait_for_run(DAG_ID, run.run_id, timeout=900) == "success"
    first = run.tries()
    ran = {task for task, (state, _) in first.items() if state == "success"}
    assert ran == set(first) - SKIPPED_BRANCHES
    checkpoint = run.xcom("finetune", map_index=0)["checkpoint_dir"]
    evaluated = Path(run.xcom("evaluate")).parent
    requests = teacher.requests

    # the case: Clear on pack, Downstream preselected. pack writes the same rows again, so fine-tuning
    # returns its finished job and evaluation its completions (before: evaluate refused them); each announces again
    run.clear(["pack"], downstream=True, expect={"pack", "finetune[0]", "evaluate", "report", "fail_if_stopped"})
    assert run.xcom("finetune", map_index=0)["checkpoint_dir"] == checkpoint
    assert len(list((evaluated / "completions").iterdir())) == 1
    for asset in ("distill_packed_dataset", "distill_model", "distill_eval_report"):
        assert len(run.events(asset)) == 2, asset  # the rerun announced what it made

    # every other task cleared alone (in one clear: each reruns without its downstream tasks); stages whose input
    # did not change reuse what they have: generation its store, fine-tuning its job, evaluation its completions;
    # the branches not taken are skipped again
    alone = ["choose_source", "seed", "shard_plan", "generate", "merge", "reject_sampling", "handle"]
    alone += ["node_ranks", "finetune", "evaluate", "report", "fail_if_stopped", *sorted(SKIPPED_BRANCHES)]
    run.clear(alone, downstream=False, expect=ran - {"pack"})
    assert run.xcom("finetune", map_index=0)["checkpoint_dir"] == checkpoint
    assert len(list((evaluated / "completions").iterdir())) == 1
    assert teacher.requests == requests  # every completion came from the generation store
    assert len(run.events("distill_model")) == 3 and len(run.events("distill_eval_report")) == 3

    # a failed run: a shard's output lost, merge cleared with its downstream tasks fails at once
    shard = Path(run.xcom("generate", map_index=1)["output"])
    shard.unlink()
    airflow.clear(DAG_ID, run.run_id, ["merge"], downstream=True)
    assert airflow.wait_for_run(DAG_ID, run.run_id, timeout=300) == "failed"
    assert run.tries()["merge"][0] == "failed"
    # ... and the finished fine-tune job removed, so the mended run trains a new model: clearing the shard with
    # its downstream tasks succeeds, evaluation makes completions for the new checkpoint beside the old ones
    shutil.rmtree(Path(checkpoint).parent)
    downstream = {
        "generate[1]",
        "merge",
        "reject_sampling",
        "handle",
        "pack",
        "finetune[0]",
        "evaluate",
        "report",
        "fail_if_stopped",
    }
    run.clear([["generate", 1]], downstream=True, expect=downstream)
    assert shard.exists() and teacher.requests == requests
    assert len(list((evaluated / "completions").iterdir())) == 2
    assert run.events("distill_model")[-1]["extra"]["checkpoint_uri"] == f"file://{Path(checkpoint).resolve()}"
    report = json.loads((evaluated / "report.json").read_text())
    assert report["problems"] == 1 and len(run.events("distill_eval_report")) == 4


def test_a_run_with_missing_inputs_fails_in_its_first_task_with_one_line_per_problem(env):
    airflow, _teacher, settings, tmp = env
    blocked = tmp / "a-file"
    blocked.write_text("not a folder\n")
    bad = {
        **settings,
        "seed_dataset": str(tmp / "no-such-seed.jsonl"),
        "base_checkpoint": "/nonexistent/Qwen2.5-Math-7B-Instruct",
        "epochs": 2.5,  # the form lets a fraction through
        "teacher_conn_id": "no_such_teacher",
        "output_root": str(blocked / "output"),
    }
    run = Run(airflow, airflow.trigger(DAG_ID, bad))
    assert airflow.wait_for_run(DAG_ID, run.run_id, timeout=300) == "failed"
    tries = run.tries()
    assert tries["choose_source"] == ("failed", 1)  # at once: no retry can fix it
    # node_ranks (no upstream task) is a list of numbers, and report and fail_if_stopped teardowns (they run whatever
    # happened); every stage after choose_source is held back
    teardowns = ("report", "fail_if_stopped")
    held = {state for task, (state, _) in tries.items() if task not in ("choose_source", "node_ranks", *teardowns)}
    assert held <= {"upstream_failed", None}, tries
    assert tries["report"][0] == "skipped", tries  # nothing was written to report on, at once (no retry)
    assert tries["fail_if_stopped"][0] == "success", tries  # a failed task already fails the run
    log = airflow.api(
        "GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run.run_id}/taskInstances/choose_source/logs/1?full_content=true"
    )["content"]
    events = [str(e.get("event", "")) if isinstance(e, dict) else str(e) for e in log]
    expected = [
        "Epochs: 2.5 is not a whole number",
        f"Seed dataset: {tmp / 'no-such-seed.jsonl'}: no such file or folder",
        "Base checkpoint: /nonexistent/Qwen2.5-Math-7B-Instruct: no such file or folder",
        "Teacher connection: connection 'no_such_teacher'",
        f"Output folder: {blocked / 'output'}: cannot write there",
    ]
    for line in expected:
        assert sum(e.startswith(line) for e in events) == 1, (line, events)
    (summary,) = [e for e in events if e.startswith("FAILED choose_source")]
    assert "5 input(s) of this run are missing or wrong" in summary and "trigger a new run" in summary

    # the packed entry point checks its own input, not the seed's
    packed = {**settings, "source": "packed_dataset", "packed_dataset": str(tmp / "no-packed")}
    run = Run(airflow, airflow.trigger(DAG_ID, packed))
    assert airflow.wait_for_run(DAG_ID, run.run_id, timeout=300) == "failed"
    assert run.tries()["choose_source"] == ("failed", 1)
    log = airflow.api(
        "GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run.run_id}/taskInstances/choose_source/logs/1?full_content=true"
    )["content"]
    events = [str(e.get("event", "")) if isinstance(e, dict) else str(e) for e in log]
    assert [e for e in events if e.startswith(("Packed dataset:", "Seed dataset:"))] == [
        f"Packed dataset: {tmp / 'no-packed'}: no such folder; give a folder written by python -m "
        "distilled_plugins.pack"
    ]
