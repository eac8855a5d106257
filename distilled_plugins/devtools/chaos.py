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
scheduler exits when the database goes away under it); each such restart is reported. It then counts the
completions lost (missing from the merged file) or duplicated (generated twice by the shards) against seed x
generations, the teacher's requests against those the run needed, and the most msrun jobs seen at once (sampled
every half second).
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

from distilled_plugins.core.schema import MERGED, SHARD_OUTPUT
from distilled_plugins.devtools.airflow_rest import FINAL_STATES, TASK_FINISHED_STATES, ti_name
from distilled_plugins.devtools.cluster_services import DEPLOYMENT, PostgresServer, RedisServer
from distilled_plugins.devtools.demo import MATH_TRAIN, demo_settings, make_seed, stop_training_jobs
from distilled_plugins.devtools.local_airflow import AirflowError, LocalAirflow, free_port
from distilled_plugins.devtools.teacher_server import ReplayTeacher, ServerThread, load_answers, replay_answer

logger = logging.getLogger(__name__)

DAG_ID = "distill_r1"
DATA_STAGES = ("reject_sampling", "handle", "pack")
# how long the scheduler waits for a lost worker's task and for a triggerer's heartbeat before it counts them dead:
# Airflow's defaults are 300 s and 30 s, which a run that meets these faults on purpose need not wait out
TASK_HEARTBEAT_TIMEOUT = 30
TRIGGERER_HEALTH_THRESHOLD = 10
# bench/chaos.py's size: generation lasts minutes (800 requests, 4 at a time, 0.5 s each: ~100 s per shard), and
# fine-tuning (~1,000 steps of ~40 ms on the tiny profile) outlasts both triggerer faults
SIZE = {"problems": 400, "teacher_delay": 0.5, "max_concurrent": 4, "epochs": 2}
# the cluster test's: the same faults on a shorter run (80 requests, 2 at a time, 1 s each; ~440 training steps)
TEST_SIZE = {"problems": 40, "teacher_delay": 1.0, "max_concurrent": 2, "epochs": 8}


@dataclass
class Fault:
    """One fault: ``act(tis)`` once ``ready(tis)`` returns the task it hits (``tis``: the run's task instances);
    ``missed(tis)``: its moment has passed (the tasks it waits for are done), so the faults after it go on."""

    what: str
    ready: Callable[[list[dict]], str | None]
    act: Callable[[list[dict]], None]
    missed: Callable[[list[dict]], bool]


def finished(tis: list[dict], *task_ids: str) -> bool:
    """Every instance of ``task_ids`` has finished (none of them waits or runs any more)."""
    mine = [ti for ti in tis if ti["task_id"] in task_ids]
    return bool(mine) and all(ti["state"] in TASK_FINISHED_STATES for ti in mine)


def running(tis: list[dict], *task_ids: str) -> str | None:
    """The first of ``task_ids`` running now (``name[index]`` for a mapped one), else None."""
    for ti in tis:
        if ti["task_id"] in task_ids and ti["state"] == "running":
            return ti_name(ti)
    return None


def msrun_jobs(folder: Path) -> int:
    """msrun launchers running now for jobs under ``folder`` (msrun's ``--log_dir`` is in the job's folder)."""
    count = 0
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            cmdline = process.info["cmdline"] or []
            if any(Path(arg).name == "msrun" for arg in cmdline[:2]) and str(folder) in " ".join(cmdline):
                count += 1
    return count


class MsrunSampler(threading.Thread):
    """Counts the msrun jobs under ``folder`` every ``interval`` seconds until stopped; ``most``: the most seen."""

    def __init__(self, folder: Path, interval: float = 0.5):
        super().__init__(daemon=True, name="msrun-sampler")
        self.folder, self.interval, self.most, self.samples = folder, interval, 0, 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.most = max(self.most, msrun_jobs(self.folder))
            self.samples += 1


def completions(merged: Path, shards: list[Path], seed: Path, generations: int) -> dict[str, int]:
    """Completions against every seed problem x ``generations``: ``lost``, those missing from the ``merged`` file;
    ``duplicated``, each one beyond the first that the generate ``shards`` wrote (merge keeps one row per problem,
    so a completion generated twice shows only there)."""
    expected = collections.Counter()
    with open(seed) as f:
        for line in f:
            expected.update((json.loads(line)["problem"], i) for i in range(generations))
    kept, written = _count(merged), sum((_count(shard) for shard in shards), collections.Counter())
    return {
        "expected": sum(expected.values()),
        "kept": sum(kept.values()),
        "lost": sum((expected - kept).values()),
        "duplicated": sum((written - expected).values()),
    }


def _count(path: Path) -> collections.Counter:
    """``(problem, generation index)`` -> how often ``path`` holds a completion of it."""
    seen = collections.Counter()
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            seen.update((row["problem"], i) for i, text in enumerate(row["generations"]) if text)
    return seen


def faults(airflow: LocalAirflow, postgres: PostgresServer, redis: RedisServer, teacher: ReplayTeacher, total: int):
    """The faults of one run, in the order they happen."""

    def generating(share: float):
        # generation well under way: this share of the run's requests answered, a shard still running
        return lambda tis: running(tis, "generate") if teacher.requests >= share * total else None

    killed_triggerers = set()

    def watching_triggerer(tis) -> int | None:
        # the triggerer running the deferred fine-tune's trigger: it has begun the trigger's log
        # (attempt=N.log.trigger.<triggerer id>.log)
        ti = next((t for t in tis if t["task_id"] == "finetune" and t["state"] == "deferred"), None)
        triggerer = ti and ti["trigger"] and ti["trigger"]["triggerer_id"]
        if triggerer and any(airflow.home.glob(f"logs/**/task_id=finetune/**/*.log.trigger.{triggerer}.log")):
            return triggerer
        return None

    def finetune_watched(tis):
        # by a triggerer not killed yet
        return "finetune" if watching_triggerer(tis) not in (None, *killed_triggerers) else None

    def kill_triggerer(tis):
        killed_triggerers.add(watching_triggerer(tis))
        airflow.kill_service("triggerer")

    def triggerer_restarted(tis):
        kill_triggerer(tis)
        airflow.start_service("triggerer")

    def triggerer_down(tis):
        kill_triggerer(tis)
        deadline = time.monotonic() + TRIGGERER_HEALTH_THRESHOLD + 60
        while _triggerer_health(airflow) != "unhealthy":  # until the scheduler counts it dead
            if time.monotonic() > deadline:
                raise ChaosError("the killed triggerer was still counted healthy")
            time.sleep(1)
        airflow.start_service("triggerer")

    def replace_worker(tis):
        airflow.kill_worker("cpu-node-1")
        airflow.start_worker("cpu-node-2", ["cpu"], concurrency=2)

    def restart_scheduler(tis):
        airflow.kill_service("scheduler")
        airflow.start_service("scheduler")

    def data_stage(tis):
        return running(tis, *DATA_STAGES)

    def generated(tis):
        return finished(tis, "generate")

    def trained(tis):
        return finished(tis, "finetune")

    return [
        Fault("broker restarted", generating(0.1), lambda tis: redis.restart(), generated),
        Fault("worker cpu-node-1 SIGKILLed, cpu-node-2 started", generating(0.25), replace_worker, generated),
        Fault("scheduler SIGKILLed and started again", generating(0.55), restart_scheduler, generated),
        Fault(
            "database restarted", data_stage, lambda tis: postgres.restart(), lambda tis: finished(tis, *DATA_STAGES)
        ),
        Fault("triggerer SIGKILLed and started again", finetune_watched, triggerer_restarted, trained),
        Fault(
            "triggerer SIGKILLed, left down until counted dead, started again",
            finetune_watched,
            triggerer_down,
            trained,
        ),
    ]


def _triggerer_health(airflow: LocalAirflow) -> str | None:
    try:
        return airflow.health()["triggerer"]["status"]
    except (OSError, AirflowError):  # a slow answer is asked again
        return None


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
    sampler = MsrunSampler(workdir)
    with ExitStack() as stack:
        server = stack.enter_context(ServerThread(teacher.app()))
        postgres, redis = stack.enter_context(PostgresServer()), stack.enter_context(RedisServer())
        airflow = stack.enter_context(_cluster(workdir, server.url, postgres, redis, settings))
        # training runs detached from its task: a run cut short must not leave it behind
        stack.callback(stop_training_jobs, Path(settings["output_root"]))
        airflow.wait_for_dag(DAG_ID)
        sampler.start()
        stack.callback(sampler.stopped.set)
        run_id = airflow.trigger(DAG_ID, {})
        logger.info("run %s of %s: %d problems x %d generations", run_id, DAG_ID, problems, generations)
        began = time.time()
        state, done, missed = _follow(airflow, run_id, faults(airflow, postgres, redis, teacher, total), timeout)
        run_seconds = round(time.time() - began, 1)
        restarts = [{**r, "at": round(r["at"] - began, 1)} for r in airflow.restarts]
        tis = airflow.task_instances(DAG_ID, run_id)
    run_dir = Path(settings["output_root"]) / DAG_ID / run_id
    # the rows each shard generated (its reused list names rows the store already held: not paid this run)
    shards = [run_dir / SHARD_OUTPUT.format(i) for i in range(settings["shards"])]
    merged = run_dir / MERGED
    figures = {"lost": None, "duplicated": None}
    if state == "success":
        figures = completions(merged, shards, seed, generations)
    return {
        "run_state": state,
        "run_seconds": run_seconds,
        "faults": done,
        "missed_faults": missed,  # faults whose moment passed unseen
        **figures,
        "teacher_requests": teacher.requests,
        "expected_requests": total,
        "concurrent_msrun_jobs_max": sampler.most,
        # processes that exited by themselves and were started again, as docker-compose's restart: always does
        "restarts": restarts,
        "msrun_samples": sampler.samples,
        "tries": {ti_name(ti): [ti["try_number"], ti["hostname"]] for ti in tis if ti["state"] != "skipped"},
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


def _follow(
    airflow: LocalAirflow, run_id: str, pending: list[Fault], timeout: float
) -> tuple[str, list[dict], list[str]]:
    """Follow the run to its end, applying each fault when its moment comes; returns the run's state (``timed
    out`` after ``timeout`` seconds), the faults applied and those whose moment passed unseen."""
    started = time.monotonic()
    done, missed, shown = [], [], {}
    while _since(started) < timeout:
        try:
            run = airflow.api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")
            tis = airflow.task_instances(DAG_ID, run_id)
        except (OSError, AirflowError) as e:  # the API server's database may be restarting
            logger.info("Airflow's API did not answer (%s); asking again", str(e)[:200])
            time.sleep(1)
            continue
        if run["state"] in FINAL_STATES:
            missed += [fault.what for fault in pending]
            return run["state"], done, missed
        for ti in tis:
            name = ti_name(ti)
            if ti["state"] and shown.get(name) != (ti["state"], ti["try_number"]):
                shown[name] = (ti["state"], ti["try_number"])
                logger.info("%-22s %-10s try %d (%.0f s)", name, ti["state"], ti["try_number"], _since(started))
        while pending and pending[0].missed(tis):
            missed.append(pending.pop(0).what)
            logger.warning("FAULT MISSED %s: its moment passed unseen", missed[-1])
        if pending and (during := pending[0].ready(tis)):
            fault, t = pending.pop(0), round(_since(started), 1)
            logger.info("FAULT %s during %s (%.0f s)", fault.what, during, t)
            done.append({"what": fault.what, "during": during, "t": t})
            try:
                fault.act(tis)
            except ChaosError as e:
                done[-1]["error"] = str(e)
                logger.error("FAULT %s: %s", fault.what, e)
        time.sleep(1)
    logger.error("run %s did not finish within %g s; logs in %s/logs", run_id, timeout, airflow.home)
    return "timed out", done, missed + [fault.what for fault in pending]


def _since(t: float) -> float:
    return time.monotonic() - t
