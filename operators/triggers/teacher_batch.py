"""TeacherBatchTrigger: the deferred batch-mode generate task's watch over its teacher batches (runs in the
triggerer)."""

from __future__ import annotations

import asyncio
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from distilled_plugins.core import errors


class TeacherBatchTrigger(BaseTrigger):
    """Watches the teacher batches of one generate shard (:class:`~operators.generate.GenerateReasoningOperator` in
    batch mode), recorded in ``batch_folder`` (``distilled_plugins.teacher.batch_api``).

    Every ``poll_seconds`` it asks the provider about each running batch, in a thread (urllib, and the record read
    from disk: nothing blocks the triggerer's event loop), logs the batch id, status and request counts whenever
    they change, and fires once a batch has ended (the task then collects it, and defers again while others run).
    The API key comes from the connection ``teacher_conn_id``, read in the triggerer, never stored with the
    trigger. When a user marks the deferred task failed or succeeded, :meth:`on_kill` cancels the running batches;
    when the task is cleared they run on, and its next try attaches to them.
    """

    def __init__(self, batch_folder: str, teacher_conn_id: str, poll_seconds: float = 60.0):
        super().__init__()
        self.batch_folder = batch_folder
        self.teacher_conn_id = teacher_conn_id
        self.poll_seconds = poll_seconds
        self._batch_api = None  # built by the first _api() call, in the triggerer

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "operators.triggers.teacher_batch.TeacherBatchTrigger",
            {
                "batch_folder": self.batch_folder,
                "teacher_conn_id": self.teacher_conn_id,
                "poll_seconds": self.poll_seconds,
            },
        )

    async def _api(self):
        """The Batch API client, built once (on_kill then needs no connection lookup, which can be slow)."""
        from operators.hooks import TeacherEndpointHook

        if self._batch_api is None:
            hook = TeacherEndpointHook(self.teacher_conn_id)
            self._batch_api = await asyncio.to_thread(hook.get_batch_api, self.batch_folder)
        return self._batch_api

    async def run(self):
        from distilled_plugins.teacher import batch_api

        api = await self._api()
        seen: dict[str, str] = {}
        while True:
            try:
                changes, ended = await asyncio.to_thread(batch_api.poll, self.batch_folder, api, seen)
            except ConnectionError as e:  # the provider is away for a while: the batches go on
                self.log.warning("could not look at the teacher batches: %s; trying again", e)
                changes, ended = [], False
            except errors.BatchError as e:  # the task's next step says what is wrong, with its context
                changes, ended = [f"the Batch API refused a look: {e}"], True
            for line in changes:
                self.log.info("%s", line)
            if ended:
                yield TriggerEvent({"status": "ended", "batch_folder": self.batch_folder})
                return
            await asyncio.sleep(self.poll_seconds)

    async def _cleared(self) -> bool:
        """Whether the task was cleared (its next try comes) rather than marked failed or succeeded: both reach
        :meth:`on_kill` alike, so the task's state now tells them apart."""
        from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

        ti = self.task_instance
        try:
            states = await asyncio.to_thread(
                RuntimeTaskInstance.get_task_states,
                dag_id=ti.dag_id,
                map_index=ti.map_index,
                task_ids=[ti.task_id],
                run_ids=[ti.run_id],
            )
        except Exception:  # not known: cancel, as for a stop (a rerun sends the requests again, unpaid)
            self.log.warning("could not read the state of %s; taken as stopped", ti.task_id, exc_info=True)
            return False
        key = ti.task_id if ti.map_index < 0 else f"{ti.task_id}_{ti.map_index}"
        run = states.get(ti.run_id, {})
        if key not in run:  # the run or the task is gone (deleted): nothing will ever collect the batches
            self.log.info("the deferred task's run or task no longer exists: taken as stopped")
            return False
        self.log.info("the deferred task was stopped by a user; its state is now %s", run[key])
        return run[key] not in ("failed", "success", "skipped", "upstream_failed", "removed")

    async def on_kill(self) -> None:
        """A user marked the deferred task failed/succeeded: cancel its running batches (not in ``cleanup()``,
        which also runs on every triggerer restart). A cleared task keeps them: its next try collects them."""
        from distilled_plugins.teacher import batch_api

        if await self._cleared():
            self.log.info("the task was cleared: its batches run on and its next try attaches to them")
            return
        api = await self._api()
        for line in await asyncio.to_thread(batch_api.cancel_running, self.batch_folder, api):
            self.log.info("cancelled at the user's request: %s", line)
