"""GenerateReasoningOperator: stage 1 as an Airflow task."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowFailException

from distilled_plugins import generate
from distilled_plugins.client import RequestSettings
from distilled_plugins.settings import coerce, default_of
from operators.hooks import CONNECTION_SETTINGS, TeacherEndpointHook
from operators.pipeline import fails_clearly
from operators.stage import StageOperator
from operators.xcom import with_fields

_FIELDS = {f.name: f for f in dataclasses.fields(generate.GenerateConfig)}

# request settings the operator takes besides the config's fields (RequestSettings' fields). None or empty means
# "not given here": the connection's extra decides (CONNECTION_SETTINGS), else RequestSettings' default
_REQUEST_ARGUMENTS = (
    "max_attempts",
    "request_timeout",
    "max_rpm",
    "max_tpm",
    "stream",
    "price_per_mtok_in",
    "price_per_mtok_out",
    "max_cost",
)
# ... and for these, 0 too (no limit, price or budget can be 0)
_ZERO_IS_UNSET = ("max_rpm", "max_tpm", "price_per_mtok_in", "price_per_mtok_out", "max_cost")


class GenerateReasoningOperator(StageOperator):
    """Generate chain-of-thought completions for (one shard of) a seed dataset.

    Takes the fields of :class:`~distilled_plugins.generate.GenerateConfig`, plus ``teacher_conn_id`` and the
    request settings. The endpoints and their API keys come from the Airflow Connection ``teacher_conn_id`` (see
    :class:`TeacherEndpointHook`; its extra may list several endpoints, rate limits and prices). The operator's
    own ``max_rpm``/``max_tpm``/prices/``max_cost`` win over the connection's where given (0 or empty: not given).
    The output file is appended to and resumed, so a retry of the task requests only what the earlier try did not
    finish; reaching ``max_cost`` fails the task without retries (a rerun resumes). Returns
    ``{"output": <jsonl path>, "stats": <stats json path>, "reused": <reused-rows list path, or "">}``: with a
    generation store the output holds only the rows this run generated, the list names those taken from the store,
    and :class:`MergeShardsOperator` joins both (see ``distilled_plugins.schema``).
    """

    config_class = generate.GenerateConfig
    not_arguments = ("api_addr", "api_key", "endpoints", "retry")
    # prompt_template is not templated: its literal braces (\boxed{{}}) would be read as Jinja
    not_templated = ("prompt_template",)
    operator_arguments: ClassVar[dict[str, Any]] = {
        "teacher_conn_id": "teacher_default",
        # a setting the connection may give is None here ("not given"); the others take RequestSettings' default
        **{
            f.name: None if f.name in CONNECTION_SETTINGS else default_of(f)
            for f in dataclasses.fields(RequestSettings)
            if f.name in _REQUEST_ARGUMENTS
        },
    }
    ui_color = "#e8f0fe"

    def request_settings(self, from_connection: dict) -> RequestSettings:
        """Each request setting: the operator's value where given, else the connection's extra, else the default."""
        values = {}
        for name in _REQUEST_ARGUMENTS:
            value = getattr(self, name)
            value = None if isinstance(value, str) and value.strip() in ("", "None", "null") else value
            value = coerce(RequestSettings, name, value)
            if value is None or (value == 0 and name in _ZERO_IS_UNSET):
                value = from_connection.get(name)
            if value is not None:
                values[name] = value
        return RequestSettings(**values)

    @fails_clearly
    def execute(self, context: Context) -> dict:
        fleet = TeacherEndpointHook(self.teacher_conn_id).get_fleet()
        config = self.stage_config(endpoints=fleet.endpoints, retry=self.request_settings(fleet.settings))
        try:
            result = generate.run(config)
        except generate.BudgetReached as e:
            raise AirflowFailException(f"task {self.task_id}: {e}") from None
        reused = str(result.reused_file) if result.reused_file else ""
        return with_fields(
            context, {"output": str(result.output_file), "stats": str(result.stats_file), "reused": reused}
        )


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
        key_column = coerce(generate.GenerateConfig, "uuid_column", self.uuid_column) or self.prompt_column
        return str(generate.merge(paths, self.output_file, key_column))
