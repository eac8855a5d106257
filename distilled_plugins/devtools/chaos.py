"""Faults on the Celery deployment during one ``distill_r1`` run: what ``bench/chaos.py`` measures and the cluster
test asserts.

The deployment of ``tests/cluster`` (PostgreSQL, Redis, CeleryExecutor, a CPU and an NPU worker, API server,
scheduler, dag-processor, triggerer; see :mod:`distilled_plugins.devtools.cluster_services`) runs one
``distill_r1`` run on the replay teacher, and meets, each at a moment this script waits for:

- the broker (Redis) restarted while ``generate`` runs;
- the CPU worker SIGKILLed, with its running task, while ``generate`` runs, and a new one started under another
  hostname;
- the scheduler SIGKILLed and started again while ``generate`` runs;
- the database (PostgreSQL) restarted while a data stage (``reject_sampling``, ``handle`` or ``pack``) runs;
- the triggerer SIGKILLed while ``finetune`` is deferred and started again at once; then once more, left down
  longer than its health check allows (the scheduler then counts it dead) before it is started again.

As in docker-compose.yml (``restart: always``), a component that exits by itself is started again (the
scheduler exits when the database goes away under it); each such restart is reported. It then counts, from the
merged generations, the completions lost or duplicated against seed x generations, the
teacher's requests against those the run needed, and the most msrun jobs seen at once (sampled every half second).
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import psutil

from distilled_plugins.devtools.cluster_services import PostgresServer, RedisServer
from distilled_plugins.devtools.demo import MATH_TRAIN, demo_settings, make_seed
from distilled_plugins.devtools.local_airflow import FINAL_STATES, AirflowError, LocalAirflow, free_port
from distilled_plugins.devtools.teacher_server import ReplayTeacher, ServerThread, load_answers, replay_answer

logger = logging.getLogger(__name__)

DAG_ID = "distill_r1"
DEPLOYMENT = {"cpu_queue": "cpu", "npu_queue": "npu", "teacher_pool": "teacher", "training_pool": "npu_training"}
DATA_STAGES = ("reject_sampling", "handle", "pack")
# how long the scheduler waits for a lost worker's task and for a triggerer's heartbeat before it counts them dead:
# Airflow's defaults are 300 s and 30 s, which a run that meets these faults on purpose need not wait out
TASK_HEARTBEAT_TIMEOUT = 30
TRIGGERER_HEALTH_THRESHOLD = 10
# bench/chaos.py's size: generation lasts minutes (800 requests, 4 at a time, 0.5 s each: ~100 s per shard), and
# fine-tuning (~500 steps) outlasts both triggerer faults
SIZE = {"problems": 400, "teacher_delay": 0.5, "max_concurrent": 4, "epochs": 1}
# the cluster test's: the same faults on a shorter run (80 requests, 2 at a time, 1 s each; ~55 training steps)
TEST_SIZE = {"problems": 40, "teacher_delay": 1.0, "max_concurrent": 2, "epochs": 1}


@dataclass
class Fault:
    """One fault: ``what`` happens once ``ready(state)`` holds, by ``act(state)``; ``during`` names the task
    it hits (``ready`` returns it, or None while not yet)."""

    what: str
    ready: Callable[[dict], str | None]
    act: Callable[[dict], None]


def running(tis: list[dict], *task_ids: str) -> str | None:
    """The first of ``task_ids`` running now (``name[index]`` for a mapped one), else None."""
    for ti in tis:
        if ti["task_id"] in task_ids and ti["state"] == "running":
            return ti["task_id"] + (f"[{ti['map_index']}]" if ti["map_index"] >= 0 else "")
    return None


def msrun_jobs() -> int:
    """msrun launchers running on this machine now: one per training job."""
    count = 0
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(Path(arg).name == "msrun" for arg in (process.info["cmdline"] or [])[:2]):
                count += 1
    return count


class MsrunSampler(threading.Thread):
    """Counts msrun jobs every ``interval`` seconds until stopped; ``most`` is the highest count seen."""

    def __init__(self, interval: float = 0.5):
        super().__init__(daemon=True, name="msrun-sampler")
        self.interval, self.most, self.samples = interval, 0, 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.most = max(self.most, msrun_jobs())
            self.samples += 1


def completions(merged: Path, seed: Path, generations: int) -> dict[str, int]:
    """``lost`` and ``duplicated`` completions of ``merged`` against every seed problem x ``generations``."""
    expected = collections.Counter()
    with open(seed) as f:
        for line in f:
            expected.update((json.loads(line)["problem"], i) for i in range(generations))
    seen = collections.Counter()
    with open(merged) as f:
        for line in f:
            row = json.loads(line)
            seen.update((row["problem"], i) for i, text in enumerate(row["generations"]) if text)
    return {
        "expected": sum(expected.values()),
        "kept": sum(seen.values()),
        "lost": sum((expected - seen).values()),
        "duplicated": sum((seen - expected).values()),  # each completion beyond the one expected
    }


def faults(airflow: LocalAirflow, postgres: PostgresServer, redis: RedisServer, teacher: ReplayTeacher, total: int):
    """The faults of one run, in the order they happen. ``ready(state)`` sees ``state["tis"]`` (the run's task
    instances), ``state["since_last"]`` (seconds since the previous fault) and ``state["triggerer"]`` (its
    health)."""

    def generating(share: float):
        # generation well under way: this share of the run's requests answered, a shard still running
        return lambda s: running(s["tis"], "generate") if teacher.requests >= share * total else None

    watched_by = []  # the triggerers killed so far

    def finetune_watched(s):
        # fine-tuning deferred, its trigger running on a triggerer not killed yet: that triggerer began the trigger's
        # log (attempt=N.log.trigger.<triggerer id>.log)
        ti = next((t for t in s["tis"] if t["task_id"] == "finetune" and t["state"] == "deferred"), None)
        triggerer = ti and ti["trigger"] and ti["trigger"]["triggerer_id"]
        if not triggerer or triggerer in watched_by:
            return None
        if not any(airflow.home.glob(f"logs/**/task_id=finetune/**/*.log.trigger.{triggerer}.log")):
            return None
        watched_by.append(triggerer)
        return "finetune"

    def replace_worker(s):
        airflow.kill_worker("cpu-node-1")
        airflow.start_worker("cpu-node-2", ["cpu"], concurrency=2)

    def restart(service):
        def act(s):
            airflow.kill_service(service)
            airflow.start_service(service)

        return act

    def triggerer_down(s):
        airflow.kill_service("triggerer")
        deadline = time.monotonic() + TRIGGERER_HEALTH_THRESHOLD + 30
        while airflow.health()["triggerer"]["status"] == "healthy":  # until the scheduler counts it dead
            if time.monotonic() > deadline:
                raise ChaosError("the killed triggerer was still counted healthy")
            time.sleep(1)
        time.sleep(2)
        airflow.start_service("triggerer")

    return [
        Fault("broker restarted", generating(0.1), lambda s: redis.restart()),
        Fault("worker cpu-node-1 SIGKILLed, cpu-node-2 started", generating(0.25), replace_worker),
        Fault("scheduler SIGKILLed and started again", generating(0.55), restart("scheduler")),
        Fault("database restarted", lambda s: running(s["tis"], *DATA_STAGES), lambda s: postgres.restart()),
        Fault("triggerer SIGKILLed and started again", finetune_watched, restart("triggerer")),
        Fault("triggerer SIGKILLed, left down until counted dead, started again", finetune_watched, triggerer_down),
    ]


class ChaosError(RuntimeError):
    pass


def run(
    workdir: Path,
    problems: int,
    teacher_delay: float,
    max_concurrent: int,
    epochs: int,
    generations: int = 2,
    timeout: float = 2400,
) -> dict:
    """One ``distill_r1`` run on the Celery deployment meeting every fault of :func:`faults`; returns the figures
    (``bench/chaos.py --json``). Logs under ``workdir/airflow/logs``."""
    workdir = Path(workdir).resolve()
    seed = make_seed(workdir / "shared" / "seed" / "seed.jsonl", problems)
    settings = {
        **demo_settings(workdir / "shared", seed),
        "num_generations": generations,
        "max_concurrent": max_concurrent,
        "epochs": epochs,
        "eval_limit": 2,
        "eval_max_new_tokens": 8,
    }
    total = problems * generations
    teacher = ReplayTeacher(replay_answer(load_answers(MATH_TRAIN, "problem", "solution")), delay=teacher_delay)
    sampler = MsrunSampler()
    with ExitStack() as stack:
        server = stack.enter_context(ServerThread(teacher.app()))
        postgres, redis = stack.enter_context(PostgresServer()), stack.enter_context(RedisServer())
        airflow = stack.enter_context(_cluster(workdir, server.url, postgres, redis, settings))
        airflow.wait_for_dag(DAG_ID)
        sampler.start()
        stack.callback(sampler.stopped.set)
        run_id = airflow.trigger(DAG_ID, {})
        logger.info("run %s of %s: %d problems x %d generations", run_id, DAG_ID, problems, generations)
        began = time.time()
        state, done = _follow(airflow, run_id, faults(airflow, postgres, redis, teacher, total), timeout)
        run_seconds = round(time.time() - began, 1)
        restarts = [{**r, "at": round(r["at"] - began, 1)} for r in airflow.restarts]
        tis = airflow.task_instances(DAG_ID, run_id)
        merged = Path(airflow.xcom(DAG_ID, run_id, "merge")) if state == "success" else None
    figures = completions(merged, seed, generations) if merged else {"lost": None, "duplicated": None}
    return {
        "run_state": state,
        "run_seconds": run_seconds,
        "faults": done,
        **figures,
        "teacher_requests": teacher.requests,
        "expected_requests": total,
        "concurrent_msrun_jobs_max": sampler.most,
        # processes that exited by themselves and were started again, as docker-compose's restart: always does
        "restarts": restarts,
        "msrun_samples": sampler.samples,
        "tries": {
            t["task_id"] + (f"[{t['map_index']}]" if t["map_index"] >= 0 else ""): [t["try_number"], t["hostname"]]
            for t in tis
            if t["state"] != "skipped"
        },
        "settings": {"problems": problems, "generations": generations, "teacher_delay": teacher_delay}
        | {"max_concurrent": max_concurrent, "epochs": epochs},
        "logs": str(workdir / "airflow" / "logs"),
    }


@contextlib.contextmanager
def _cluster(workdir: Path, teacher_url: str, postgres, redis, settings: dict):
    host, _, port = teacher_url.removeprefix("http://").partition(":")
    airflow = LocalAirflow(
        workdir / "airflow",
        port=free_port(),
        database_url=postgres.url,
        broker_url=redis.url,
        restart_exited=True,  # docker-compose.yml: restart: always
        variables={"distill_deployment": {**DEPLOYMENT, "defaults": settings, "retry_delay_seconds": 1}},
        env={
            "AIRFLOW_CONN_TEACHER_DEFAULT": json.dumps({"conn_type": "http", "host": host, "port": int(port)}),
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(TASK_HEARTBEAT_TIMEOUT),
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
            "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": str(TRIGGERER_HEALTH_THRESHOLD),
        },
    )
    with airflow:
        airflow.api("POST", "/api/v2/pools", {"name": "teacher", "slots": 1, "include_deferred": False})
        airflow.api("POST", "/api/v2/pools", {"name": "npu_training", "slots": 1, "include_deferred": True})
        airflow.start_worker("cpu-node-1", ["cpu"], concurrency=2)
        airflow.start_worker("npu-node-1", ["npu"], concurrency=1)
        yield airflow


def _follow(airflow: LocalAirflow, run_id: str, pending: list[Fault], timeout: float) -> tuple[str, list[dict]]:
    """Follow the run to its end, applying each fault when its moment comes; returns its state and the faults."""
    started = last = time.monotonic()
    done, shown = [], {}
    while True:
        try:
            run = airflow.api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")
            tis = airflow.task_instances(DAG_ID, run_id)
            triggerer = airflow.health()["triggerer"]["status"]
        except (OSError, AirflowError) as e:  # the API server's database may be restarting
            logger.info("Airflow's API did not answer (%s); asking again", str(e)[:200])
            time.sleep(1)
            continue
        if run["state"] in FINAL_STATES:
            if pending:
                logger.warning("the run ended before these faults: %s", [f.what for f in pending])
            return run["state"], done
        for ti in tis:
            name = ti["task_id"] + (f"[{ti['map_index']}]" if ti["map_index"] >= 0 else "")
            if ti["state"] and shown.get(name) != (ti["state"], ti["try_number"]):
                shown[name] = (ti["state"], ti["try_number"])
                logger.info("%-22s %-10s try %d (%.0f s)", name, ti["state"], ti["try_number"], _since(started))
        state = {"tis": tis, "since_last": _since(last), "triggerer": triggerer}
        if pending and (during := pending[0].ready(state)):
            fault, t = pending.pop(0), round(_since(started), 1)
            logger.info("FAULT %s during %s (%.0f s)", fault.what, during, t)
            fault.act(state)
            done.append({"what": fault.what, "during": during, "t": t})
            last = time.monotonic()
        if _since(started) > timeout:
            raise ChaosError(f"run {run_id} did not finish within {timeout:g} s; logs in {airflow.home}/logs")
        time.sleep(1)


def _since(t: float) -> float:
    return time.monotonic() - t
