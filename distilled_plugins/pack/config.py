"""Stage 4's settings and its overlong policies: light, no numpy."""

from __future__ import annotations

from dataclasses import dataclass

from distilled_plugins.core import configs
from distilled_plugins.core.settings import PROCESSING, setting

OVERLONG_POLICIES = ("truncate", "split", "drop")


@dataclass
class PackConfig:
    src: str = setting(help="handled dataset folder (stage 3)", required=True)
    dst: str = setting(help="output folder (save_to_disk layout)", required=True)
    seq_length: int | None = setting(
        None, help="row length (default: model.model_config.seq_length of --finetune-config)", minimum=2
    )
    finetune_config: str = setting(
        str(configs.FINETUNE_7B), help="fine-tune YAML whose model seq_length the rows are packed to"
    )
    overlong: str = setting(
        "split",
        help="samples longer than seq_length are split, truncated or dropped (each case is counted)",
        choices=OVERLONG_POLICIES,
        title="Samples over the model's sequence length",
        section=PROCESSING,
    )
    pad_token_id: int | None = setting(None, help="pad id (default: the one handle recorded in its stats.json)")
    # packed rows built per Arrow write: each takes ~3 x seq_length x 12 bytes while built (32 x 32,768: ~40 MB)
    rows_per_write: int = setting(32, help="packed rows built per Arrow write", minimum=1)
    overwrite: bool = setting(False, help="replace a --dst folder that pack did not make")

    def __post_init__(self):
        if self.overlong not in OVERLONG_POLICIES:
            raise ValueError(f"Invalid overlong policy {self.overlong!r}, must be one of {OVERLONG_POLICIES}.")
        if self.seq_length is None:
            self.seq_length = configs.seq_length_of(self.finetune_config)
        if self.seq_length < 2:
            raise ValueError(f"seq_length must be at least 2, got {self.seq_length}")
