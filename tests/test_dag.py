"""The distill_r1 DAG: its definition, and real runs in a private Airflow (api-server, scheduler, dag-processor,
triggerer on 127.0.0.1, SQLite) driven through the REST API."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiohttp import web

from distilled_plugins.demo import airflow_for_demo, demo_settings, make_seed
from distilled_plugins.local_airflow import AirflowError, free_port
from distilled_plugins.teacher_server import ReplayTeacher, ServerThread, load_answers, replay_answer
from tests.conftest import MATH_TRAIN_SOLUTIONS, REPO, read_jsonl, write_jsonl

DAG_FILE = REPO / "dags" / "distill_r1.py"
DAG_ID = "distill_r1"


def test_dag_imports_fast_and_every_param_is_documented():
    code = (
        "import time, json, importlib.util as u; t = time.monotonic(); "
        f"s = u.spec_from_file_location('d', {str(DAG_FILE)!r}); m = u.module_from_spec(s); s.loader.exec_module(m); "
        "took = time.monotonic() - t; "
        "print(json.dumps({'took': took, 'tasks': [x.task_id for x in m.dag.tasks], "
        "'params': {k: [p.description, p.schema] for k, p in m.params.items()}}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout.strip().splitlines()[-1])
    assert info["took"] < 2.0
    assert info["tasks"] == [
        "choose_source",
        "seed",
        "from_openr1",
        "from_packed",
        "shard_plan",
        "generate",
        "merge",
        "reject_sampling",
        "handle",
        "pack",
        "finetune",
        "evaluate",
    ]
    for name, (description, schema) in info["params"].items():
        assert description and len(description) > 10, name
        assert schema.get("type") in ("string", "integer"), name
    assert info["params"]["finetune_config"][1]["enum"] == ["finetune_qwen_2_5_7b.yaml", "finetune_tiny_cpu.yaml"]
    assert info["params"]["shards"][1]["minimum"] == 1


def flaky_teacher(answers: dict[str, str], failures: int) -> ReplayTeacher:
    """Replays reference solutions; its first ``failures`` requests get HTTP 500."""
    calls = []

    def answer(problem: str) -> str:
        calls.append(problem)
        if len(calls) <= failures:
            raise web.HTTPInternalServerError(text='{"error": "teacher overloaded"}', content_type="application/json")
        return replay_answer(answers)(problem)

    return ReplayTeacher(answer)


@pytest.mark.slow
def test_rest_trigger_retry_and_seed_refresh_in_a_real_airflow(tmp_path):
    seed = make_seed(tmp_path / "seed" / "seed.jsonl", 16)
    settings = {
        **demo_settings(tmp_path, seed),
        "eval_limit": 2,
        "eval_max_new_tokens": 8,
        "request_attempts": 1,
    }  # one attempt per request: a teacher error fails the task, the retry resumes
    answers = load_answers(MATH_TRAIN_SOLUTIONS, "problem", "solution")
    teacher = flaky_teacher(answers, failures=2)
    with ServerThread(teacher.app()) as server:
        airflow = airflow_for_demo(tmp_path, server.url, free_port(), settings)
        airflow.env["DISTILL_RETRY_DELAY_SECONDS"] = "1"
        with airflow:
            airflow.wait_for_dag(DAG_ID)

            with pytest.raises(AirflowError, match="HTTP 400.*shards"):  # refused before any task runs
                airflow.trigger(DAG_ID, {**settings, "shards": 0})
            assert airflow.runs(DAG_ID) == []

            run_id = airflow.trigger(DAG_ID, settings)
            assert airflow.wait_for_run(DAG_ID, run_id, timeout=900) == "success"
            tries = {
                (ti["task_id"], ti["map_index"]): ti["try_number"] for ti in airflow.task_instances(DAG_ID, run_id)
            }
            assert max(tries[("generate", 0)], tries[("generate", 1)]) == 2  # failed once, then resumed
            assert teacher.requests == 16 * 2 + 2  # only the two failed requests were sent again
            merged = airflow.xcom(DAG_ID, run_id, "merge")
            assert merged == f"{tmp_path}/output/{DAG_ID}/{run_id}/merge/generations.jsonl"
            rows = read_jsonl(merged)
            assert len(rows) == 16 and len({r["problem"] for r in rows}) == 16  # nothing lost, nothing twice
            finetuned = airflow.xcom(DAG_ID, run_id, "finetune")
            assert Path(finetuned["checkpoint_dir"], "rank_0").is_dir()
            report = json.loads(Path(airflow.xcom(DAG_ID, run_id, "evaluate")).read_text())
            assert report["problems"] == 2 and report["protocol"]["n_samples"] == 1
            for task in (
                "reject_sampling/filtered.jsonl",
                "handle/stats.json",
                "pack/stats.json",
                "finetune/metrics.json",
                "evaluate/report.md",
                "evaluate/accuracy.png",
            ):
                assert (tmp_path / "output" / DAG_ID / run_id / task).exists(), task

            # the seed refreshes with 3 new problems; the seed watcher notices and starts a run (no REST call)
            before = teacher.requests
            extra = [json.loads(line) for line in open(MATH_TRAIN_SOLUTIONS)][200:203]
            write_jsonl(seed, read_jsonl(seed) + [{"problem": r["problem"], "answer": r["answer"]} for r in extra])
            deadline = time.monotonic() + 120
            while not (new := [r for r in airflow.runs(DAG_ID) if r["run_type"] == "asset_triggered"]):
                assert time.monotonic() < deadline, "the asset event started no run"
                time.sleep(2)
            second = new[0]["dag_run_id"]
            assert airflow.wait_for_run(DAG_ID, second, timeout=900) == "success"
            assert teacher.requests - before == 3 * 2  # only the new problems went to the teacher
            reused = sum(
                json.loads(Path(airflow.xcom(DAG_ID, second, "generate", map_index=i)["stats"]).read_text())[
                    "rows_reused_from_store"
                ]
                for i in range(2)
            )
            assert reused == 16
