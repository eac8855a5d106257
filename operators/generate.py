"""GenerateReasoningOperator: stage 1 as an Airflow task."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any, ClassVar

from airflow.sdk import BaseOperator, Context, task
from airflow.sdk.exceptions import AirflowFailException

from distilled_plugins.core.settings import coerce, default_of, is_empty
from distilled_plugins.generate.config import GenerateConfig
from distilled_plugins.teacher.batch_api import BatchesRunning, BatchSettings, batch_folder, cancel_running
from distilled_plugins.teacher.settings import RequestSettings
from operators.dag_helpers.failures import WHAT_TO_DO, fails_clearly
from operators.dag_helpers.xcom import with_fields
from operators.hooks import CONNECTION_SETTINGS, TeacherEndpointHook
from operators.stage import StageOperator
from operators.triggers.teacher_batch import TeacherBatchTrigger

_FIELDS = {f.name: f for f in dataclasses.fields(GenerateConfig)}

# request settings the operator takes besides the config's fields (RequestSettings' fields). None or empty means
# "not given here": the connection's extra decides (CONNECTION_SETTINGS), else RequestSettings' default
_REQUEST_ARGUMENTS = ("max_attempts", *CONNECTION_SETTINGS)
# ... and for these, 0 too (no limit, price or budget can be 0)
_ZERO_IS_UNSET = ("max_rpm", "max_tpm", "price_per_mtok_in", "price_per_mtok_out", "max_cost")
# a deferred batch task gives up after this: the Batch API's window is 24 h (an expired batch is collected and its
# unfinished requests go again in a follow-up batch, which defers anew)
BATCH_DEFERRAL = timedelta(hours=26)


class GenerateReasoningOperator(StageOperator):
    """Generate chain-of-thought completions for (one shard of) a seed dataset.

    Takes the fields of :class:`~distilled_plugins.generate.config.GenerateConfig`, plus ``teacher_conn_id`` and the
    request settings. The endpoints and their API keys come from the Airflow Connection ``teacher_conn_id`` (see
    :class:`TeacherEndpointHook`; its extra may list several endpoints, rate limits and prices). The operator's
    own ``max_rpm``/``max_tpm``/prices/``max_cost`` win over the connection's where given (0 or empty: not given).
    The output file is appended to and resumed, so a retry of the task requests only what the earlier try did not
    finish; reaching ``max_cost`` fails the task without retries (a rerun resumes). Returns
    ``{"output": <jsonl path>, "stats": <stats json path>, "reused": <reused-rows list path, or "">}``: with a
    generation store the output holds only the rows this run generated, the list names those taken from the store,
    and :class:`MergeShardsOperator` joins both (see ``distilled_plugins.core.schema``).

    ``teacher_mode="batch"`` sends the shard's requests to the first endpoint's Batch API: the task submits the
    batches, defers while they run (:class:`~operators.triggers.teacher_batch.TeacherBatchTrigger` polls them, the log shows each
    batch's status and counts; no worker slot is held), collects them and defers again for follow-up batches of
    failed requests. A retry or a cleared task re-attaches to the recorded batches; marking the deferred task
    failed cancels them.
    """

    config_class = GenerateConfig
    not_arguments = ("api_addr", "api_key", "endpoints", "retry")
    nested: ClassVar[dict[str, type]] = {"batch": BatchSettings}  # teacher_mode, batch_poll_seconds, ...
    # prompt_template is not templated: its literal braces (\boxed{{}}) would be read as Jinja
    not_templated = ("prompt_template",)
    operator_arguments: ClassVar[dict[str, Any]] = {
        "teacher_conn_id": TeacherEndpointHook.default_conn_name,
        # a setting the connection may give is None here ("not given"); the others take RequestSettings' default
        **{
            f.name: None if f.name in CONNECTION_SETTINGS else default_of(f)
            for f in dataclasses.fields(RequestSettings)
            if f.name in _REQUEST_ARGUMENTS
        },
    }
    ui_color = "#e8f0fe"
    batch_folder: str | None = None  # batch mode: where this task's batches are recorded (for on_kill)

    def request_settings(self, from_connection: dict) -> RequestSettings:
        """Each request setting: the operator's value where given, else the connection's extra, else the default."""
        values = {}
        for name in _REQUEST_ARGUMENTS:
            value = getattr(self, name)
            value = None if is_empty(value) else value
            value = coerce(RequestSettings, name, value)
            if value is None or (value == 0 and name in _ZERO_IS_UNSET):
                value = from_connection.get(name)
            if value is not None:
                values[name] = value
        return RequestSettings(**values)

    @fails_clearly
    def execute(self, context: Context) -> dict | None:
        return self._generate(context)

    @fails_clearly
    def execute_complete(self, context: Context, event: dict) -> dict | None:
        """A batch ended (batch mode): collect it, and defer again while others (or follow-ups) run."""
        return self._generate(context)

    def _generate(self, context: Context) -> dict | None:
        fleet = TeacherEndpointHook(self.teacher_conn_id).get_fleet()
        config = self.stage_config(endpoints=fleet.endpoints, retry=self.request_settings(fleet.settings))
        if config.batch.batch:
            self.batch_folder = str(batch_folder(config.output_file))
        from distilled_plugins.generate.stage import run  # here: the DAG file imports this module, must load fast

        try:
            result = run(config, wait_for_batches=False)
        except BatchesRunning as e:
            self.log.info("%s; deferring, looking every %g s", e, config.batch.batch_poll_seconds)
            trigger = TeacherBatchTrigger(str(e.folder), self.teacher_conn_id, config.batch.batch_poll_seconds)
            self.defer(trigger=trigger, method_name="execute_complete", timeout=BATCH_DEFERRAL)
        reused = str(result.reused_file) if result.reused_file else ""
        return with_fields(
            context, {"output": str(result.output_file), "stats": str(result.stats_file), "reused": reused}
        )

    # while the task runs (submitting, collecting: seconds), cleared or marked alike; deferred, the trigger's on_kill,
    # which cancels on a mark only
    def on_kill(self) -> None:
        if self.batch_folder:
            api = TeacherEndpointHook(self.teacher_conn_id).get_batch_api(self.batch_folder)
            for line in cancel_running(self.batch_folder, api):
                self.log.info("cancelled: %s", line)


class MergeShardsOperator(BaseOperator):
    """Join the shard outputs of mapped :class:`GenerateReasoningOperator` tasks; returns the merged JSONL path.

    A shard's reused-rows list (beside its output) is found by name and filled in from the generation store.
    Rows are keyed as generation keyed them: by ``uuid_column``, or (None, the default) by ``prompt_column``.
    """

    template_fields = ("shards", "output_file", "prompt_column", "uuid_column")
    ui_color = "#e8f0fe"

    def __init__(
        self,
        *,
        shards,
        output_file: str,
        prompt_column: str = default_of(_FIELDS["prompt_column"]),
        uuid_column: str | None = default_of(_FIELDS["uuid_column"]),
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.shards = shards  # the mapped tasks' return values (dicts with "output"), or paths
        self.output_file = output_file
        self.prompt_column = prompt_column
        self.uuid_column = uuid_column

    @fails_clearly
    def execute(self, context: Context) -> str:
        paths = [s["output"] if isinstance(s, dict) else s for s in self.shards]
        key_column = coerce(GenerateConfig, "uuid_column", self.uuid_column) or self.prompt_column
        from distilled_plugins.generate.merge import merge  # here: the DAG file imports this module, must load fast

        return str(merge(paths, self.output_file, key_column))


@task
def shard_plan(shards: int) -> list[int]:
    """The shard indices to map the generate task over."""
    if int(shards) < 1:
        raise AirflowFailException(f"shards must be at least 1, got {shards} -- what to do: {WHAT_TO_DO['shard_plan']}")
    return list(range(int(shards)))
