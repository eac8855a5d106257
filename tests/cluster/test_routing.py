"""Queue and pool routing is deployment configuration: the Variable distill_deployment, read when the DAG is
parsed, sends each kind of task to its queue and pool, without editing the DAG."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

DAG_FILE = REPO / "dags" / "distill_r1.py"


def parse_dag(deployment: str | None) -> dict:
    code = (
        "import json, importlib.util as u; "
        f"s = u.spec_from_file_location('d', {str(DAG_FILE)!r}); m = u.module_from_spec(s); s.loader.exec_module(m); "
        "print(json.dumps({t.task_id: [t.queue, t.pool] for t in m.dag.tasks}))"
    )
    env = {k: v for k, v in os.environ.items() if k != "AIRFLOW_VAR_DISTILL_DEPLOYMENT"}
    if deployment is not None:
        env["AIRFLOW_VAR_DISTILL_DEPLOYMENT"] = deployment
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    if done.returncode:
        raise RuntimeError(done.stderr.strip().splitlines()[-1])
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_queues_and_pools_come_from_the_deployment_variable():
    deployment = {"cpu_queue": "cpu", "npu_queue": "npu", "teacher_pool": "teacher", "training_pool": "npu_training"}
    routes = parse_dag(json.dumps(deployment))
    assert routes == {
        **{task: ["cpu", "default_pool"] for task in ("choose_source", "seed", "from_openr1", "from_packed")},
        "node_ranks": ["cpu", "default_pool"],
        "shard_plan": ["cpu", "default_pool"],
        "generate": ["cpu", "teacher"],
        "merge": ["cpu", "default_pool"],
        "reject_sampling": ["cpu", "default_pool"],
        "handle": ["cpu", "default_pool"],
        "pack": ["cpu", "default_pool"],
        "finetune": ["npu", "npu_training"],
        "evaluate": ["npu", "default_pool"],
    }


def test_without_the_variable_every_task_runs_on_the_default_queue_and_pool():
    assert set(map(tuple, parse_dag(None).values())) == {("default", "default_pool")}


def test_a_mistyped_deployment_key_is_one_clear_error():
    with pytest.raises(RuntimeError, match="distill_deployment: unknown key.*npu_qeue"):
        parse_dag('{"npu_qeue": "npu"}')
