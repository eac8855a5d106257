"""MsrunFinetuneOperator deferring to MsrunJobTrigger inside a real ``dag.test()``."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from pathlib import Path

import pytest

from distilled_plugins.core import configs
from distilled_plugins.devtools.local_airflow import free_port
from distilled_plugins.finetune import stage
from operators.triggers.msrun_job import MsrunJobTrigger
from tests.support import TINY_ROWS


class TestMsrunJobTrigger:
    def test_serialization(self):
        trigger = MsrunJobTrigger(
            job_dir="/r/job-1", node_rank=1, poll_interval=2.0, stall_timeout=60.0, dead_after=30.0
        )
        assert trigger.serialize() == (
            "operators.triggers.msrun_job.MsrunJobTrigger",
            {"job_dir": "/r/job-1", "node_rank": 1, "poll_interval": 2.0, "stall_timeout": 60.0, "dead_after": 30.0},
        )

    def test_fires_finished_when_the_node_status_is_written(self, tmp_path):
        (tmp_path / "node-0.status.json").write_text(json.dumps({"returncode": 0}))
        event = asyncio.run(anext(MsrunJobTrigger(str(tmp_path)).run()))
        assert event.payload == {
            "status": "finished",
            "job_dir": str(tmp_path),
            "node_rank": 0,
            "message": "the node's status was written",
        }

    def test_fires_dead_when_the_heartbeat_stops_whatever_host_wrote_it(self, tmp_path):
        (tmp_path / "node-1.heartbeat").touch()  # written once by a supervisor on some host, then nothing
        trigger = MsrunJobTrigger(str(tmp_path), node_rank=1, poll_interval=0.05, dead_after=0.5)
        event = asyncio.run(anext(trigger.run()))
        assert event.payload["status"] == "dead" and "no heartbeat for" in event.payload["message"]

    def test_fires_stalled_when_logs_stop_growing_while_the_heartbeat_goes_on(self, tmp_path):
        beat = tmp_path / "node-0.heartbeat"
        beat.touch()

        async def watch_while_beating():
            async def beating():
                for i in range(1, 1000):
                    os.utime(beat, ns=(i * 10**9, i * 10**9))
                    await asyncio.sleep(0.05)

            beater = asyncio.create_task(beating())
            trigger = MsrunJobTrigger(str(tmp_path), poll_interval=0.05, stall_timeout=0.5, dead_after=0.4)
            event = await anext(trigger.run())
            beater.cancel()
            return event

        event = asyncio.run(watch_while_beating())
        assert event.payload["status"] == "stalled" and "did not grow for 0.5 s" in event.payload["message"]

    def test_file_io_runs_off_the_event_loop(self, tmp_path, monkeypatch):
        threads = []

        def probe(job_dir, node_rank):
            threads.append(threading.current_thread())
            return {"finished": True, "heartbeat": None, "log_size": 0, "progress": None}

        monkeypatch.setattr(stage, "probe", probe)
        asyncio.run(anext(MsrunJobTrigger(str(tmp_path)).run()))
        assert threads and threads[0] is not threading.main_thread()

    def test_on_kill_requests_a_stop_and_signals_no_foreign_process(self, tmp_path):
        record = {
            "job_dir": str(tmp_path),
            "node_rank": 0,
            "host": "another-host",
            "pid": os.getpid(),  # this test's own pid, recorded by "another host": must not be signalled
            "create_time": 0.0,
            "cmdline": [],
            "started_at": 0.0,
        }
        (tmp_path / "node-0.json").write_text(json.dumps(record))
        (tmp_path / "node-0.heartbeat").touch()
        os.utime(tmp_path / "node-0.heartbeat", (1, 1))  # long gone: on_kill need not wait for its status
        asyncio.run(MsrunJobTrigger(str(tmp_path), dead_after=0.1).on_kill())
        assert "stopped by a user" in json.loads((tmp_path / "stop.json").read_text())["reason"]


@pytest.mark.slow
def test_operator_defers_and_returns_the_checkpoint(airflow_db, tiny_packed, tmp_path, caplog):
    from tests.dags.stage_dags import finetune_dag

    caplog.set_level(logging.INFO)
    run = finetune_dag.test(
        run_conf={
            "config": str(configs.CONFIG_DIR / "finetune_tiny_cpu.yaml"),
            "data": str(tiny_packed),
            "out": str(tmp_path),
            "port": free_port(),
        }
    )
    assert run.state == "success"
    assert "running trigger in line" in caplog.text  # it really deferred
    result = run.get_task_instance("finetune").xcom_pull(task_ids="finetune")
    job_dir = Path(result["checkpoint_dir"]).parent
    assert job_dir.parent == tmp_path / run.run_id and job_dir.name.startswith("job-") and result["steps"] == TINY_ROWS
    metrics = json.loads(open(result["metrics"]).read())
    assert metrics["steps"][-1]["step"] == TINY_ROWS and metrics["tokens_per_s"] > 0


def test_a_timed_out_deferral_stops_the_job(tiny_packed, tmp_path):
    from airflow.sdk.exceptions import TaskDeferralTimeout

    from distilled_plugins.finetune import job as jobs
    from distilled_plugins.finetune.supervisor import start_supervisor
    from operators.finetune import MsrunFinetuneOperator
    from tests.support import XComTI

    op = MsrunFinetuneOperator(
        task_id="finetune",
        config=str(configs.CONFIG_DIR / "finetune_tiny_cpu.yaml"),
        dataset_path=str(tiny_packed),
        output_dir=str(tmp_path),
    )
    job_dir = Path(stage.find_job(op._config()).job_dir)
    job_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    record = start_supervisor(job_dir, 0, ["sleep", "300"], env)  # stands in for msrun
    context = {"ti": XComTI()}
    op._remember_job(context, str(job_dir))  # as execute does before deferring
    with pytest.raises(TaskDeferralTimeout):
        op.resume_execution("__fail__", {"error": "Trigger timeout"}, context)
    assert "Trigger timeout" in json.loads((job_dir / "stop.json").read_text())["reason"]
    assert json.loads((job_dir / "node-0.status.json").read_text())["stopped"]
    assert not jobs.is_mine(record)[0]  # the supervisor is gone
