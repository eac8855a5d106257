"""RejectSamplingOperator: stage 2 as an Airflow task."""

from __future__ import annotations

from airflow.sdk import BaseOperator, Context

from distilled_plugins import reject_sampling
from operators.assets import emit
from operators.xcom import with_fields


class RejectSamplingOperator(BaseOperator):
    """Keep the generations that math_verify proves correct; drop examples that overlap evaluation sets.

    Grading runs in worker processes, never in the task process (math_verify's ``signal.alarm`` would cancel
    Airflow's ``execution_timeout``). Output is written atomically, so a retry rewrites the same files.
    Returns ``{"output": <jsonl>, "verdicts": <jsonl>, "stats": <json>}``.
    """

    template_fields = ("src", "dst", "eval_sets", "answer_column", "problem_column", "workers")
    ui_color = "#fef3e0"

    def __init__(
        self,
        *,
        src: str,
        dst: str,
        eval_sets: list[str] | None = None,
        answer_column: str = "answer",
        problem_column: str = "problem",
        workers: int | None = None,
        parse_timeout: int = 5,
        verify_timeout: int = 5,
        sample_timeout: float = 30.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.src = src
        self.dst = dst
        self.eval_sets = eval_sets
        self.answer_column = answer_column
        self.problem_column = problem_column
        self.workers = workers
        self.parse_timeout = parse_timeout
        self.verify_timeout = verify_timeout
        self.sample_timeout = sample_timeout

    def execute(self, context: Context) -> dict:
        eval_sets = reject_sampling.DEFAULT_EVAL_SETS if self.eval_sets is None else list(self.eval_sets)
        result = reject_sampling.run(
            reject_sampling.RejectSamplingConfig(
                src=self.src,
                dst=self.dst,
                answer_column=self.answer_column,
                problem_column=self.problem_column,
                workers=int(self.workers) if self.workers else None,
                parse_timeout=self.parse_timeout,
                verify_timeout=self.verify_timeout,
                sample_timeout=self.sample_timeout,
                eval_sets=eval_sets,
            )
        )
        stats = result.stats
        emit(
            context,
            self,
            {
                "path": str(result.output),
                "kept": stats["examples_out"],
                "rejected": stats["examples_in"] - stats["examples_out"],
                "generations_correct": stats["generations_correct"],
            },
        )
        return with_fields(
            context, {"output": str(result.output), "verdicts": str(result.verdicts), "stats": str(result.stats_file)}
        )
