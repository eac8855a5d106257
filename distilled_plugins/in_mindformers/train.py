"""The training entry that ``msrun`` starts in every worker: the project's ``run_mindformer.py``.

Usage (normally through ``python -m distilled_plugins.finetune``, which launches msrun with it):
    msrun --worker_num=8 --local_worker_num=8 --join=True distilled_plugins/in_mindformers/train.py \\
        --config run_config.yaml --run_mode finetune

config -> output path -> context -> ``Trainer`` -> ``train()`` (``finetune`` and ``train`` both train; the config
decides whether a checkpoint is loaded or resumed). Imports nothing from Airflow: it is its own process.

:class:`StepMetricsWriter` is registered as a mindformers callback, so a run YAML can name it in ``callbacks``
(the fine-tune stage does): each worker appends one JSON line per step (epoch, step, loss, step time) to
``<folder>/steps_<rank>.jsonl``, which the stage's metrics are built from instead of the log text.

CPU accommodations, applied only when ``context.device_target`` is CPU and said so in the log:
- mindformers' loss-scale cell checks overflow with NPU-only float-status ops; on CPU the check becomes a plain
  "any gradient not finite" test (summed over workers), so a NaN/Inf step is still skipped, not hidden;
- mindspore's ``barrier`` op has no CPU kernel (nor has an eager all-reduce: only the all-reduce inside the
  compiled training step runs on CPU), so the barriers mindformers waits on outside the step (data loader,
  checkpoint loading) are skipped; each worker builds its dataset and strategy deterministically by itself, and
  the first training step's gradient all-reduce brings the workers together anyway;
- binding worker threads to cores (meant to keep NPU feeders on their NUMA node) is skipped: mindspore's
  automatic plan divides by the local device count, which is zero for a single CPU worker.

Without flash attention (the tiny CPU profiles, on any device), mindformers adds an explicit attention mask to
the attention scores as it comes, yet the packed rows' mask (``create_attention_mask: True``) and flash
attention's convention is uint8 "1 = hidden": the future and the other samples of the row got +1, not -10000,
so training saw the next token. :func:`apply_explicit_mask_fix` turns such a mask into the adder (-10000 where
hidden) before the scores; it is applied whenever ``use_flash_attention`` is off, and mf_generate applies it too.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # started as a script by msrun
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import mindspore as ms
from mindspore import ops

logger = logging.getLogger("distilled_plugins.in_mindformers.train")


def _cpu_overflow_status(self, status, compute_output):
    """Overflow = some gradient is not finite, summed across workers (no NPU float-status ops)."""
    flags = ops.stack([ops.logical_not(ops.isfinite(grad).all()).astype(ms.float32) for grad in compute_output])
    total = flags.sum()
    if self.is_distributed:
        total = self.allreduce(total)
    return total > 0


def _skip_barrier(*args, **kwargs) -> None:
    """Stands in for mindspore's barrier on CPU (see the module docstring)."""


def _replace_barriers() -> int:
    """Point every imported mindformers module's ``barrier`` name (bound at import) at :func:`_skip_barrier`."""
    import mindspore.communication.comm_func as comm_func

    original = comm_func.barrier
    replaced = 0
    for name, module in list(sys.modules.items()):
        if (name.startswith("mindformers") or module is comm_func) and getattr(module, "barrier", None) is original:
            module.barrier = _skip_barrier
            replaced += 1
    return replaced


def apply_explicit_mask_fix(use_flash_attention: bool) -> bool:
    """Make mindformers' non-flash attention hide what a uint8 "1 = hidden" mask hides; True when applied."""
    if use_flash_attention:
        return False
    from mindformers.models.llama.llama_transformer import LLamaAttention

    original = LLamaAttention._attn
    if getattr(original, "_explicit_mask_fix", False):
        return True

    def _attn(self, query, key, value, mask):
        if mask is not None and mask.dtype == ms.uint8:  # a given mask (packed rows); the built-in one is an adder
            mask = ops.cast(mask, query.dtype) * -10000.0
        return original(self, query, key, value, mask)

    _attn._explicit_mask_fix = True
    LLamaAttention._attn = _attn
    return True


def apply_cpu_accommodations(device_target: str) -> list[str]:
    """Patch what mindformers cannot do on CPU; returns what was patched (empty on NPUs)."""
    if str(device_target).upper() != "CPU":
        return []
    from mindformers.wrapper.wrapper import MFTrainOneStepCell

    # the package re-exports a function named build_context, hiding the module of the same name
    mf_context = sys.modules["mindformers.core.context.build_context"]
    MFTrainOneStepCell.get_overflow_status = _cpu_overflow_status
    barriers = _replace_barriers()
    mf_context._setup_affinity = lambda *args, **kwargs: None
    return [
        "loss-scale overflow check -> finite-gradient check",
        f"barriers outside the training step skipped ({barriers} modules)",
        "CPU core binding skipped",
    ]


class StepMetricsWriter(ms.train.Callback):
    """Appends each training step's figures as one JSON line to ``<folder>/steps_<rank>.jsonl``."""

    def __init__(self, folder: str, initial_step: int = 0, **kwargs):
        super().__init__()
        self.folder = Path(folder)
        self.started = time.time()
        self.initial_step = int(initial_step or 0)  # steps done before a resume (the run's YAML says)

    def on_train_step_begin(self, run_context):
        self.started = time.time()

    def on_train_step_end(self, run_context):
        from mindspore.communication import get_rank

        params = run_context.original_args()
        outputs = params.net_outputs
        loss = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
        steps_per_epoch = int(params.batch_num)
        if params.get("initial_step", None) is not None:  # as mindformers' MFLossMonitor counts
            self.initial_step = int(params.initial_step)
        initial = self.initial_step
        try:
            rank = get_rank()
        except RuntimeError:  # a single worker without a communication group
            rank = 0
        line = {
            "epoch": int(params.cur_epoch_num),
            "epochs": int(params.epoch_num),
            "step": (int(params.cur_step_num) + initial - 1) % steps_per_epoch + 1,
            "steps_per_epoch": steps_per_epoch,
            "loss": float(loss.asnumpy().mean()),
            "step_time_ms": int((time.time() - self.started) * 1000),
        }
        with open(self.folder / f"steps_{rank}.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="distilled_plugins/in_mindformers/train.py", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="the run's YAML (paths and seq_length already filled)")
    p.add_argument("--run_mode", default=None, choices=["train", "finetune"])
    args = p.parse_args(argv)

    from mindformers.core.context import build_context
    from mindformers.tools.register import MindFormerConfig, MindFormerModuleType, MindFormerRegister
    from mindformers.trainer import Trainer
    from mindformers.utils.file_utils import set_output_path

    MindFormerRegister.register_cls(StepMetricsWriter, module_type=MindFormerModuleType.CALLBACK)
    config = MindFormerConfig(args.config)
    if args.run_mode:
        config.run_mode = args.run_mode
    set_output_path(config.output_dir)
    patched = apply_cpu_accommodations(config.context.device_target)
    if apply_explicit_mask_fix(bool(config.model.model_config.get("use_flash_attention", False))):
        patched.append("explicit attention mask (1 = hidden) made an adder for non-flash attention")
    build_context(config)
    if patched:
        from mindformers.tools.logger import logger as mf_logger

        mf_logger.warning("applying CPU accommodations (and the no-flash-attention mask fix): %s", "; ".join(patched))
    Trainer(config).train()
    return 0


if __name__ == "__main__":
    sys.exit(main())
