"""HandleDatasetOperator: stage 3 as an Airflow task."""

from __future__ import annotations

from airflow.sdk import BaseOperator, Context

from distilled_plugins import handle


class HandleDatasetOperator(BaseOperator):
    """Tokenize conversations with the chat template and mask the prompt out of the labels.

    Written to a temporary folder and renamed at the end, so a retry starts clean. Returns the output folder.
    """

    template_fields = ("src", "tokenizer", "dst", "max_length", "truncation")
    ui_color = "#e6f4ea"

    def __init__(
        self,
        *,
        src: str | list[str],
        tokenizer: str,
        dst: str,
        max_length: int = 20480,
        truncation: str = "tutorial",
        system_prompt: str = handle.SYSTEM_PROMPT,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.src = src
        self.tokenizer = tokenizer
        self.dst = dst
        self.max_length = max_length
        self.truncation = truncation
        self.system_prompt = system_prompt

    def execute(self, context: Context) -> str:
        src = [self.src] if isinstance(self.src, str) else list(self.src)
        return str(
            handle.run(
                handle.HandleConfig(
                    src=src,
                    tokenizer=self.tokenizer,
                    dst=self.dst,
                    max_length=int(self.max_length),
                    truncation=self.truncation,
                    system_prompt=self.system_prompt,
                )
            )
        )
