"""Triggers: asynchronous watchers that run in Airflow's triggerer (this module must stay importable there)."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from distilled_plugins import finetune


class MsrunJobTrigger(BaseTrigger):
    """Watches an msrun training job started by :class:`~operators.finetune.MsrunFinetuneOperator`.

    Fires once: ``finished`` when the job's supervisor wrote ``status.json``, ``vanished`` when the supervisor
    process is gone without one (only checked on the host that started it), ``stalled`` when the worker logs
    stopped growing for ``stall_timeout`` seconds.
    """

    def __init__(
        self, run_dir: str, pid: int, hostname: str, poll_interval: float = 10.0, stall_timeout: float | None = None
    ):
        super().__init__()
        self.run_dir = run_dir
        self.pid = pid
        self.hostname = hostname
        self.poll_interval = poll_interval
        self.stall_timeout = stall_timeout

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "operators.triggers.MsrunJobTrigger",
            {
                "run_dir": self.run_dir,
                "pid": self.pid,
                "hostname": self.hostname,
                "poll_interval": self.poll_interval,
                "stall_timeout": self.stall_timeout,
            },
        )

    async def run(self):
        same_host = socket.gethostname() == self.hostname
        last_size, last_growth, last_progress = -1, time.monotonic(), None
        while True:
            status = finetune.job_status(self.run_dir, self.pid if same_host else None)
            if status != "running":
                yield TriggerEvent({"status": status, "run_dir": self.run_dir})
                return
            size = finetune.log_size(self.run_dir)
            if size != last_size:
                last_size, last_growth = size, time.monotonic()
                progress = finetune.latest_progress(self.run_dir)
                if progress and progress != last_progress:
                    self.log.info("training %s: %s", self.run_dir, progress)
                    last_progress = progress
            elif self.stall_timeout and time.monotonic() - last_growth > self.stall_timeout:
                yield TriggerEvent(
                    {
                        "status": "stalled",
                        "run_dir": self.run_dir,
                        "message": f"worker logs did not grow for {self.stall_timeout:g} s",
                    }
                )
                return
            await asyncio.sleep(self.poll_interval)
