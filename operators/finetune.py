"""MsrunFinetuneOperator: stage 5 as an Airflow task, deferrable while msrun trains."""

from __future__ import annotations

import json
from pathlib import Path

from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowException

from distilled_plugins import finetune
from operators.assets import emit
from operators.pipeline import fails_clearly
from operators.triggers import MsrunJobTrigger
from operators.xcom import with_fields


class MsrunFinetuneOperator(BaseOperator):
    """Fine-tune with mindformers through msrun; returns the checkpoint folder, metrics and loss curve.

    Deferrable (default): the job starts detached in its own session, the task frees its worker slot and
    :class:`~operators.triggers.MsrunJobTrigger` watches it; the task resumes when the job ends.
    ``deferrable=False`` waits in the task instead, for deployments without a triggerer.
    Everything lives in ``output_dir``: a retry re-attaches to a job still running there, resumes from its
    newest checkpoint, or returns the result of a job that already finished, without training again.
    """

    template_fields = (
        "config",
        "dataset_path",
        "output_dir",
        "load_checkpoint",
        "seq_length",
        "worker_num",
        "local_worker_num",
        "node_rank",
        "master_addr",
        "master_port",
    )
    ui_color = "#fce8e6"

    def __init__(
        self,
        *,
        config: str,
        dataset_path: str,
        output_dir: str,
        load_checkpoint: str | None = None,
        seq_length: int | None = None,
        worker_num: int = 1,
        local_worker_num: int | None = None,
        node_rank: int = 0,
        master_addr: str = "127.0.0.1",
        master_port: int = 8118,
        overrides: dict | None = None,
        deferrable: bool = True,
        poll_interval: float = 10.0,
        stall_timeout: float | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.config = config
        self.dataset_path = dataset_path
        self.output_dir = output_dir
        self.load_checkpoint = load_checkpoint
        self.seq_length = seq_length
        self.worker_num = worker_num
        self.local_worker_num = local_worker_num
        self.node_rank = node_rank
        self.master_addr = master_addr
        self.master_port = master_port
        self.overrides = overrides or {}
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self.stall_timeout = stall_timeout

    def _config(self) -> finetune.FinetuneConfig:
        return finetune.FinetuneConfig(
            config=self.config,
            dataset_path=self.dataset_path,
            output_dir=self.output_dir,
            load_checkpoint=self.load_checkpoint or None,
            seq_length=int(self.seq_length) if self.seq_length else None,
            worker_num=int(self.worker_num),
            local_worker_num=int(self.local_worker_num or self.worker_num),
            node_rank=int(self.node_rank),
            master_addr=self.master_addr,
            master_port=int(self.master_port),
            overrides=self.overrides,
            poll_interval=self.poll_interval,
        )

    def _xcom(self, context: Context, result: finetune.FinetuneResult) -> dict:
        metrics = json.loads(Path(result.metrics_file).read_text())
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
        cfg = self._config()
        done = finetune.finished_result(cfg.run_dir)
        if done:
            self.log.info(
                "%s already holds a finished job: returning its checkpoints without training again", cfg.run_dir
            )
            return with_fields(context, self._xcom(context, done))
        if not self.deferrable:
            return with_fields(context, self._xcom(context, finetune.run(cfg)))
        launched = finetune.running_job(cfg.run_dir)
        if launched:
            self.log.info("re-attaching to the training job still running in %s (pid %d)", cfg.run_dir, launched.pid)
        else:
            launched = finetune.launch(cfg)
        self.defer(
            trigger=MsrunJobTrigger(
                run_dir=launched.run_dir,
                pid=launched.pid,
                hostname=launched.hostname,
                poll_interval=self.poll_interval,
                stall_timeout=self.stall_timeout,
            ),
            method_name="execute_complete",
            kwargs={"resume_step": launched.resume_step},
        )
        return None

    @fails_clearly
    def execute_complete(self, context: Context, event: dict, resume_step: int = 0) -> dict:
        cfg = self._config()
        if event["status"] == "stalled":
            finetune.stop(cfg.run_dir)
            raise AirflowException(
                f"task {self.task_id}: training in {cfg.run_dir} stalled ({event['message']}) "
                "and was stopped; clear the task to resume from its newest checkpoint"
            )
        try:
            result = finetune.collect(cfg, event["status"], resume_step)
        except finetune.FinetuneFailed as e:
            raise AirflowException(
                f"task {self.task_id}: {e}\nClear the task to resume from the newest checkpoint "
                f"in {cfg.run_dir}/checkpoint."
            ) from None
        self.log.info("training finished after %d steps; checkpoints in %s", result.steps, result.checkpoint_dir)
        return with_fields(context, self._xcom(context, result))

    def on_kill(self) -> None:
        finetune.stop(self.output_dir)
