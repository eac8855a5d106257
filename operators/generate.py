"""GenerateReasoningOperator: stage 1 as an Airflow task."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowFailException

from distilled_plugins import generate
from distilled_plugins.client import RequestSettings
from distilled_plugins.settings import coerce
from operators.hooks import TeacherEndpointHook
from operators.pipeline import fails_clearly
from operators.stage import StageOperator
from operators.xcom import with_fields

# request settings the operator takes besides the config's fields: 0 or empty means "not given here", so the
# connection's extra (then the server's headers, or the default) decides
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
        **{f.name: f.default for f in dataclasses.fields(RequestSettings) if f.name in _REQUEST_ARGUMENTS},
    }
    ui_color = "#e8f0fe"

    def request_settings(self, from_connection: dict) -> RequestSettings:
        """The operator's values, else the connection's, else the defaults."""

        def given(name: str) -> float | None:
            value = coerce(RequestSettings, name, getattr(self, name))
            return from_connection.get(name) if value in (None, 0) else float(value)

        return RequestSettings(
            max_attempts=coerce(RequestSettings, "max_attempts", self.max_attempts),
            request_timeout=coerce(RequestSettings, "request_timeout", self.request_timeout),
            max_rpm=given("max_rpm"),
            max_tpm=given("max_tpm"),
            stream=coerce(RequestSettings, "stream", self.stream),
            price_per_mtok_in=given("price_per_mtok_in") or 0.0,
            price_per_mtok_out=given("price_per_mtok_out") or 0.0,
            max_cost=given("max_cost"),
        )

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
    """

    template_fields = ("shards", "output_file", "uuid_column")
    ui_color = "#e8f0fe"

    def __init__(self, *, shards, output_file: str, uuid_column: str = "problem", **kwargs):
        super().__init__(**kwargs)
        self.shards = shards  # the mapped tasks' return values (dicts with "output"), or paths
        self.output_file = output_file
        self.uuid_column = uuid_column

    @fails_clearly
    def execute(self, context: Context) -> str:
        paths = [s["output"] if isinstance(s, dict) else s for s in self.shards]
        return str(generate.merge(paths, self.output_file, self.uuid_column))
