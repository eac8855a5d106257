"""Math500EvalOperator: stage 6 as an Airflow task."""

from __future__ import annotations

import json

from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowException

from distilled_plugins import evaluate
from operators.assets import emit
from operators.hooks import TeacherEndpointHook
from operators.pipeline import fails_clearly


class Math500EvalOperator(BaseOperator):
    """Evaluate on MATH-500 and write report.json / report.md / accuracy.png; returns the report's path.

    Completions come from an endpoint (``endpoint_conn_id`` + ``model``), from a stage 5 checkpoint through
    mindformers (``checkpoint`` + ``mindformers_config``), or from a file (``rescore``). They are kept in
    ``output_dir``, so a retry requests only what is missing. With ``baseline`` and ``fail_below_baseline``
    the task fails when the model scores below the baseline's pass@1.
    """

    template_fields = (
        "output_dir",
        "dataset",
        "limit",
        "source",
        "endpoint_conn_id",
        "model",
        "checkpoint",
        "mindformers_config",
        "rescore",
        "baseline",
        "n_samples",
        "max_new_tokens",
    )
    ui_color = "#f3e8fd"

    def __init__(
        self,
        *,
        output_dir: str,
        dataset: str = str(evaluate.MATH500),
        limit: int | None = None,
        endpoint_conn_id: str | None = None,
        model: str | None = None,
        checkpoint: str | None = None,
        mindformers_config: str | None = None,
        rescore: str | None = None,
        source: str | None = None,
        n_samples: int = 4,
        max_new_tokens: int = 32768,
        temperature: float = 0.6,
        top_p: float = 0.95,
        seed: int = 0,
        system_prompt: str = evaluate.SYSTEM_PROMPT,
        prompt_template: str = "{prompt}",
        baseline: str | None = None,
        fail_below_baseline: bool = False,
        report_label: str = "fine-tuned model",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.output_dir = output_dir
        self.dataset = dataset
        self.limit = limit
        self.endpoint_conn_id = endpoint_conn_id
        self.model = model
        self.checkpoint = checkpoint
        self.mindformers_config = mindformers_config
        self.rescore = rescore
        self.source = source  # "endpoint" or "checkpoint": which of the configured sources to use
        self.n_samples = n_samples
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.system_prompt = system_prompt
        # the user turn around each problem (not templated: its braces are literal); give the generation template
        # when evaluating a checkpoint trained on it, so the model is asked as it learnt
        self.prompt_template = prompt_template
        self.baseline = baseline
        self.fail_below_baseline = fail_below_baseline
        self.report_label = report_label

    @fails_clearly
    def execute(self, context: Context) -> str:
        source = self.source or None
        if source not in (None, "endpoint", "checkpoint"):
            raise ValueError(f"source must be 'endpoint' or 'checkpoint', got {self.source!r}")
        checkpoint = None if source == "endpoint" else self.checkpoint or None
        conn_id = None if source == "checkpoint" else self.endpoint_conn_id or None
        # the connection's whole fleet (its host, then extra["endpoints"]), as generation uses it
        endpoints = TeacherEndpointHook(conn_id).get_fleet().endpoints if conn_id else None
        report_path = evaluate.run(
            evaluate.EvalConfig(
                out=self.output_dir,
                dataset=self.dataset,
                limit=int(self.limit) if self.limit else None,
                protocol=evaluate.Protocol(
                    self.system_prompt,
                    float(self.temperature),
                    float(self.top_p),
                    int(self.max_new_tokens),
                    int(self.n_samples),
                    int(self.seed),
                ),
                endpoints=endpoints,
                model=self.model,
                checkpoint=checkpoint,
                mindformers_config=self.mindformers_config or None,
                rescore=self.rescore or None,
                prompt_template=self.prompt_template,
                baseline=self.baseline or None,
                label=self.report_label,
            )
        )
        report = json.loads(report_path.read_text())
        self.log.info(
            "MATH-500 pass@1 %.2f%% (95%% CI %s) over %d problems x %d samples; report %s",
            report["pass@1"],
            report["ci95"],
            report["problems"],
            report["protocol"]["n_samples"],
            report_path,
        )
        if self.fail_below_baseline and report.get("baseline") and report["baseline"]["difference"] < 0:
            raise AirflowException(
                f"task {self.task_id}: pass@1 {report['pass@1']:.2f} is below the baseline's "
                f"{report['baseline']['pass@1']:.2f} ({report['baseline']['difference']:+.2f} points); "
                f"see {report_path.with_suffix('.md')}"
            )
        emit(
            context,
            self,
            {
                "report": str(report_path),
                "pass@1": report["pass@1"],
                "ci95": report["ci95"],
                "n": report["problems"],
                "n_samples": report["protocol"]["n_samples"],
            },
        )
        return str(report_path)
