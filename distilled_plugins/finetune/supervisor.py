"""A node's supervisor: started detached in its own session by a node's launcher (:func:`start_supervisor`), it
records itself, runs msrun with a heartbeat, stops it on a stop request, when another node failed, or at once when
one of its workers died (:class:`WorkerWatch`), and writes the node's status. The job folder's files and the tests
anyone may run on them are in :mod:`.job`.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from distilled_plugins.core.io import write_json
from distilled_plugins.finetune.job import (
    STOP_GRACE,
    JobPaths,
    NodeRecord,
    boot_id,
    request_stop,
    stop_requested,
    this_host,
)

HEARTBEAT_SECONDS = 2.0  # the supervisor touches its heartbeat this often


def _terminate_tree(root_pid: int, grace: float = STOP_GRACE) -> int | None:
    """SIGTERM a process and its descendants, SIGKILL what is left after ``grace`` s; returns the root's exit
    code (it is reaped here, so its Popen can no longer tell)."""
    import psutil

    try:
        root = psutil.Process(root_pid)
        members = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return None
    returncode = None
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in members:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(sig)
        gone, members = psutil.wait_procs(members, timeout=grace)
        returncode = next((p.returncode for p in gone if p.pid == root_pid), returncode)
        if not members:
            break
    return returncode


def _end_session(leader: int) -> None:
    """Kill what is left in the supervisor's session (helpers a worker started and that lost their parent) and
    below it (a worker msrun started in a session of its own)."""
    import psutil

    left = {}
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if proc.pid != leader and os.getsid(proc.pid) == leader:
                for member in (proc, *proc.children(recursive=True)):
                    left.setdefault(member.pid, member)
    for proc in left.values():
        with contextlib.suppress(psutil.Error):
            proc.kill()
    left = list(left.values())
    if left:
        psutil.wait_procs(left, timeout=5)
        print(f"killed {len(left)} leftover process(es) of the job's session", flush=True)


class WorkerWatch:
    """Notices a dead worker as soon as msrun does: msrun polls its workers every second and logs
    ``Worker process P exit with exception. Error code: C`` to its output (this node's launcher log), kills the
    node's other workers, and then waits for its scheduler, which waits for the lost worker until
    ``MS_NODE_TIMEOUT`` (600 s): a node whose worker died would hang that long. The supervisor reads msrun's new
    output each poll and stops the node at once. It also maps each worker's pid to its log (the worker's stdout),
    so the failure names the log of the worker that died, not of one msrun killed after it."""

    _DIED = re.compile(rb"Worker process (\d+) exit with exception\. Error code: (-?\d+)")

    def __init__(self, msrun_output: Path, msrun_pid: int):
        self.output, self.msrun_pid = msrun_output, msrun_pid
        try:
            self.offset = msrun_output.stat().st_size  # the log is appended to by every attempt: this one's only
        except FileNotFoundError:
            self.offset = 0
        self.pending = b""
        self.worker_logs: dict[int, str] = {}

    def _map_workers(self) -> None:
        import psutil

        with contextlib.suppress(psutil.Error, OSError):
            for proc in psutil.Process(self.msrun_pid).children():
                if proc.pid not in self.worker_logs:
                    with contextlib.suppress(OSError):
                        stdout = os.readlink(f"/proc/{proc.pid}/fd/1")
                        if re.search(r"/worker_\d+\.log$", stdout):
                            self.worker_logs[proc.pid] = stdout

    def dead_worker(self) -> dict | None:
        """``{"pid", "exit_code", "log"}`` of a worker msrun saw die since the last call, else None."""
        self._map_workers()
        try:
            with open(self.output, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return None
        self.offset += len(chunk)
        lines = (self.pending + chunk).split(b"\n")
        self.pending = lines.pop()  # a line msrun is still writing
        for line in lines:
            if m := self._DIED.search(line):
                pid = int(m[1])
                return {"pid": pid, "exit_code": int(m[2]), "log": self.worker_logs.get(pid)}
        return None


def supervise(job_dir: Path, node_rank: int, command: list[str]) -> int:
    """Record this node, run msrun with a heartbeat, stop it on request (or when another node failed, or at once
    when one of its workers died), and write this node's status. Runs detached, in its own session, on the node's
    host."""
    import psutil

    paths = JobPaths(job_dir)
    me = psutil.Process()
    master = next((a.split("=", 1)[1] for a in command if a.startswith("--master_addr=")), "")
    record = NodeRecord(
        str(job_dir), node_rank, this_host(), me.pid, me.create_time(), me.cmdline(), time.time(), master, boot_id()
    )
    write_json(paths.record(node_rank), asdict(record))
    paths.heartbeat(node_rank).touch()
    terminated = []
    signal.signal(signal.SIGTERM, lambda signum, frame: terminated.append(signum))
    child = subprocess.Popen(command)
    workers = WorkerWatch(paths.launcher_log(node_rank), child.pid)
    stopped, died, last_beat, returncode = None, None, 0.0, None
    while child.poll() is None:
        if time.monotonic() - last_beat >= HEARTBEAT_SECONDS:
            with contextlib.suppress(OSError):
                os.utime(paths.heartbeat(node_rank))
            last_beat = time.monotonic()
        request = stop_requested(paths) or ({"reason": "SIGTERM on this host"} if terminated else None)
        if request:
            stopped = request.get("reason", "stop requested")
            print(f"stopping node {node_rank}: {stopped}", flush=True)
            returncode = _terminate_tree(child.pid)
            break
        if died := workers.dead_worker():
            print(
                f"stopping node {node_rank}: worker process {died['pid']} died (code {died['exit_code']})", flush=True
            )
            returncode = _terminate_tree(child.pid)
            break
        time.sleep(0.5)
    if returncode is None:
        returncode = child.wait()
    _end_session(me.pid)
    if died and not returncode:  # msrun ended by itself between the line and our SIGTERM: the node still failed
        returncode = 1
    if returncode and not stopped:  # this node failed: the others must not wait for it
        cause = (
            f"worker process {died['pid']} exited with code {died['exit_code']}"
            if died
            else f"msrun exit code {returncode}"
        )
        request_stop(job_dir, f"node {node_rank} failed ({cause})")
    write_json(
        paths.status(node_rank),
        {
            "returncode": returncode,
            "stopped": stopped,
            "dead_worker": died,
            "host": record.host,
            "finished_at": time.time(),
        },
    )
    return returncode


def start_supervisor(job_dir: Path, node_rank: int, command: list[str], env: dict, timeout: float = 60.0) -> NodeRecord:
    """Start this node's supervisor detached and wait for its record (the job outlives the caller)."""
    paths = JobPaths(job_dir)
    for stale in (paths.status(node_rank), paths.record(node_rank), paths.heartbeat(node_rank)):
        stale.unlink(missing_ok=True)
    with open(paths.launcher_log(node_rank), "ab") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "distilled_plugins.finetune",
                "--supervise",
                str(job_dir),
                str(node_rank),
                "--",
                *command,
            ],
            cwd=job_dir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while (record := NodeRecord.read(paths.record(node_rank))) is None or record.pid != process.pid:
        if process.poll() is not None:
            raise RuntimeError(
                f"the supervisor of {job_dir} node {node_rank} exited at once ({process.returncode}); "
                f"see {paths.launcher_log(node_rank)}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(f"the supervisor of {job_dir} node {node_rank} did not start within {timeout:g} s")
        time.sleep(0.1)
    return record
