"""A real multi-worker deployment on this machine: PostgreSQL, Redis, Airflow's api-server, scheduler,
dag-processor and triggerer with CeleryExecutor, and two Celery workers under distinct hostnames, one serving
the CPU queue (generation and data stages), one the ``npu`` queue (fine-tuning and checkpoint evaluation). Mid-fine-tune the NPU node is lost (its worker and
its training killed); a replacement worker under another hostname runs the retry, which resumes from the newest
checkpoint.

What docker/docker-compose.yml configures is what this test runs: the deployment's configuration in the Variable
distill_deployment stored in the metadata database (routing and the run settings' defaults: the run is triggered
with an empty conf, as a seed refresh starts one, and the NPU workers are started with stale ``DISTILL_*``
variables of another image, which nothing reads), the pools (the training pool counts deferred tasks), logins
with the Simple auth manager's generated passwords (anonymous and wrong-password calls refused), the teacher
key only in an Airflow Connection (created through the REST API, in no process's environment or command line),
a generated fernet key, passwords on both servers (in no command line), artifacts on one folder both workers
see. Needs Debian's ``postgresql`` and ``redis-server`` (``.ci/run``
installs them); without them the test is skipped, except under ``CI=true`` where that is a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path

import psutil
import pytest

from distilled_plugins.devtools.cluster_services import DEPLOYMENT, PostgresServer, RedisServer, ServerUnavailable
from distilled_plugins.devtools.demo import demo_settings, make_seed
from distilled_plugins.devtools.local_airflow import AirflowError, LocalAirflow, free_port
from distilled_plugins.finetune.checkpoints import latest_step_checkpoint
from distilled_plugins.finetune.job import JobPaths
from tests.support import MATH_TRAIN_SOLUTIONS, read_jsonl

DAG_ID = "distill_r1"
CPU_TASKS = (
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
    "node_ranks",
    "approve_finetune",
    "report",
    "fail_if_stopped",
)
NPU_TASKS = ("finetune", "evaluate")
TEACHER_KEY = "sk-cluster-test-key"
# the environment variables run settings came from before the Variable held them; no component reads them now
RUN_SETTINGS_ENV = ("DISTILL_DEFAULTS", "DISTILL_OUTPUT_ROOT", "DISTILL_SEED", "DISTILL_RETRY_DELAY_SECONDS")
RUN_SETTINGS_ENV += ("DISTILL_SEED_POLL_SECONDS", "DISTILL_WATCH_SEED_SECONDS")
# what an NPU image built with other defaults would carry
STALE_ENV = {"DISTILL_DEFAULTS": json.dumps({"eval_limit": 5}), "DISTILL_OUTPUT_ROOT": "/nonexistent/distill"}


def servers(stack: ExitStack) -> tuple[PostgresServer, RedisServer]:
    try:
        postgres, redis = PostgresServer(), RedisServer()
    except ServerUnavailable as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must install the cluster test's servers (.ci/run): {e}")
        pytest.skip(str(e))
    return stack.enter_context(postgres), stack.enter_context(redis)


def job_dir(finetune_dir: Path) -> Path | None:
    """The fine-tune task's job folder (``job-<inputs fingerprint>``), once it exists."""
    return next(iter(sorted(finetune_dir.glob("job-*"))), None)


def kill_training(job: Path) -> None:
    """SIGKILL node 0's supervisor, msrun and its workers, as a lost node loses them."""
    root = psutil.Process(json.loads(JobPaths(job).record(0).read_text())["pid"])
    members = [root, *root.children(recursive=True)]
    for process in members:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(members, timeout=60)


def exposed(secrets: dict[str, str], environ: bool = False) -> list[str]:
    """Which secrets some process on this machine shows on its command line (or, ``environ``, in its
    environment), as ``ps`` (or /proc/PID/environ) would."""
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            texts = [" ".join(process.cmdline())] + ([json.dumps(process.environ())] if environ else [])
            found += [
                f"{name} in pid {process.pid}" for name, secret in secrets.items() if any(secret in t for t in texts)
            ]
    return found


def when(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


@pytest.mark.slow
@pytest.mark.airflow
@pytest.mark.timeout(1800)
def test_celery_deployment_routes_tasks_and_a_lost_npu_node_resumes_on_another(replay_teacher, tmp_path):
    shared = tmp_path / "shared"  # the shared filesystem (NFS, SFS, Lustre) every worker mounts
    seed = make_seed(shared / "seed" / "seed.jsonl", 12)
    # 10 epochs: training lasts long enough to lose its node after the first checkpoint (~40 ms a step)
    settings = {**demo_settings(shared, seed), "eval_limit": 2, "eval_max_new_tokens": 8, "epochs": 10}
    # the teacher refuses requests without the key (401): the workers must read it from the Connection
    teacher, teacher_url = replay_teacher(solutions=MATH_TRAIN_SOLUTIONS, api_key=TEACHER_KEY)

    with ExitStack() as stack:
        postgres, redis = servers(stack)
        airflow = LocalAirflow(
            tmp_path / "airflow",
            port=free_port(),
            database_url=postgres.url,
            broker_url=redis.url,
            # the deployment's one place, in the database: routing and the run settings' defaults
            variables={"distill_deployment": {**DEPLOYMENT, "defaults": settings, "retry_delay_seconds": 1}},
            users="admin:admin",  # docker-compose.yml's AIRFLOW_USERS: logins with generated passwords
        )
        assert not any(TEACHER_KEY in v for v in airflow.env.values())
        assert not [k for k in airflow.env if k in RUN_SETTINGS_ENV or k.startswith("AIRFLOW_VAR_")]
        stack.enter_context(airflow)  # logged in with the generated password: every call below carries the token

        # logins are real: anonymous calls and a wrong password are refused, the generated password works
        password = airflow.password("admin")
        assert len(password) >= 8 and password != "admin"
        with pytest.raises(AirflowError, match="HTTP 401"):
            airflow.api("GET", f"/api/v2/dags/{DAG_ID}", token="")
        with pytest.raises(AirflowError, match="HTTP 403.*Invalid JWT token"):  # not signed with the JWT secret
            airflow.api("GET", f"/api/v2/dags/{DAG_ID}", token="eyJhbGciOiJIUzUxMiJ9.e30.forged")
        with pytest.raises(AirflowError, match="HTTP 401"):
            airflow.login("admin", password + "x")
        token = airflow.login("admin", password)
        assert airflow.api("GET", "/api/v2/version", token=token)["version"]

        host, _, port = teacher_url.removeprefix("http://").partition(":")
        airflow.api(
            "POST",
            "/api/v2/connections",
            {"connection_id": "teacher_default", "conn_type": "http", "host": host, "port": int(port)}
            | {"password": TEACHER_KEY},
        )
        airflow.api("POST", "/api/v2/pools", {"name": "teacher", "slots": 1, "include_deferred": False})
        airflow.api("POST", "/api/v2/pools", {"name": "npu_training", "slots": 1, "include_deferred": True})
        airflow.start_worker("cpu-node-1", ["cpu"], concurrency=2)
        airflow.start_worker("npu-node-1", ["npu"], concurrency=1, env=STALE_ENV)
        airflow.wait_for_dag(DAG_ID)
        # the form the dag-processor rendered shows the Variable's defaults
        form = airflow.api("GET", f"/api/v2/dags/{DAG_ID}/details")["params"]
        assert {name: form[name]["value"] for name in settings} == settings

        # no conf, as a run the seed watcher starts: every setting is the deployment's default, on every worker
        run_id = airflow.trigger(DAG_ID, {})
        run_dir = shared / "output" / DAG_ID / run_id
        secrets = {"postgres": postgres.password, "redis": redis.password, "teacher key": TEACHER_KEY}
        secrets["admin password"] = password
        secrets_checked = False
        # follow the run; while fine-tuning is deferred (its Celery slot freed), the training pool stays full.
        # Once it has saved a checkpoint, the NPU node is lost: its worker and its training are killed, and a
        # replacement worker under another hostname takes the npu queue over.
        deferred_pool_states, killed_at_step, deadline = [], 0, time.monotonic() + 1500
        while (state := airflow.api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")["state"]) not in (
            "success",
            "failed",
        ):
            assert time.monotonic() < deadline, "the run did not finish within 25 minutes"
            # the mapped finetune task instance exists once node_ranks has run
            finetune = next(
                (t for t in airflow.task_instances(DAG_ID, run_id) if t["task_id"] == "finetune"), {"state": None}
            )
            if finetune["state"] == "deferred":
                pool = airflow.api("GET", "/api/v2/pools/npu_training")
                deferred_pool_states.append((pool["deferred_slots"], pool["open_slots"]))
                job = job_dir(run_dir / "finetune")
                if not secrets_checked and job and JobPaths(job).record(0).exists():
                    # every process is up (services, workers, msrun and its workers): no password on a command
                    # line, the teacher key not even in an environment (msrun copies its parent's)
                    assert exposed(secrets) == [] and exposed({"teacher key": TEACHER_KEY}, environ=True) == []
                    secrets_checked = True
                if not killed_at_step and job and (step := latest_step_checkpoint(job / "checkpoint")):
                    airflow.kill_worker("npu-node-1")
                    kill_training(job)
                    killed_at_step = step
                    airflow.start_worker("npu-node-2", ["npu"], concurrency=1, env=STALE_ENV)
            time.sleep(2)
        assert state == "success", f"run {run_id} {state}; logs under {airflow.home}/logs"
        assert killed_at_step, "fine-tuning finished before it could be interrupted"
        assert secrets_checked, "the processes' command lines were never checked during training"

        tis = {(ti["task_id"], ti["map_index"]): ti for ti in airflow.task_instances(DAG_ID, run_id)}
        for (task_id, map_index), ti in tis.items():
            name = f"{task_id}[{map_index}]"
            if ti["state"] == "skipped":  # the entry points that do not apply ran nowhere, nor the gate (off)
                assert task_id in ("from_openr1", "from_packed", "approve_finetune"), name
                continue
            if task_id in CPU_TASKS:
                assert (ti["queue"], ti["hostname"]) == ("cpu", "cpu-node-1"), name
            else:
                assert task_id in NPU_TASKS, name
                assert (ti["queue"], ti["hostname"]) == ("npu", "npu-node-2"), name  # the replacement node
        assert {t for t, _ in tis} == set(CPU_TASKS + NPU_TASKS)
        assert tis[("finetune", 0)]["pool"] == "npu_training"
        # the retry on the replacement node resumed from the newest checkpoint instead of starting over
        assert tis[("finetune", 0)]["try_number"] == 2
        metrics = json.loads(JobPaths(job_dir(run_dir / "finetune")).metrics.read_text())
        assert metrics["resumed_from_step"] >= killed_at_step > 0

        # the teacher pool (1 slot) ran the two generation shards one after the other
        first, second = sorted((tis[("generate", i)] for i in range(2)), key=lambda ti: ti["start_date"])
        assert first["pool"] == second["pool"] == "teacher"
        assert when(first["end_date"]) <= when(second["start_date"])
        # a deferred fine-tune holds its training slot (include_deferred): no second training could start
        assert deferred_pool_states, "fine-tuning was never seen deferred"
        assert all(state == (1, 0) for state in deferred_pool_states), deferred_pool_states

        # the workers read the key from the Connection, nobody's environment carried it
        assert teacher.requests == 12 * 2 and set(teacher.seen_authorization) == {f"Bearer {TEACHER_KEY}"}
        # artifacts of both workers on the shared folder, handed on by path
        merged = airflow.xcom(DAG_ID, run_id, "merge")
        assert merged == f"{run_dir}/merge/generations.jsonl" and len(read_jsonl(merged)) == 12
        finetuned = airflow.xcom(DAG_ID, run_id, "finetune", map_index=0)
        assert Path(finetuned["checkpoint_dir"], "rank_0").is_dir()
        report = json.loads(Path(airflow.xcom(DAG_ID, run_id, "evaluate")).read_text())
        assert report["problems"] == 2  # the Variable's eval_limit, not the stale environment's 5 nor the code's
        assert not Path(STALE_ENV["DISTILL_OUTPUT_ROOT"]).exists()
        for artifact in ("pack/stats.json", "evaluate/report.md"):
            assert (run_dir / artifact).exists(), artifact


def test_celery_variant_refuses_sqlite(tmp_path):
    with pytest.raises(AirflowError, match="PostgreSQL or MySQL"):
        LocalAirflow(tmp_path, broker_url="redis://127.0.0.1:1/0")
