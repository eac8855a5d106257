"""Stage 5 end to end: find the job for these inputs, launch (or re-attach to) this node's part, wait, collect."""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from distilled_plugins.core.errors import FinetuneFailed, FinetuneStoppedByUser
from distilled_plugins.core.io import write_json
from distilled_plugins.finetune import job as jobs
from distilled_plugins.finetune.config import FinetuneConfig
from distilled_plugins.finetune.fingerprint import fingerprint
from distilled_plugins.finetune.job import JobPaths
from distilled_plugins.finetune.metrics import (
    FinetuneResult,
    failing_worker,
    finished_result,
    global_step,
    latest_progress,
    log_size,
    log_tail,
    read_steps,
    steps_file,
    write_metrics,
)
from distilled_plugins.finetune.run_config import (
    TRAIN_ENTRY,
    deferral_timeout,
    job_config,
    job_env,
    preflight,
    resolved_config,
    stall_timeout,
    total_steps,
)
from distilled_plugins.finetune.supervisor import start_supervisor

logger = logging.getLogger(__package__)  # the stage's name, from any of its modules


@dataclass
class Job:
    """The job these inputs train: its folder (named by the inputs' fingerprint) and its time limits."""

    job_dir: str
    fingerprint: str
    run_config: dict
    stall_timeout: float
    deferral_timeout: float


@dataclass
class Launch:
    """This node's part of a running job."""

    job_dir: str
    node_rank: int
    host: str
    pid: int
    resume_step: int  # -1: unknown (re-attached), taken from the first logged step


def find_job(cfg: FinetuneConfig) -> Job:
    """The job folder of these inputs: ``<output_dir>/job-<first 12 hex of the fingerprint>``. Earlier jobs of
    other inputs in ``output_dir`` are kept and named in the log."""
    run_config = resolved_config(cfg)
    digest, _inputs = fingerprint(cfg, run_config)
    job_dir = Path(cfg.output_dir) / f"job-{digest[:12]}"
    others = sorted(str(d) for d in Path(cfg.output_dir).glob("job-*") if d != job_dir)
    if others and not job_dir.exists():
        logger.info("the inputs changed since the job(s) %s (kept as they are): new job %s", ", ".join(others), job_dir)
    return Job(str(job_dir), digest, run_config, stall_timeout(cfg, run_config), deferral_timeout(cfg, run_config))


def launch(cfg: FinetuneConfig, job: Job | None = None) -> Launch:
    """Preflight, write the job's files and start this node's msrun under a detached supervisor; returns at once."""
    import yaml

    job = job or find_job(cfg)
    job_dir = Path(job.job_dir)
    run_config, resume_step = job_config(job.run_config, job_dir, total_steps(cfg, job.run_config))
    preflight(cfg, run_config, resuming=bool(resume_step))
    paths = JobPaths(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    if not paths.job.exists():
        _, inputs = fingerprint(cfg, job.run_config)
        write_json(paths.job, {"job_id": job_dir.name, "fingerprint": job.fingerprint, "inputs": inputs})
    # a stop request outlives a retry of another node; node 0 clears it once every node honoured it
    jobs.settle_stop_request(job_dir, cfg.node_rank, cfg.dead_after, job.stall_timeout)
    tmp = paths.run_config.with_suffix(f".{cfg.node_rank}.tmp")  # every node writes the same YAML
    with open(tmp, "w") as f:
        yaml.safe_dump(run_config, f, sort_keys=False)
    tmp.replace(paths.run_config)
    master_addr = cfg.master_addr
    if master_addr == "auto":  # node 0 publishes its address in its record; the other nodes wait for it
        if cfg.nodes == 1:
            master_addr = "127.0.0.1"
        elif cfg.node_rank == 0:
            master_addr = jobs.this_address()
        else:
            master_addr = jobs.wait_for_master(job_dir, job.stall_timeout, cfg.dead_after)
        logger.info("master_addr=auto: msrun's master (node 0) is at %s", master_addr)
    # several nodes: node 0 hosts msrun's scheduler by rank (see msrun_node), whatever addresses hosts share
    msrun = ["msrun"] if cfg.nodes == 1 else [sys.executable, "-m", "distilled_plugins.finetune.msrun_node"]
    command = [
        *msrun,
        f"--worker_num={cfg.worker_num}",
        f"--local_worker_num={cfg.local_worker_num}",
        f"--master_addr={master_addr}",
        f"--master_port={cfg.master_port}",
        f"--node_rank={cfg.node_rank}",
        f"--log_dir={paths.log_dir}",
        "--join=True",
        str(TRAIN_ENTRY),
        "--config",
        str(paths.run_config),
        "--run_mode",
        "finetune",
    ]
    paths.log_dir.mkdir(exist_ok=True)
    for rank in range(cfg.node_rank * cfg.local_worker_num, (cfg.node_rank + 1) * cfg.local_worker_num):
        steps_file(job_dir, rank).unlink(missing_ok=True)  # this attempt's steps only (a resume starts anew)
    record = start_supervisor(job_dir, cfg.node_rank, command, job_env(run_config))
    logger.info(
        "%s node %d of %d: msrun with %d worker(s) (%d on this node, host %s); logs in %s",
        f"resumed from step {resume_step}:" if resume_step else "started",
        cfg.node_rank,
        cfg.nodes,
        cfg.worker_num,
        cfg.local_worker_num,
        record.host,
        paths.log_dir,
    )
    return Launch(str(job_dir), cfg.node_rank, record.host, record.pid, resume_step)


def attach(cfg: FinetuneConfig, job: Job) -> Launch | None:
    """This node's part of the job if it still runs (on any host, by its heartbeat), to re-attach to."""
    record = jobs.running_node(job.job_dir, cfg.node_rank, cfg.dead_after)
    if record is None:
        return None
    logger.info(
        "re-attaching to node %d of %s, still running on host %s (pid %d)",
        cfg.node_rank,
        job.job_dir,
        record.host,
        record.pid,
    )
    return Launch(job.job_dir, cfg.node_rank, record.host, record.pid, -1)  # -1: read from the log


def probe(job_dir: str | Path, node_rank: int) -> dict:
    """One look at a node, from any host (blocking file I/O: the trigger runs it in a thread)."""
    paths = JobPaths(job_dir)
    try:
        heartbeat = paths.heartbeat(node_rank).stat().st_mtime_ns
    except FileNotFoundError:
        heartbeat = None
    return {
        "finished": paths.status(node_rank).exists(),
        "heartbeat": heartbeat,
        # a supervisor of this very machine whose pid is gone is dead now, not once its heartbeat has aged
        "gone": jobs.supervisor_gone(jobs.NodeRecord.read(paths.record(node_rank))),
        "log_size": log_size(job_dir),
        "progress": latest_progress(job_dir),
    }


class Watch:
    """Decides ``running``/``finished``/``dead``/``stalled`` from successive probes: a node is dead when its
    heartbeat file did not change for ``dead_after`` s of the watcher's own clock (so hosts' clocks may differ),
    stalled when no worker log grew for ``stall_timeout`` s."""

    def __init__(self, dead_after: float, stall_timeout: float | None):
        self.dead_after, self.stall_timeout = dead_after, stall_timeout
        now = time.monotonic()
        self.heartbeat, self.beat_seen = None, now
        self.size, self.grew = -1, now
        self.progress = None

    def update(self, seen: dict) -> tuple[str, str]:
        now = time.monotonic()
        if seen["finished"]:
            return "finished", "the node's status was written"
        if seen.get("gone"):
            return "dead", f"its supervisor on this host is gone: {seen['gone']}"
        if seen["heartbeat"] != self.heartbeat:
            self.heartbeat, self.beat_seen = seen["heartbeat"], now
        elif now - self.beat_seen > self.dead_after:
            return "dead", f"no heartbeat for {now - self.beat_seen:.0f} s (the supervisor is gone)"
        if seen["log_size"] != self.size:
            self.size, self.grew = seen["log_size"], now
        elif self.stall_timeout and now - self.grew > self.stall_timeout:
            return "stalled", f"worker logs did not grow for {self.stall_timeout:g} s"
        return "running", ""


def wait(launched: Launch, poll_interval: float = 5.0, dead_after: float = 60.0, stall: float | None = None) -> str:
    """Block until this node ends, logging progress; returns ``finished``, ``dead`` or ``stalled``."""
    watch = Watch(dead_after, stall)
    while True:
        seen = probe(launched.job_dir, launched.node_rank)
        state, why = watch.update(seen)
        if state != "running":
            if why and state != "finished":
                logger.warning("node %d of %s: %s", launched.node_rank, launched.job_dir, why)
            return state
        if seen["progress"] and seen["progress"] != watch.progress:
            logger.info("training: %s", seen["progress"])
            watch.progress = seen["progress"]
        time.sleep(poll_interval)


def _dead_worker(job_dir: Path, rank: int) -> dict | None:
    """The worker whose death stopped node ``rank`` (its supervisor's status says), if one did."""
    try:
        return json.loads(JobPaths(job_dir).status(rank).read_text()).get("dead_worker")
    except (OSError, ValueError):
        return None


def _node_tail(job_dir: Path, rank: int, local_workers: int) -> str:
    dead = _dead_worker(job_dir, rank)
    worker = (Path(dead["log"]) if dead and dead.get("log") else None) or failing_worker(
        job_dir, range(rank * local_workers, (rank + 1) * local_workers)
    )
    log = worker or JobPaths(job_dir).launcher_log(rank)
    return f"last lines of {log}:\n{log_tail(log)}"


def collect(cfg: FinetuneConfig, launched: Launch, state: str, why: str = "") -> FinetuneResult:
    """Turn this node's ended part into a result (node 0 writes metrics, curve, result.json) or a FinetuneFailed
    with the log tail of the node that failed."""
    job_dir = Path(launched.job_dir)
    paths = JobPaths(job_dir)
    rank = launched.node_rank
    if state in ("dead", "stalled"):
        jobs.stop(job_dir, f"node {rank} {state}: {why}")
        launcher = paths.launcher_log(rank)
        raise FinetuneFailed(
            f"training node {rank} of {job_dir} {state} ({why}); the job was stopped. Last progress: "
            f"{latest_progress(job_dir) or 'no step logged'}; {_node_tail(job_dir, rank, cfg.local_worker_num)}\n"
            f"last lines of {launcher}:\n{log_tail(launcher, 10)}"
        )
    status = json.loads(paths.status(rank).read_text())
    if status["returncode"] != 0:
        # stopped on request, or failed on its own while another node's failure was already announced
        request = jobs.stop_requested(paths) or {}
        stopped = status.get("stopped") or request.get("reason", "")
        if request.get("by_user"):  # no automatic retry: a person stopped it, a person restarts it
            raise FinetuneStoppedByUser(
                f"node {rank} of {job_dir} stopped: {request['reason']} (last progress: "
                f"{latest_progress(job_dir) or 'no step logged'})"
            )
        culprit = rank
        if stopped.startswith("node ") and stopped.split()[1].isdigit():
            culprit = int(stopped.split()[1])
        dead = status.get("dead_worker")
        if dead:  # stopped at once by its supervisor: msrun itself would have waited for its scheduler
            raise FinetuneFailed(
                f"node {rank}: training worker process {dead['pid']} died (exit code {dead['exit_code']}"
                f"{', killed by signal ' + str(-dead['exit_code']) if dead['exit_code'] < 0 else ''}); the node "
                f"was stopped (last progress: {latest_progress(job_dir) or 'no step logged'}); "
                + _node_tail(job_dir, rank, cfg.local_worker_num)
            )
        raise FinetuneFailed(
            f"msrun of node {rank} exited with code {status['returncode']}"
            + (f", stopped: {stopped}" if stopped and (culprit != rank or status.get("stopped")) else "")
            + f" (last progress: {latest_progress(job_dir) or 'no step logged'}); node {culprit}'s "
            + _node_tail(job_dir, culprit, cfg.local_worker_num)
        )
    if rank == 0:
        return write_metrics(job_dir, cfg.worker_num, launched.resume_step)
    steps = read_steps(job_dir, rank * cfg.local_worker_num)
    if not steps:
        first = paths.log_dir / f"worker_{rank * cfg.local_worker_num}.log"
        raise FinetuneFailed(
            f"node {rank} ended without a single recorded step; last lines of {first}:\n{log_tail(first)}"
        )
    return FinetuneResult(
        str(paths.checkpoint), str(paths.metrics), str(paths.loss), global_step(steps[-1]), global_step(steps[0]) - 1
    )


def finished(cfg: FinetuneConfig, job: Job) -> FinetuneResult | None:
    """The result of this node's part if the job already finished with these inputs (no training again)."""
    paths = JobPaths(job.job_dir)
    if cfg.node_rank == 0:
        return finished_result(job.job_dir)
    status = paths.status(cfg.node_rank)
    if status.exists() and json.loads(status.read_text())["returncode"] == 0:
        return collect(cfg, Launch(job.job_dir, cfg.node_rank, "", 0, 0), "finished")
    return None


def run(cfg: FinetuneConfig) -> FinetuneResult:
    """Fine-tune to the end in the foreground (the CLI, and the operator without deferral)."""
    job = find_job(cfg)
    done = finished(cfg, job)
    if done:
        logger.info(
            "%s already holds this finished job (checkpoints in %s): not training again",
            job.job_dir,
            done.checkpoint_dir,
        )
        return done
    launched = attach(cfg, job) or launch(cfg, job)
    try:
        state = wait(launched, cfg.poll_interval, cfg.dead_after, job.stall_timeout)
    except BaseException:
        jobs.stop(
            launched.job_dir, f"the foreground run of node {cfg.node_rank} on host {jobs.this_host()} was interrupted"
        )
        raise
    return collect(cfg, launched, state, "see the log above")
