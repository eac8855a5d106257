"""MsrunFinetuneOperator: stage 5 as an Airflow task (one per training node), deferrable while msrun trains."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.sdk import Context, task
from airflow.sdk.exceptions import AirflowException

from distilled_plugins.core import errors
from distilled_plugins.finetune.config import FinetuneConfig
from operators.dag_helpers.assets import emit
from operators.dag_helpers.failures import fails_clearly
from operators.dag_helpers.xcom import with_fields
from operators.stage import StageOperator
from operators.triggers.msrun_job import MsrunJobTrigger

if TYPE_CHECKING:
    from distilled_plugins.finetune.metrics import FinetuneResult


class MsrunFinetuneOperator(StageOperator):
    """Fine-tune with mindformers through msrun; returns the checkpoint folder, metrics and loss curve.

    Takes the fields of :class:`~distilled_plugins.finetune.FinetuneConfig` as keyword arguments (with their
    defaults), plus ``deferrable``.

    One task instance drives one node (``node_rank``); several nodes are this operator mapped over the node
    ranks, all with the same ``output_dir`` on shared storage and ``master_addr``. Deferrable (default): the
    node's job starts detached in its own session, the task frees its worker slot and
    :class:`~operators.triggers.msrun_job.MsrunJobTrigger` watches the node's heartbeat and status files from whatever
    host runs the triggerer. ``deferrable=False`` waits in the task instead. The job folder is named by a
    fingerprint of the inputs: a retry with the same inputs re-attaches to the running job, resumes from its newest
    checkpoint, or returns its finished result; changed inputs (packed data, config, base checkpoint) train anew.
    """

    config_class = FinetuneConfig
    not_templated = ("overrides", "deferrable")
    operator_arguments: ClassVar[dict[str, Any]] = {"deferrable": True}  # False: wait in the task instead
    ui_color = "#fce8e6"
    job_dir: str | None = None  # the job folder this task started in (set by execute, read by on_kill)

    def _config(self) -> FinetuneConfig:
        return self.stage_config()

    def _xcom(self, context: Context, cfg: FinetuneConfig, result: FinetuneResult) -> dict:
        if cfg.node_rank == 0:  # one model event per job: node 0 collects the metrics and speaks for all
            metrics_file = Path(result.metrics_file)
            metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
            emit(
                context,
                self,
                {
                    "checkpoint_uri": f"file://{Path(result.checkpoint_dir).resolve()}",
                    "steps": result.steps,
                    "final_loss": metrics.get("final_loss"),
                    "metrics": result.metrics_file,
                },
            )
        return {
            "checkpoint_dir": result.checkpoint_dir,
            "metrics": result.metrics_file,
            "loss_curve": result.loss_curve,
            "steps": result.steps,
        }

    @fails_clearly
    def execute(self, context: Context) -> dict | None:
        from distilled_plugins.finetune import stage

        cfg = self._config()
        job = stage.find_job(cfg)
        self._remember_job(context, job.job_dir)
        done = stage.finished(cfg, job)
        if done:
            self.log.info("%s already finished with these inputs: returning its checkpoints", job.job_dir)
            return with_fields(context, self._xcom(context, cfg, done))
        if not self.deferrable:
            return with_fields(context, self._xcom(context, cfg, stage.run(cfg)))
        launched = stage.attach(cfg, job) or stage.launch(cfg, job)
        self.log.info(
            "node %d of %s: supervisor pid %d on host %s; stall timeout %g s, deferral timeout %g s",
            cfg.node_rank,
            launched.job_dir,
            launched.pid,
            launched.host,
            job.stall_timeout,
            job.deferral_timeout,
        )
        self.defer(
            trigger=MsrunJobTrigger(
                job_dir=launched.job_dir,
                node_rank=cfg.node_rank,
                poll_interval=cfg.poll_interval,
                stall_timeout=job.stall_timeout,
                dead_after=cfg.dead_after,
            ),
            method_name="execute_complete",
            kwargs={"resume_step": launched.resume_step, "job_dir": launched.job_dir},
            timeout=timedelta(seconds=job.deferral_timeout),
        )
        return None

    @fails_clearly
    def execute_complete(self, context: Context, event: dict, resume_step: int = -1, job_dir: str = "") -> dict:
        from distilled_plugins.finetune import stage

        cfg = self._config()
        # the folder this task started in (defer kwargs), which the trigger watched
        launched = stage.Launch(job_dir or event["job_dir"], int(event["node_rank"]), "", 0, resume_step)
        try:
            result = stage.collect(cfg, launched, event["status"], event.get("message", ""))
        except errors.FinetuneStoppedByUser:
            raise  # fails_clearly: no retry
        except errors.FinetuneFailed as e:
            raise AirflowException(
                f"task {self.task_id}: {e}\nClear the task to resume from the newest checkpoint "
                f"in {launched.job_dir}/checkpoint."
            ) from None
        self.log.info("training finished after %d steps; checkpoints in %s", result.steps, result.checkpoint_dir)
        return with_fields(context, self._xcom(context, cfg, result))

    def _remember_job(self, context: Context, job_dir: str) -> None:
        """Keep the job folder this task starts in: for :meth:`on_kill` (same process) and, through an XCom of
        this try (kept while the task is deferred), for a resumption that has no trigger event to read it from.
        Never derived again from the inputs, which may have changed since (pack cleared and rerun)."""
        self.job_dir = job_dir
        context["ti"].xcom_push(key="job_dir", value=job_dir)

    def _started_job(self, context: Context) -> str | None:
        ti = context["ti"]
        return self.job_dir or ti.xcom_pull(task_ids=ti.task_id, key="job_dir", map_indexes=ti.map_index)

    def resume_execution(self, next_method: str, next_kwargs: dict | None, context: Context):
        if next_method == "__fail__":  # the deferral timed out or the trigger crashed: do not leave training behind
            why = f"task {self.task_id}: {(next_kwargs or {}).get('error', 'trigger failed')}"
            job_dir = self._started_job(context)  # Airflow replaced next_kwargs: the XCom kept it
            if job_dir:
                from distilled_plugins.finetune.job import stop

                stop(job_dir, why)
            else:
                self.log.error("%s, but no job folder was recorded for this try: nothing to stop", why)
        return super().resume_execution(next_method, next_kwargs, context)

    def on_kill(self) -> None:  # runs only while the task is not deferred (deferrable=False, or before deferring)
        if self.job_dir:
            from distilled_plugins.finetune.job import stop

            stop(self.job_dir, f"task {self.task_id} was killed")


@task
def node_ranks(nodes: int) -> list[int]:
    """The node ranks to map :class:`MsrunFinetuneOperator` over: one task (one msrun launcher) per node."""
    if int(nodes) < 1:
        raise ValueError(f"nodes must be at least 1, got {nodes}")
    return list(range(int(nodes)))
