"""Job identity and control without training: "is this process mine", stale and foreign records, stop requests
obeyed by a real supervisor, and the fingerprint that names a job's folder."""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import psutil
import pytest

from distilled_plugins.core import configs, errors
from distilled_plugins.finetune import FinetuneConfig, stage
from distilled_plugins.finetune import job as jobs
from distilled_plugins.finetune.job import JobPaths, NodeRecord
from distilled_plugins.finetune.supervisor import start_supervisor
from tests.support import TINY_ROWS, XComTI, wait_until

TINY = str(configs.CONFIG_DIR / "finetune_tiny_cpu.yaml")


wait_for = functools.partial(wait_until, interval=0.1)  # polls every 0.1 s


@pytest.fixture
def sleeper():
    """A live process that has nothing to do with any job."""
    proc = subprocess.Popen(["sleep", "300"])
    yield proc
    proc.kill()
    proc.wait()


def record_for(job_dir: Path, proc: psutil.Process, **changes) -> NodeRecord:
    record = NodeRecord(str(job_dir), 0, jobs.this_host(), proc.pid, proc.create_time(), proc.cmdline(), time.time())
    for key, value in changes.items():
        setattr(record, key, value)
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / "node-0.json").write_text(json.dumps(asdict(record)))
    return record


class TestIsMine:
    def test_the_recorded_process_on_this_host_is_mine(self, sleeper, tmp_path):
        record = record_for(tmp_path, psutil.Process(sleeper.pid))
        assert jobs.is_mine(record) == (True, f"pid {sleeper.pid} is the supervisor of node 0")

    def test_a_record_of_another_host_is_never_mine(self, sleeper, tmp_path):
        record = record_for(tmp_path, psutil.Process(sleeper.pid), host="node-elsewhere")
        mine, why = jobs.is_mine(record)
        assert not mine and "runs on host 'node-elsewhere'" in why

    def test_a_reused_pid_is_not_mine(self, sleeper, tmp_path):
        # the record names a live process, but one started later with another command line: a stale record
        record = record_for(tmp_path, psutil.Process(sleeper.pid), create_time=1.0, cmdline=["python", "-m", "x"])
        mine, why = jobs.is_mine(record)
        assert not mine and "belongs to another process" in why and "stale" in why

    def test_a_gone_pid_is_not_mine(self, tmp_path):
        gone = subprocess.Popen(["sleep", "300"])
        record = record_for(tmp_path, psutil.Process(gone.pid))
        gone.kill()
        gone.wait()
        assert jobs.is_mine(record) == (False, f"pid {gone.pid} of node 0 is gone")


class TestStaleAndForeignRecords:
    def test_a_stale_record_naming_a_live_unrelated_process_is_reported_not_adopted(self, sleeper, tmp_path, caplog):
        caplog.set_level(logging.WARNING)
        record_for(tmp_path, psutil.Process(sleeper.pid), create_time=1.0)
        beat = JobPaths(tmp_path).heartbeat(0)
        beat.touch()
        os.utime(beat, (time.time() - 600, time.time() - 600))  # its supervisor stopped beating 10 minutes ago
        assert jobs.running_node(tmp_path, 0, dead_after=60) is None
        assert f"(pid {sleeper.pid}) sent no heartbeat" in caplog.text and "not adopting it" in caplog.text
        outcome = jobs.stop(tmp_path, "test", wait=1)
        assert sleeper.poll() is None  # never signalled
        assert "belongs to another process" in outcome[0]

    def test_a_live_job_on_another_host_is_re_attached_and_stopped_by_request_only(self, sleeper, tmp_path):
        record_for(tmp_path, psutil.Process(sleeper.pid), host="node-elsewhere")
        JobPaths(tmp_path).heartbeat(0).touch()  # fresh heartbeat: it is running over there
        attached = jobs.running_node(tmp_path, 0, dead_after=60)
        assert attached is not None and attached.host == "node-elsewhere"  # no second training is started
        outcome = jobs.stop(tmp_path, "user", wait=1)
        assert sleeper.poll() is None  # the pid means nothing on this host: not signalled
        assert json.loads((tmp_path / "stop.json").read_text())["reason"] == "user"
        assert outcome[0].startswith("asked to stop through stop.json") and "node-elsewhere" in outcome[0]


class TestSupervisor:
    def start(self, tmp_path: Path, command: list[str]) -> NodeRecord:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        return start_supervisor(tmp_path, 0, command, env)

    def test_heartbeat_and_a_stop_request_from_anywhere(self, tmp_path):
        record = self.start(tmp_path, ["sleep", "300"])
        assert jobs.is_mine(record)[0] and record.cmdline[1:4] == ["-m", "distilled_plugins.finetune", "--supervise"]
        beat = JobPaths(tmp_path).heartbeat(0)
        first = beat.stat().st_mtime_ns
        wait_for(lambda: beat.stat().st_mtime_ns != first, 30, "a second heartbeat")
        assert jobs.node_state(tmp_path, 0, 60) == "running"
        sleep = [p for p in psutil.Process(record.pid).children() if p.name() == "sleep"]
        jobs.request_stop(tmp_path, "asked from another host")  # a file, no signal
        wait_for(lambda: JobPaths(tmp_path).status(0).exists(), 30, "the node's status")
        status = json.loads(JobPaths(tmp_path).status(0).read_text())
        assert status["stopped"] == "asked from another host" and status["returncode"] != 0
        assert sleep and not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in sleep)

    def test_a_failing_node_asks_the_others_to_stop(self, tmp_path):
        self.start(tmp_path, [sys.executable, "-c", "raise SystemExit(3)"])
        wait_for(lambda: JobPaths(tmp_path).status(0).exists(), 30, "the node's status")
        assert json.loads((tmp_path / "stop.json").read_text())["reason"] == "node 0 failed (msrun exit code 3)"

    def test_leftovers_of_a_killed_supervisor_are_mine_and_stopped(self, tmp_path):
        record = self.start(tmp_path, ["sleep", "300"])

        def sleeping():  # the supervised command itself, not a short-lived helper the supervisor starts first
            return [p for p in psutil.Process(record.pid).children() if p.name() == "sleep"]

        wait_for(sleeping, 30, "the supervised process")
        orphan = sleeping()[0]
        psutil.Process(record.pid).kill()
        wait_for(lambda: not jobs.is_mine(record)[0], 30, "the supervisor to be gone")
        verdict = jobs.is_mine(record, orphan.pid)
        assert verdict[0], (verdict[1], os.getsid(orphan.pid), record.pid, orphan.create_time() - record.create_time)
        outcome = jobs.stop(tmp_path, "dead supervisor", wait=2)
        assert outcome[0].startswith("killed 1 process")
        wait_for(lambda: not orphan.is_running() or orphan.status() == psutil.STATUS_ZOMBIE, 30, "the orphan to end")

    def test_a_dead_supervisor_of_this_machine_is_dead_at_once_and_a_rerun_kills_what_it_left(self, tmp_path, caplog):
        caplog.set_level(logging.WARNING)
        record = self.start(tmp_path, ["sleep", "300"])
        assert record.boot_id == jobs.boot_id() != ""
        orphan = wait_for(
            lambda: [p for p in psutil.Process(record.pid).children() if p.name() == "sleep"], 30, "the command"
        )[0]
        psutil.Process(record.pid).kill()
        wait_for(lambda: not jobs.is_mine(record)[0], 30, "the supervisor to be gone")
        assert jobs.heartbeat_age(JobPaths(tmp_path), 0) < 60  # fresh, yet known dead: same host, same boot
        assert jobs.node_state(tmp_path, 0, 60) == "dead"
        assert jobs.running_node(tmp_path, 0, dead_after=60) is None  # not re-attached
        assert "the supervisor recorded on this host is dead" in caplog.text and "killed the 1 process" in caplog.text
        wait_for(lambda: not orphan.is_running() or orphan.status() == psutil.STATUS_ZOMBIE, 30, "the orphan to end")

    def test_on_another_boot_the_heartbeat_decides(self, sleeper, tmp_path):
        record_for(tmp_path, psutil.Process(sleeper.pid), pid=2**22 + 7, boot_id="another-boot")  # no such pid
        JobPaths(tmp_path).heartbeat(0).touch()
        assert jobs.node_state(tmp_path, 0, 60) == "running"


class TestFingerprint:
    def cfg(self, packed: Path, out: Path, **kw) -> FinetuneConfig:
        return FinetuneConfig(config=TINY, dataset_path=str(packed), output_dir=str(out), **kw)

    def test_same_inputs_same_job_other_inputs_new_job(self, tiny_packed, tmp_path, caplog):
        import shutil

        packed = Path(shutil.copytree(tiny_packed, tmp_path / "packed"))
        out = tmp_path / "out"
        first = stage.find_job(self.cfg(packed, out))
        assert stage.find_job(self.cfg(packed, out, master_port=9999, poll_interval=1)).job_dir == first.job_dir
        Path(first.job_dir).mkdir(parents=True)
        changed_config = stage.find_job(self.cfg(packed, out, overrides={"runner_config.epochs": 2}))
        for path in packed.rglob("*"):  # packed again with the same rows: new files, the same job
            if path.is_file():
                path.write_bytes(path.read_bytes())
        assert stage.find_job(self.cfg(packed, out)).job_dir == first.job_dir
        arrow = next(packed.rglob("*.arrow"))
        arrow.write_bytes(arrow.read_bytes() + b"\0")  # other rows: a new job
        caplog.set_level(logging.INFO)
        repacked = stage.find_job(self.cfg(packed, out))
        assert len({first.job_dir, changed_config.job_dir, repacked.job_dir}) == 3
        assert f"the inputs changed since the job(s) {first.job_dir}" in caplog.text
        assert (
            first.stall_timeout == 600 and first.deferral_timeout == TINY_ROWS * 60 + 2 * 600
        )  # one step a row on CPU


class TestTheJobATaskStartedIsTheOneItStops:
    """on_kill and a timed-out deferral stop the job folder the task started in, not the one its inputs name now
    (pack cleared and rerun meanwhile: another fingerprint, another folder)."""

    def started(self, tiny_packed: Path, tmp_path: Path, map_index: int = -1):
        import shutil

        from operators.finetune import MsrunFinetuneOperator

        packed = Path(shutil.copytree(tiny_packed, tmp_path / "packed"))
        op = MsrunFinetuneOperator(task_id="finetune", config=TINY, dataset_path=str(packed), output_dir=str(tmp_path))
        ti = XComTI(map_index=map_index)
        job_dir = Path(stage.find_job(op._config()).job_dir)
        job_dir.mkdir()
        op._remember_job({"ti": ti}, str(job_dir))  # what execute does before launching and deferring
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        record = start_supervisor(job_dir, 0, ["sleep", "300"], env)  # stands in for msrun
        arrow = next(packed.glob("*.arrow"))  # the inputs change after the start: packed again, other rows
        arrow.write_bytes(arrow.read_bytes() + b"\0")
        assert stage.find_job(op._config()).job_dir != str(job_dir)
        return op, ti, job_dir, record

    def test_on_kill_stops_the_job_it_started(self, tiny_packed, tmp_path):
        op, _, job_dir, record = self.started(tiny_packed, tmp_path)
        op.on_kill()
        assert json.loads((job_dir / "stop.json").read_text())["reason"] == "task finetune was killed"
        assert json.loads((job_dir / "node-0.status.json").read_text())["stopped"] == "task finetune was killed"
        assert not jobs.is_mine(record)[0]  # the supervisor is gone
        assert [p.name for p in tmp_path.glob("job-*")] == [job_dir.name]  # nothing written where the inputs point

    def test_a_timed_out_deferral_stops_the_job_it_started_from_another_process(self, tiny_packed, tmp_path):
        from airflow.sdk.exceptions import TaskDeferralTimeout

        from operators.finetune import MsrunFinetuneOperator

        op, ti, job_dir, record = self.started(tiny_packed, tmp_path, map_index=1)
        # the resumption runs in a new process: a fresh operator, the defer kwargs replaced by Airflow's error
        resumed = MsrunFinetuneOperator(
            task_id="finetune", config=TINY, dataset_path=op.dataset_path, output_dir=op.output_dir
        )
        with pytest.raises(TaskDeferralTimeout):
            resumed.resume_execution("__fail__", {"error": "Trigger timeout"}, {"ti": ti})
        assert json.loads((job_dir / "stop.json").read_text())["reason"] == "task finetune: Trigger timeout"
        assert json.loads((job_dir / "node-0.status.json").read_text())["stopped"] == "task finetune: Trigger timeout"
        assert not jobs.is_mine(record)[0]

    def test_without_a_recorded_job_nothing_is_stopped(self, tiny_packed, tmp_path, capsys):
        from operators.finetune import MsrunFinetuneOperator

        op = MsrunFinetuneOperator(
            task_id="finetune", config=TINY, dataset_path=str(tiny_packed), output_dir=str(tmp_path)
        )
        op.on_kill()  # killed before it found its job
        with pytest.raises(Exception, match="Trigger failure"):
            op.resume_execution("__fail__", {"error": "Trigger failure"}, {"ti": XComTI()})
        assert "no job folder was recorded for this try: nothing to stop" in capsys.readouterr().out
        assert list(tmp_path.iterdir()) == []


class TestAStopRequestOutlivesARetryOfAnotherNode:
    def test_node_1_starting_again_leaves_a_users_stop_request_and_waits_for_node_0(self, tmp_path):
        tmp_path.joinpath("node-0.json").write_text("{}")  # node 0 ran here once
        jobs.request_stop(tmp_path, "stopped by a user")
        started = time.monotonic()
        with pytest.raises(RuntimeError, match=r"node 1: .* was asked to stop \(stopped by a user\).*clear node 0's"):
            jobs.settle_stop_request(tmp_path, 1, dead_after=60, timeout=2)
        assert time.monotonic() - started >= 2  # it waited for node 0 to start the job anew
        assert json.loads((tmp_path / "stop.json").read_text())["reason"] == "stopped by a user"

    def test_node_0_retried_after_a_stop_clears_it_beside_a_finished_status(self, tmp_path):
        tmp_path.joinpath("node-0.json").write_text("{}")  # a record that is no process of this host any more
        JobPaths(tmp_path).status(0).write_text(json.dumps({"returncode": -15, "stopped": "test stop"}))
        jobs.request_stop(tmp_path, "test stop")
        assert JobPaths(tmp_path).recorded_ranks() == [0]  # node-0.status.json is not a node's record
        jobs.settle_stop_request(tmp_path, 0, dead_after=60, timeout=5)
        assert not (tmp_path / "stop.json").exists()

    def test_node_1_goes_on_once_node_0_started_the_job_anew(self, tmp_path):
        import threading

        jobs.request_stop(tmp_path, "node 1 failed (msrun exit code 1)")
        waiting = threading.Thread(target=jobs.settle_stop_request, args=(tmp_path, 1, 60, 60))
        waiting.start()
        time.sleep(1.5)
        assert waiting.is_alive() and (tmp_path / "stop.json").exists()
        jobs.settle_stop_request(tmp_path, 0, dead_after=60, timeout=5)  # node 0's fresh start: nothing runs
        waiting.join(timeout=30)
        assert not waiting.is_alive() and not (tmp_path / "stop.json").exists()

    def test_node_0_clears_it_only_once_every_node_honoured_it(self, tmp_path):
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        start_supervisor(tmp_path, 1, ["sleep", "300"], env)  # node 1 still trains, e.g. on another host
        jobs.request_stop(tmp_path, "stopped by a user")
        jobs.settle_stop_request(tmp_path, 0, dead_after=60, timeout=60)
        # node 1 obeyed the request before node 0 cleared it
        assert json.loads(JobPaths(tmp_path).status(1).read_text())["stopped"] == "stopped by a user"
        assert not (tmp_path / "stop.json").exists()

    def test_node_0_refuses_to_start_while_a_node_ignores_the_request(self, tmp_path):
        me = psutil.Process()
        elsewhere = NodeRecord(str(tmp_path), 1, "node-elsewhere", me.pid, me.create_time(), me.cmdline(), time.time())
        JobPaths(tmp_path).record(1).write_text(json.dumps(asdict(elsewhere)))
        JobPaths(tmp_path).heartbeat(1).touch()  # alive over there, and it does not stop
        jobs.request_stop(tmp_path, "stopped by a user")
        with pytest.raises(RuntimeError, match="node.s. 1 of .* still run 1 s after the stop request"):
            jobs.settle_stop_request(tmp_path, 0, dead_after=60, timeout=1)
        assert (tmp_path / "stop.json").exists()


class TestAUsersStopIsNotRetried:
    """A node that ended because a person asked the job to stop fails without an automatic retry (a retry of
    node 0 would clear the request and start training again); one that failed on its own may be retried."""

    def ended(self, tmp_path: Path, by_user: bool) -> BaseException:
        from operators.dag_helpers.failures import classify

        paths = JobPaths(tmp_path)
        jobs.request_stop(tmp_path, "the deferred task of node 1 was stopped by a user", by_user=by_user)
        paths.status(0).write_text(json.dumps({"returncode": -15, "stopped": "stopped", "finished_at": 0}))
        cfg = FinetuneConfig(config=TINY, dataset_path=str(tmp_path), output_dir=str(tmp_path))
        with pytest.raises(errors.FinetuneFailed) as failed:
            stage.collect(cfg, stage.Launch(str(tmp_path), 0, "", 0, -1), "finished", "")
        return failed.value, classify("finetune", failed.value)[0]

    def test_stopped_by_a_user(self, tmp_path):
        error, retryable = self.ended(tmp_path, by_user=True)
        assert isinstance(error, errors.FinetuneStoppedByUser) and not retryable
        assert "stopped by a user" in str(error)

    def test_stopped_for_a_failed_node(self, tmp_path):
        error, retryable = self.ended(tmp_path, by_user=False)
        assert not isinstance(error, errors.FinetuneStoppedByUser) and retryable
