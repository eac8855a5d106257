"""Job control that works from any host: the job's folder, the nodes' records and heartbeats, stop requests, the
one test of "is this process mine", and stopping. The supervisor each node runs is :mod:`.supervisor`.

A job lives in ``<output_dir>/job-<id>/`` on storage every host sees. Each node's launcher starts a supervisor in
its own session; the supervisor records itself in ``node-<rank>.json`` (host, pid, start time, command line),
touches ``node-<rank>.heartbeat`` every few seconds, runs msrun, and writes ``node-<rank>.status.json`` when
msrun ends. Anyone, on any host, stops the job by writing ``stop.json``; every supervisor polls for it and stops
its msrun. A node whose msrun fails writes ``stop.json`` too, so the other nodes stop. Signals are only a shortcut
for a supervisor on this very host, and only after :func:`is_mine` said so.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from distilled_plugins.core.io import write_json

logger = logging.getLogger(__name__)

STOP_GRACE = 10.0  # seconds msrun gets to stop its workers after SIGTERM before the rest is killed


class JobPaths:
    """The files of one job folder."""

    def __init__(self, job_dir: str | Path):
        self.dir = Path(job_dir)
        self.job = self.dir / "job.json"  # id, fingerprint and the inputs it hashes
        self.run_config = self.dir / "run_config.yaml"
        self.log_dir = self.dir / "msrun_log"
        self.checkpoint = self.dir / "checkpoint"
        self.stop = self.dir / "stop.json"
        self.metrics = self.dir / "metrics.json"
        self.loss = self.dir / "loss.png"
        self.result = self.dir / "result.json"

    def record(self, rank: int) -> Path:
        return self.dir / f"node-{rank}.json"

    def recorded_ranks(self) -> list[int]:
        """The ranks of the nodes that wrote a record here (``node-R.json``, not ``node-R.status.json``)."""
        return sorted(
            int(m[1]) for p in self.dir.glob("node-*.json") if (m := re.fullmatch(r"node-(\d+)\.json", p.name))
        )

    def heartbeat(self, rank: int) -> Path:
        return self.dir / f"node-{rank}.heartbeat"

    def status(self, rank: int) -> Path:
        return self.dir / f"node-{rank}.status.json"

    def launcher_log(self, rank: int) -> Path:
        return self.dir / f"node-{rank}.launcher.log"


@dataclass
class NodeRecord:
    """Who runs one node of a job: written by its supervisor when it starts."""

    job_dir: str
    node_rank: int
    host: str
    pid: int
    create_time: float
    cmdline: list[str]
    started_at: float
    master_addr: str = ""  # the msrun master address this node was given (node 0's is the cluster's)
    boot_id: str = ""  # the host's boot id: with the host name, "the very machine, since its last boot"

    @classmethod
    def read(cls, path: Path) -> NodeRecord | None:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None


def this_host() -> str:
    return socket.gethostname()


def boot_id() -> str:
    """This machine's boot id (Linux; empty elsewhere): two processes that read the same one and the same host name
    share a kernel, so a pid one recorded is alive or gone for the other too."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def on_this_machine(record: NodeRecord) -> bool:
    """The record was written on this very machine since its last boot (its pid can be checked here)."""
    return record.host == this_host() and record.boot_id == boot_id()


def supervisor_gone(record: NodeRecord | None) -> str | None:
    """Why the supervisor of ``record`` is known dead without waiting for its heartbeat to age (it ran on this
    machine and its pid is gone or someone else's), else None: a record of another host is judged by heartbeat."""
    if record is None or not on_this_machine(record):
        return None
    mine, why = is_mine(record)
    return None if mine else why


def this_address() -> str:
    """This host's address as other hosts reach it (the source address of its default route)."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # nothing is sent: connecting a UDP socket only picks the route
        return s.getsockname()[0]
    try:
        return socket.gethostbyname(this_host())
    except OSError:
        return "127.0.0.1"  # no route and no resolvable name: a single host


def wait_for_master(job_dir: str | Path, timeout: float, dead_after: float) -> str:
    """The address node 0 of a running job gave msrun (``master_addr=auto``): read from its record once its
    heartbeat is fresh, so a record of an earlier attempt is never taken."""
    paths = JobPaths(job_dir)
    deadline = time.monotonic() + timeout
    while True:
        record = NodeRecord.read(paths.record(0))
        if record and record.master_addr and node_state(job_dir, 0, dead_after) == "running":
            return record.master_addr
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"node 0 of {job_dir} did not start within {timeout:g} s: its address (master_addr=auto) is "
                "unknown; check node 0's task, or give master_addr explicitly"
            )
        time.sleep(1)


def is_mine(record: NodeRecord, pid: int | None = None) -> tuple[bool, str]:
    """THE test of "may this host signal that process": ``pid`` (default: the record's supervisor) is the
    recorded supervisor (same host, same pid, same start time, same command line) or a process of its session
    started after it (msrun and its workers; they outlive a killed supervisor). Returns the verdict and why."""
    import psutil

    here = this_host()
    if record.host != here:
        return False, f"supervisor of node {record.node_rank} runs on host {record.host!r}, not on this host {here!r}"
    pid = record.pid if pid is None else pid
    try:
        proc = psutil.Process(pid)
        create_time, cmdline, status = proc.create_time(), proc.cmdline(), proc.status()
        session = os.getsid(pid)
    except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError, PermissionError):
        return False, f"pid {pid} of node {record.node_rank} is gone"
    if status == psutil.STATUS_ZOMBIE:
        return False, f"pid {pid} of node {record.node_rank} has exited"
    if pid == record.pid:
        if abs(create_time - record.create_time) > 0.05 or cmdline != record.cmdline:
            return False, (
                f"pid {pid} now belongs to another process ({' '.join(cmdline)[:120]!r}, started "
                f"{time.ctime(create_time)}): the record of node {record.node_rank} is stale"
            )
        return True, f"pid {pid} is the supervisor of node {record.node_rank}"
    if session == record.pid and create_time >= record.create_time - 0.05:
        # msrun or a worker, also one outliving a supervisor that died (the kernel reuses no pid while its session
        # lives). Only a session leader started at another time than the record says (the pid reused after the
        # session ended) makes it someone else's; a dying leader (its command line already empty) still counts.
        try:
            reused = abs(psutil.Process(record.pid).create_time() - record.create_time) > 0.05
        except psutil.NoSuchProcess:
            reused = False
        if not reused:
            return True, f"pid {pid} belongs to the session of node {record.node_rank}'s supervisor"
    return False, f"pid {pid} is not part of node {record.node_rank}'s job"


def _own_processes(record: NodeRecord) -> list:
    """The supervisor and the processes of its session on this host that :func:`is_mine` accepts, and their
    descendants (msrun starts each worker in a session of its own)."""
    import psutil

    if record.host != this_host():
        return []
    found = {}
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if (proc.pid == record.pid or os.getsid(proc.pid) == record.pid) and is_mine(record, proc.pid)[0]:
                found[proc.pid] = proc
                for child in proc.children(recursive=True):
                    if child.create_time() >= record.create_time - 0.05:
                        found.setdefault(child.pid, child)
    return list(found.values())


def live_on_this_machine(job_dir: str | Path) -> bool:
    """Some node of the job still has a process (its supervisor, msrun, a worker) on this machine."""
    paths = JobPaths(job_dir)
    for rank in paths.recorded_ranks():
        record = NodeRecord.read(paths.record(rank))
        if record and on_this_machine(record) and _own_processes(record):
            return True
    return False


# ---- stop requests, honoured by every node's supervisor -------------------------------------------------------


def stop_requested(paths: JobPaths) -> dict | None:
    try:
        return json.loads(paths.stop.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"reason": "stop requested (unreadable stop.json)"}


def request_stop(job_dir: str | Path, reason: str, by_user: bool = False) -> None:
    """Ask every node of the job to stop (works from any host that sees the folder); the first request wins.
    ``by_user``: a person asked (no automatic retry may start the job again; clearing the tasks does)."""
    paths = JobPaths(job_dir)
    if paths.dir.is_dir() and not paths.stop.exists():
        request = {"reason": reason, "host": this_host(), "requested_at": time.time(), "by_user": by_user}
        write_json(paths.stop, request)


def settle_stop_request(job_dir: str | Path, node_rank: int, dead_after: float, timeout: float) -> None:
    """Before node ``node_rank`` starts its part of the job: what to do with a stop request left in the folder.

    A stop request (a user's, or a failed node's) survives the start of any node but node 0: a retry of node 1
    must not undo a stop aimed at the whole job, so node 1 waits (up to ``timeout`` s) for node 0 to start the
    job anew, and fails with one line if it does not. Node 0 clears the request only once it was honoured: no
    node of the job still runs (by its heartbeat, so a node on another host counts too); it waits up to
    ``timeout`` s for that.
    """
    paths = JobPaths(job_dir)
    request = stop_requested(paths)
    if request is None:
        return
    reason = request.get("reason", "stop requested")
    deadline = time.monotonic() + timeout
    if node_rank == 0:
        ranks = paths.recorded_ranks()
        while running := [r for r in ranks if node_state(job_dir, r, dead_after) == "running"]:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"node(s) {', '.join(map(str, running))} of {job_dir} still run {timeout:g} s after the stop "
                    f"request ({reason}): stop their tasks (or hosts), then clear node 0's task"
                )
            time.sleep(0.5)
        logger.info("node 0 starts the job anew: clearing the stop request every node honoured (%s)", reason)
        paths.stop.unlink(missing_ok=True)
        return
    logger.info("node %d: %s was asked to stop (%s): waiting for node 0 to start it anew", node_rank, job_dir, reason)
    while stop_requested(paths) is not None:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"node {node_rank}: {job_dir} was asked to stop ({reason}) and node 0 did not start it anew within "
                f"{timeout:g} s; the request stays. To restart the job, clear node 0's task (map index 0) too"
            )
        time.sleep(1)


# ---- state, seen from any host --------------------------------------------------------------------------------


def heartbeat_age(paths: JobPaths, rank: int) -> float | None:
    """Seconds since the node's last heartbeat by this host's clock (None: no heartbeat file)."""
    try:
        return time.time() - paths.heartbeat(rank).stat().st_mtime
    except FileNotFoundError:
        return None


def node_state(job_dir: str | Path, rank: int, dead_after: float) -> str:
    """``finished`` (status written), ``running`` (heartbeat fresh), ``dead`` (no status and a heartbeat older
    than ``dead_after`` s, or at once when its supervisor ran on this machine and its pid is gone), or ``absent``
    (this node never started here)."""
    paths = JobPaths(job_dir)
    if paths.status(rank).exists():
        return "finished"
    age = heartbeat_age(paths, rank)
    if age is None:
        return "absent"
    if age >= dead_after or supervisor_gone(NodeRecord.read(paths.record(rank))):
        return "dead"
    return "running"


def running_node(job_dir: str | Path, rank: int, dead_after: float) -> NodeRecord | None:
    """The live supervisor of node ``rank`` on any host, to re-attach to instead of starting a second one. A
    record whose heartbeat stopped is reported and never adopted (nor signalled)."""
    paths = JobPaths(job_dir)
    state = node_state(job_dir, rank, dead_after)
    record = NodeRecord.read(paths.record(rank))
    if state == "running" and record:
        return record
    if state == "dead" and record and (gone := supervisor_gone(record)):
        left = _own_processes(record)  # msrun and workers of the dead supervisor would train on beside a new one
        for proc in left:
            with contextlib.suppress(Exception):
                proc.kill()
        logger.warning(
            "node %d of %s: the supervisor recorded on this host is dead (%s): not adopting it%s; starting a new one",
            rank,
            job_dir,
            gone,
            f", killed the {len(left)} process(es) it left" if left else "",
        )
        if left:
            import psutil

            psutil.wait_procs(left, timeout=10)
    elif state == "dead" and record:
        logger.warning(
            "node %d of %s: the supervisor recorded on host %s (pid %d) sent no heartbeat for %.0f s: not "
            "adopting it (%s); starting a new one",
            rank,
            job_dir,
            record.host,
            record.pid,
            heartbeat_age(paths, rank) or 0,
            is_mine(record)[1],
        )
    return None


def stop(
    job_dir: str | Path, reason: str = "stop requested", wait: float = 30.0, by_user: bool = False
) -> dict[int, str]:
    """Stop the whole job from any host: write the stop request; supervisors on this host whose identity
    :func:`is_mine` confirms also get SIGTERM, and what of them is left after ``wait`` s is killed. Returns each
    node's outcome (``stopped``, ``finished``, or why it was left alone)."""
    import psutil

    paths = JobPaths(job_dir)
    request_stop(job_dir, reason, by_user)
    records = {r.node_rank: r for rank in paths.recorded_ranks() if (r := NodeRecord.read(paths.record(rank)))}
    outcome, signalled = {}, set()
    for rank, record in records.items():
        if paths.status(rank).exists():
            outcome[rank] = "finished"
            continue
        mine, why = is_mine(record)
        if mine:
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.pid, signal.SIGTERM)
            signalled.add(rank)
        outcome[rank] = why

    def settled(rank: int) -> bool:
        if paths.status(rank).exists():
            return True
        if records[rank].host == this_host():
            return not _own_processes(records[rank])
        return node_state(job_dir, rank, STOP_GRACE * 3) == "dead"  # another host: its supervisor obeys stop.json

    deadline = time.monotonic() + wait
    pending = [r for r in records if outcome[r] != "finished" and not settled(r)]
    while pending and time.monotonic() < deadline:
        time.sleep(0.5)
        pending = [r for r in pending if not settled(r)]
    for rank in records:
        if outcome[rank] == "finished":
            continue
        left = _own_processes(records[rank])
        for proc in left:  # the supervisor did not stop them in time, or it was killed and left its session behind
            with contextlib.suppress(Exception):
                proc.kill()
        if left:
            psutil.wait_procs(left, timeout=5)
            outcome[rank] = f"killed {len(left)} process(es) still running after {wait:g} s"
        elif paths.status(rank).exists() or rank in signalled:
            outcome[rank] = "stopped"
        else:
            outcome[rank] = f"asked to stop through {paths.stop.name}; not signalled: {outcome[rank]}"
    for rank, what in outcome.items():
        logger.info("stop %s node %d (host %s): %s", job_dir, rank, records[rank].host, what)
    return outcome
