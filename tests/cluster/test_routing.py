"""Queue and pool routing and the run settings' defaults are deployment configuration: the Variable
distill_deployment, read when the DAG is parsed, sends each kind of task to its queue and pool and gives the
parameters their defaults, without editing the DAG. (Here the Variable comes from the environment, the cheapest
way to parse the file alone; a deployment keeps it in the database, as tests/cluster/test_celery_cluster.py
does.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support import REPO

DAG_FILE = REPO / "dags" / "distill_r1.py"


def parse_dag(deployment: str | None, show: str = "{t.task_id: [t.queue, t.pool] for t in m.dag.tasks}") -> dict:
    """Parse dags/distill_r1.py in a fresh process with this Variable and print ``show`` (an expression of the
    module ``m``) as JSON."""
    code = (
        "import json, importlib.util as u; "
        f"s = u.spec_from_file_location('d', {str(DAG_FILE)!r}); m = u.module_from_spec(s); s.loader.exec_module(m); "
        f"print(json.dumps({show}))"
    )
    env = {k: v for k, v in os.environ.items() if k != "AIRFLOW_VAR_DISTILL_DEPLOYMENT"}
    # what an image built for the old environment-based settings carries: read by nothing any more
    env.update(DISTILL_DEFAULTS='{"num_generations": 9}', DISTILL_OUTPUT_ROOT="/elsewhere", DISTILL_SEED="/x.jsonl")
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
        "approve_finetune": ["cpu", "default_pool"],
        "report": ["cpu", "default_pool"],
        "fail_if_stopped": ["cpu", "default_pool"],
    }


def test_without_the_variable_every_task_runs_on_the_default_queue_and_pool():
    assert set(map(tuple, parse_dag(None).values())) == {("default", "default_pool")}


def test_a_mistyped_deployment_key_is_one_clear_error():
    with pytest.raises(RuntimeError, match="distill_deployment: unknown key.*npu_qeue"):
        parse_dag('{"npu_qeue": "npu"}')


def test_the_run_settings_defaults_come_from_the_deployment_variable():
    """docker/deployment.json's defaults become the form's defaults, the watched seed and the output root; the
    intervals become the retry delay and the fine-tune trigger's poll; no DISTILL_* variable in the environment changes any of it."""
    deployment = json.loads((REPO / "docker" / "deployment.json").read_text())
    deployment["defaults"]["num_generations"] = 3
    deployment["retry_delay_seconds"] = 7
    deployment["training_poll_seconds"] = 2.5
    show = (
        "{'params': {n: m.params[n].value for n in m.params}, 'seed_uri': m.SEED.uri, "
        "'retry_delay': m.dag.default_args['retry_delay'].total_seconds(), "
        "'training_poll': m.dag.get_task('finetune').partial_kwargs['poll_interval']}"
    )
    parsed = parse_dag(json.dumps(deployment), show)
    for name, value in deployment["defaults"].items():
        assert parsed["params"][name] == value, name
    assert parsed["seed_uri"] == "file:///data/seed/seed.parquet"
    assert parsed["retry_delay"] == 7 and parsed["training_poll"] == 2.5
    unset = parse_dag(None, show)  # no Variable: the code's
    assert unset["params"]["output_root"] == "/opt/airflow/distill" and unset["training_poll"] == 5.0


def test_a_default_for_an_unknown_parameter_is_one_clear_error():
    with pytest.raises(RuntimeError, match="defaults names unknown parameter.*num_generation;"):
        parse_dag(json.dumps({"defaults": {"num_generation": 3}}))
