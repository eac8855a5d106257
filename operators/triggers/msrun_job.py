"""MsrunJobTrigger: the deferred fine-tune task's watch over its training job (runs in the triggerer)."""

from __future__ import annotations

import asyncio
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent


class MsrunJobTrigger(BaseTrigger):
    """Watches one node of an msrun training job started by :class:`~operators.finetune.MsrunFinetuneOperator`,
    from any host that sees the job folder.

    Fires once: ``finished`` when the node's supervisor wrote its status, ``dead`` when its heartbeat file did not
    change for ``dead_after`` seconds (the supervisor was killed, or its host went away), ``stalled`` when no
    worker log grew for ``stall_timeout`` seconds. All file I/O runs in a thread, off the triggerer's event loop.
    When a user marks the deferred task failed or succeeded, or clears it, :meth:`on_kill` asks the job to stop.
    """

    def __init__(
        self,
        job_dir: str,
        node_rank: int = 0,
        poll_interval: float = 10.0,
        stall_timeout: float | None = None,
        dead_after: float = 60.0,
    ):
        super().__init__()
        self.job_dir = job_dir
        self.node_rank = node_rank
        self.poll_interval = poll_interval
        self.stall_timeout = stall_timeout
        self.dead_after = dead_after

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "operators.triggers.msrun_job.MsrunJobTrigger",
            {
                "job_dir": self.job_dir,
                "node_rank": self.node_rank,
                "poll_interval": self.poll_interval,
                "stall_timeout": self.stall_timeout,
                "dead_after": self.dead_after,
            },
        )

    async def run(self):
        from distilled_plugins.finetune import stage

        watch = stage.Watch(self.dead_after, self.stall_timeout)
        while True:
            seen = await asyncio.to_thread(stage.probe, self.job_dir, self.node_rank)
            state, why = watch.update(seen)
            if state != "running":
                yield TriggerEvent(
                    {"status": state, "job_dir": self.job_dir, "node_rank": self.node_rank, "message": why}
                )
                return
            if seen["progress"] and seen["progress"] != watch.progress:
                self.log.info("training %s node %d: %s", self.job_dir, self.node_rank, seen["progress"])
                watch.progress = seen["progress"]
            await asyncio.sleep(self.poll_interval)

    async def on_kill(self) -> None:
        """A user marked the deferred task failed/succeeded or cleared it: stop the whole job (not in
        ``cleanup()``, which also runs on every triggerer restart)."""
        from distilled_plugins.finetune import job

        outcome = await asyncio.to_thread(
            job.stop,
            self.job_dir,
            f"the deferred task of node {self.node_rank} was stopped by a user (marked failed/succeeded or cleared)",
            20.0,
            True,
        )
        self.log.info("stopped the training job %s: %s", self.job_dir, outcome)
