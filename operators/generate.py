"""GenerateReasoningOperator: stage 1 as an Airflow task."""

from __future__ import annotations

from functools import cached_property

from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowFailException

from distilled_plugins import generate
from distilled_plugins.client import RequestSettings, RetryPolicy
from operators.hooks import TeacherEndpointHook
from operators.pipeline import fails_clearly
from operators.xcom import with_fields


class GenerateReasoningOperator(BaseOperator):
    """Generate chain-of-thought completions for (one shard of) a seed dataset.

    The endpoints and their API keys come from the Airflow Connection ``teacher_conn_id`` (see
    :class:`TeacherEndpointHook`; its extra may list several endpoints, rate limits and prices). The operator's
    own ``max_rpm``/``max_tpm``/prices/``max_cost`` win over the connection's where given (0 or empty: not given).
    The output file is appended to and resumed, so a retry of the task requests only what the earlier try did not
    finish; reaching ``max_cost`` fails the task without retries (a rerun resumes). Returns
    ``{"output": <jsonl path>, "stats": <stats json path>}``.
    """

    # prompt_template is not templated: its literal braces (\boxed{{}}) would be read as Jinja
    template_fields = (
        "dataset_name",
        "output_file",
        "model",
        "teacher_conn_id",
        "prompt_column",
        "uuid_column",
        "num_generations",
        "max_tokens",
        "max_concurrent",
        "shard_index",
        "num_shards",
        "store_dir",
        "max_attempts",
        "request_timeout",
        "max_rpm",
        "max_tpm",
        "stream",
        "price_per_mtok_in",
        "price_per_mtok_out",
        "max_cost",
    )
    ui_color = "#e8f0fe"

    def __init__(
        self,
        *,
        dataset_name: str,
        output_file: str,
        model: str,
        teacher_conn_id: str = "teacher_default",
        prompt_column: str = "problem",
        uuid_column: str | None = None,
        num_generations: int = 4,
        max_tokens: int = 16384,
        max_concurrent: int = 100,
        temperature: float = 0.6,
        top_p: float = 0.95,
        prompt_template: str = generate.DEFAULT_PROMPT_TEMPLATE,
        shard_index: int = 0,
        num_shards: int = 1,
        store_dir: str | None = None,
        max_attempts: int = RetryPolicy.max_attempts,
        request_timeout: float = RetryPolicy.request_timeout,
        max_rpm: float | None = None,
        max_tpm: float | None = None,
        stream: bool = False,
        price_per_mtok_in: float | None = None,
        price_per_mtok_out: float | None = None,
        max_cost: float | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.dataset_name = dataset_name
        self.output_file = output_file
        self.model = model
        self.teacher_conn_id = teacher_conn_id
        self.prompt_column = prompt_column
        self.uuid_column = uuid_column
        self.num_generations = num_generations
        self.max_tokens = max_tokens
        self.max_concurrent = max_concurrent
        self.temperature = temperature
        self.top_p = top_p
        self.prompt_template = prompt_template
        self.shard_index = shard_index
        self.num_shards = num_shards
        self.store_dir = store_dir
        self.max_attempts = max_attempts
        self.request_timeout = request_timeout
        self.max_rpm = max_rpm
        self.max_tpm = max_tpm
        self.stream = stream
        self.price_per_mtok_in = price_per_mtok_in
        self.price_per_mtok_out = price_per_mtok_out
        self.max_cost = max_cost

    @cached_property
    def hook(self) -> TeacherEndpointHook:
        return TeacherEndpointHook(self.teacher_conn_id)

    def request_settings(self, from_connection: dict) -> RequestSettings:
        """The operator's values (rendered templates: strings), else the connection's, else the defaults."""

        def given(name: str) -> float | None:
            value = getattr(self, name)
            if value in (None, "", "None") or float(value) == 0:
                return from_connection.get(name)
            return float(value)

        return RequestSettings(
            max_attempts=int(self.max_attempts),
            request_timeout=float(self.request_timeout),
            max_rpm=given("max_rpm"),
            max_tpm=given("max_tpm"),
            stream=str(self.stream).lower() in ("true", "1", "yes"),
            price_per_mtok_in=given("price_per_mtok_in") or 0.0,
            price_per_mtok_out=given("price_per_mtok_out") or 0.0,
            max_cost=given("max_cost"),
        )

    @fails_clearly
    def execute(self, context: Context) -> dict:
        fleet = self.hook.get_fleet()
        try:
            result = self._run(fleet)
        except generate.BudgetReached as e:
            raise AirflowFailException(f"task {self.task_id}: {e}") from None
        return with_fields(context, {"output": str(result.output_file), "stats": str(result.stats_file)})

    def _run(self, fleet) -> generate.GenerateResult:
        return generate.run(
            generate.GenerateConfig(
                dataset_name=self.dataset_name,
                output_file=self.output_file,
                model=self.model,
                prompt_column=self.prompt_column,
                uuid_column=self.uuid_column or None,
                endpoints=fleet.endpoints,
                num_generations=int(self.num_generations),
                max_tokens=int(self.max_tokens),
                max_concurrent=int(self.max_concurrent),
                temperature=float(self.temperature),
                top_p=float(self.top_p),
                prompt_template=self.prompt_template,
                shard_index=int(self.shard_index),
                num_shards=int(self.num_shards),
                retry=self.request_settings(fleet.settings),
                store_dir=self.store_dir or None,
            )
        )


class MergeShardsOperator(BaseOperator):
    """Join the shard outputs of mapped :class:`GenerateReasoningOperator` tasks; returns the merged JSONL path."""

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
