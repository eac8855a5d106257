"""A fine-tune job's settings: one node's part of the job (kept light: the stage's code is in the other modules)."""

from __future__ import annotations

from dataclasses import dataclass

from distilled_plugins.core import configs
from distilled_plugins.core.settings import FINETUNE, MULTINODE, setting


@dataclass
class FinetuneConfig:
    """Settings of one node's part of a fine-tune job (one msrun launcher)."""

    dataset_path: str = setting(help="packed data folder (stage 4)", required=True)
    output_dir: str = setting(
        help="the task's folder on shared storage: one job-<id>/ per job",
        required=True,
        flag="--dst",
        aliases=("--output-dir",),
    )
    config: str = setting(
        configs.FINETUNE_7B.name,
        help="base fine-tune YAML: a path, or a profile in configs/ (finetune_qwen_2_5_7b.yaml: the tutorial's 7B "
        "recipe on Ascend NPUs; finetune_tiny_cpu.yaml: the tiny CPU model of the demo)",
        title="Fine-tune profile",
        section=FINETUNE,
    )
    load_checkpoint: str | None = setting(
        None,
        help="folder of the base model weights (Qwen2.5-Math-7B-Instruct safetensors); empty: the profile's own "
        "load_checkpoint",
        title="Base checkpoint",
        section=FINETUNE,
    )
    epochs: int | None = setting(
        None,
        help="passes over the packed data; empty: the profile's runner_config.epochs",
        minimum=1,
        title="Epochs",
        section=FINETUNE,
    )
    learning_rate: float | None = setting(
        None,
        help="peak learning rate of the schedule; empty: the profile's lr_schedule.learning_rate",
        minimum=0,
        title="Learning rate",
        section=FINETUNE,
    )
    seq_length: int | None = setting(None, help="tokens per row; empty: the YAML's model seq_length", minimum=1)
    worker_num: int = setting(1, help="msrun workers over all nodes", minimum=1)
    local_worker_num: int | None = setting(None, help="msrun workers on this node; empty: worker_num (one node)")
    node_rank: int = setting(0, help="this node's rank (0: the node hosting msrun's scheduler)", minimum=0)
    master_addr: str = setting(
        "auto",
        help="address of training node 0 (msrun's scheduler), reachable from every node; auto: 127.0.0.1 on one "
        "node, else node 0 publishes its own address in its record",
        title="Master address",
        section=MULTINODE,
    )
    master_port: int = setting(
        8118, help="msrun's master port on node 0", minimum=1024, maximum=65535, title="Master port", section=MULTINODE
    )
    overrides: dict = setting(
        help="YAML overrides by dotted key, e.g. {'runner_config.epochs': 1} (CLI: --set KEY=VALUE ...)",
        factory=dict,
        cli=False,
    )
    poll_interval: float = setting(5.0, help="seconds between looks at the job's status", minimum=0.1)
    stall_timeout: float | None = setting(
        None,
        help="seconds without a worker log line before the job counts as stalled; empty: 600 on CPU, 1800 on Ascend",
        minimum=1,
    )
    dead_after: float = setting(
        60.0, help="seconds without a supervisor heartbeat before a node counts as dead", minimum=1
    )

    def __post_init__(self):
        self.config = str(configs.resolve(self.config))
        self.local_worker_num = self.local_worker_num or self.worker_num
        if self.worker_num < 1 or not 1 <= self.local_worker_num <= self.worker_num:
            raise ValueError(f"need 1 <= local_worker_num ({self.local_worker_num}) <= worker_num ({self.worker_num})")
        if self.worker_num % self.local_worker_num:
            raise ValueError(
                f"worker_num {self.worker_num} must be a multiple of local_worker_num "
                f"{self.local_worker_num} (the same number of workers on every node)"
            )
        if not 0 <= self.node_rank < self.nodes:
            raise ValueError(f"node_rank {self.node_rank} is outside 0..{self.nodes - 1} ({self.nodes} node(s))")

    @property
    def nodes(self) -> int:
        return self.worker_num // self.local_worker_num
