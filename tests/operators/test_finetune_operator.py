"""MsrunFinetuneOperator deferring to MsrunJobTrigger inside a real ``dag.test()``."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from distilled_plugins import configs
from operators.triggers import MsrunJobTrigger
from tests.conftest import free_port


class TestMsrunJobTrigger:
    def test_serialization(self):
        trigger = MsrunJobTrigger(run_dir="/r", pid=42, hostname="h", poll_interval=2.0, stall_timeout=60.0)
        assert trigger.serialize() == (
            "operators.triggers.MsrunJobTrigger",
            {"run_dir": "/r", "pid": 42, "hostname": "h", "poll_interval": 2.0, "stall_timeout": 60.0},
        )

    def test_fires_finished_when_status_is_written(self, tmp_path):
        (tmp_path / "status.json").write_text(json.dumps({"returncode": 0}))
        event = asyncio.run(anext(MsrunJobTrigger(str(tmp_path), 1, "h").run()))
        assert event.payload == {"status": "finished", "run_dir": str(tmp_path)}

    def test_fires_vanished_when_the_supervisor_is_gone(self, tmp_path):
        import socket
        import subprocess

        gone = subprocess.Popen(["true"])
        gone.wait()
        event = asyncio.run(anext(MsrunJobTrigger(str(tmp_path), gone.pid, socket.gethostname()).run()))
        assert event.payload["status"] == "vanished"

    def test_fires_stalled_when_logs_stop_growing(self, tmp_path):
        import os
        import socket

        trigger = MsrunJobTrigger(
            str(tmp_path), os.getpid(), socket.gethostname(), poll_interval=0.1, stall_timeout=0.3
        )
        event = asyncio.run(anext(trigger.run()))
        assert event.payload["status"] == "stalled" and "did not grow for 0.3 s" in event.payload["message"]


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
    assert result["checkpoint_dir"] == f"{tmp_path}/{run.run_id}/checkpoint" and result["steps"] == 8
    metrics = json.loads(open(result["metrics"]).read())
    assert metrics["steps"][-1]["step"] == 8 and metrics["tokens_per_s"] > 0
