"""PackDatasetOperator: stage 4 as an Airflow task."""

from __future__ import annotations

import json
from pathlib import Path

from airflow.sdk import BaseOperator, Context

from distilled_plugins import configs, pack
from operators.assets import emit


class PackDatasetOperator(BaseOperator):
    """Pack handled samples into rows of the fine-tune config's ``seq_length`` (or an explicit one).

    Written to a temporary folder and renamed at the end, so a retry starts clean. Returns the output folder.
    """

    template_fields = ("src", "dst", "seq_length", "finetune_config", "overlong")
    ui_color = "#e6f4ea"

    def __init__(
        self,
        *,
        src: str,
        dst: str,
        seq_length: int | None = None,
        finetune_config: str = str(configs.FINETUNE_7B),
        overlong: str = "split",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.src = src
        self.dst = dst
        self.seq_length = seq_length
        self.finetune_config = finetune_config
        self.overlong = overlong

    def execute(self, context: Context) -> str:
        out = Path(
            pack.run(
                pack.PackConfig(
                    src=self.src,
                    dst=self.dst,
                    seq_length=int(self.seq_length) if self.seq_length else None,
                    finetune_config=self.finetune_config,
                    overlong=self.overlong,
                )
            )
        )
        stats = json.loads((out / "stats.json").read_text())
        emit(
            context,
            self,
            {
                "path": str(out),
                "rows": stats["packs"],
                "seq_length": stats["seq_length"],
                "efficiency": stats["efficiency"],
            },
        )
        return str(out)
