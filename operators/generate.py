"""GenerateReasoningOperator: stage 1 as an Airflow task."""

from __future__ import annotations

from functools import cached_property

from airflow.sdk import BaseOperator, Context

from distilled_plugins import generate
from distilled_plugins.client import RetryPolicy
from operators.hooks import TeacherEndpointHook
from operators.pipeline import fails_clearly
from operators.xcom import with_fields


class GenerateReasoningOperator(BaseOperator):
    """Generate chain-of-thought completions for (one shard of) a seed dataset.

    The endpoint and its API key come from the Airflow Connection ``teacher_conn_id``. The output file is
    appended to and resumed, so a retry of the task requests only what the earlier try did not finish.
    Returns ``{"output": <jsonl path>, "stats": <stats json path>}``.
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

    @cached_property
    def hook(self) -> TeacherEndpointHook:
        return TeacherEndpointHook(self.teacher_conn_id)

    @fails_clearly
    def execute(self, context: Context) -> dict:
        api_addr, api_key = self.hook.get_endpoint()
        result = generate.run(
            generate.GenerateConfig(
                dataset_name=self.dataset_name,
                output_file=self.output_file,
                model=self.model,
                prompt_column=self.prompt_column,
                uuid_column=self.uuid_column or None,
                api_addr=api_addr,
                api_key=api_key,
                num_generations=int(self.num_generations),
                max_tokens=int(self.max_tokens),
                max_concurrent=int(self.max_concurrent),
                temperature=float(self.temperature),
                top_p=float(self.top_p),
                prompt_template=self.prompt_template,
                shard_index=int(self.shard_index),
                num_shards=int(self.num_shards),
                retry=RetryPolicy(max_attempts=int(self.max_attempts)),
                store_dir=self.store_dir or None,
            )
        )
        return with_fields(context, {"output": str(result.output_file), "stats": str(result.stats_file)})


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
