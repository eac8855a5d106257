"""How reliably the learnability check's model learns its task: many seeds, a minute or so each.

Usage:
    .venv/bin/python bench/learnability_probe.py --out /tmp/probe [--train 1440 --held-out 64 --epochs 6 --seeds 1-12]
        [--set optimizer.weight_decay=0.01 ...]   # the profile with changes, to compare settings over seeds

Training in the check is stochastic: the mindspore CPU kernels make two runs with the same seed drift apart after
the first step, so one run says little about how often the check passes. This probe trains the check's model
(``configs/finetune_learnability_cpu.yaml``: the same layers and the same vocabulary, the task's tokenizer) on the
rows the stages packed, in training's order, with the schedule, the optimizer (with its parameter groups) and the
gradient clipping built from the profile as the trainer builds them, once per seed (each seed one
initialisation), without msrun's start-up and mindformers' trainer loop. Every ``--every`` steps (default: one
epoch) it scores the held-out problems teacher-forced (a problem is right when every completion token is: greedy
decoding then writes the trace exactly) and each of the four lookups the trace needs: the tens word, the units
word, the first digit, the second digit. It ends with how many seeds reached the slow test's bar and the
benchmark's target. A stand-in for the fine-tune stage, not the check: no msrun, no mindformers trainer.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distilled_plugins.core.io import iter_jsonl, rewrite_jsonl
from distilled_plugins.devtools import learnability


def packed_samples(packed: Path) -> list[tuple[np.ndarray, ...]]:
    """Rows as mindformers' loader delivers them: ids, labels, loss mask, position ids, attention mask."""
    import datasets
    from mindformers.dataset.dataloader.hf_dataloader import _get_packed_data

    return [_get_packed_data(r["input_ids"], r["labels"], r["actual_seq_len"]) for r in datasets.load_from_disk(packed)]


def lookup_ids(tokenizer) -> set[int]:
    """Token ids of the number words and digits: the four tokens of a completion that read the problem."""
    words = [f" {w}" for w in learnability.TENS + learnability.UNITS] + [str(d) for d in range(1, 10)]
    ids = [tokenizer.encode(w) for w in words]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"each number word and digit must be one token: {dict(zip(words, ids, strict=True))}")
    return {i[0] for i in ids}


class Probe:
    """The packed training and held-out rows, each as a batch of one, and the ids that read the problem."""

    def __init__(self, train: list, held_out: list, lookups: set[int]):
        self.train = [tuple(a[None] for a in row) for row in train]
        self.held_out = [tuple(a[None] for a in row) for row in held_out]
        self.lookups = lookups

    def run(
        self, seed: int, steps: int, every: int, overrides: dict | None = None
    ) -> list[tuple[int, float, float, list[float]]]:
        import mindspore as ms
        from mindformers.core import build_lr, build_optim
        from mindformers.models.llama import LlamaConfig, LlamaForCausalLM
        from mindformers.tools.register import MindFormerConfig
        from mindformers.trainer.optimizer_grouped_parameters import get_optimizer_grouped_parameters
        from mindspore import nn, ops

        from distilled_plugins.in_mindformers.train import apply_explicit_mask_fix

        ms.set_seed(seed)
        profile = MindFormerConfig(str(learnability.PROFILE))
        apply_overrides(profile, overrides or {})
        ms.set_context(mode=profile.context.mode, device_target=profile.context.device_target)  # graph mode: 20x
        settings = {k: v for k, v in profile.model.model_config.items() if k != "type"}
        seq_length = self.train[0][0].shape[1]
        settings.update(seq_length=seq_length)
        apply_explicit_mask_fix(settings.get("use_flash_attention", False))
        model = LlamaForCausalLM(LlamaConfig(**settings))
        # the schedule and optimizer the trainer builds from the profile (no weight decay on norms and biases)
        schedule = build_lr({**profile.lr_schedule, "total_steps": steps})
        groups = get_optimizer_grouped_parameters(model, profile.optimizer.weight_decay, schedule)
        optimizer = build_optim(profile.optimizer, default_args={"params": groups, "learning_rate": schedule})
        max_norm = profile.runner_wrapper.max_grad_norm

        class Loss(nn.Cell):
            def __init__(self):
                super().__init__()
                self.model = model

            def construct(self, ids, labels, loss_mask, position_ids, mask):
                return self.model(
                    ids, labels=labels, position_ids=position_ids, attention_mask=mask, loss_mask=loss_mask
                )

        class ClippedStep(nn.TrainOneStepCell):
            def construct(self, *inputs):
                loss = self.network(*inputs)
                grads = self.grad(self.network, self.weights)(*inputs, ops.fill(loss.dtype, loss.shape, 1.0))
                self.optimizer(ops.clip_by_global_norm(grads, max_norm))
                return loss

        step = ClippedStep(Loss(), optimizer)
        step.set_train(True)
        history, losses = [], []
        for i in range(steps):
            losses.append(float(step(*(ms.Tensor(a) for a in self.train[i % len(self.train)])).asnumpy()))
            if (i + 1) % every == 0 or i + 1 == steps:
                model.set_train(False)
                history.append((i + 1, float(np.mean(losses[-every:])), *self.score(model)))
                model.set_train(True)
        return history

    def score(self, model) -> tuple[float, list[float]]:
        """Held-out problems right teacher-forced (%), and each lookup's share right (%)."""
        import mindspore as ms

        right = total = 0
        per_lookup = np.zeros(4)
        for ids, labels, loss_mask, position_ids, mask in self.held_out:
            logits = model(
                ms.Tensor(ids),
                labels=ms.Tensor(labels),
                position_ids=ms.Tensor(position_ids),
                attention_mask=ms.Tensor(mask),
            )[0]
            predicted = logits.asnumpy().reshape(ids.shape[1], -1).argmax(-1)
            starts = [*np.flatnonzero(position_ids[0] == 0).tolist(), ids.shape[1]]
            for start, end in itertools.pairwise(starts):
                completion = np.flatnonzero(loss_mask[0, start:end] == 1) + start
                if not len(completion):
                    continue
                ok = predicted[completion] == labels[0, completion]
                total += 1
                right += bool(ok.all())
                lookups = [k for k, t in enumerate(labels[0, completion]) if int(t) in self.lookups]
                assert len(lookups) == 4, f"a completion with {len(lookups)} number words and digits, not 4"
                per_lookup += ok[lookups]
        return 100.0 * right / total, list(100.0 * per_lookup / total)


def _changed(folder: Path, tokenizer: Path) -> bool:
    """Whether ``folder``'s rows were packed with another tokenizer than ``tokenizer``."""
    return (folder / "tokenizer.json").read_bytes() != (tokenizer / "tokenizer.json").read_bytes()


def seeds(text: str) -> list[int]:
    first, _, last = text.partition("-")
    chosen = list(range(int(first), int(last or first) + 1))
    if not chosen:
        raise argparse.ArgumentTypeError(f"no seeds in {text!r}: give N or FIRST-LAST")
    return chosen


def override(text: str) -> tuple[str, object]:
    import yaml

    key, sep, text_value = text.partition("=")
    if not sep or not key or not text_value:
        raise argparse.ArgumentTypeError(f"not KEY=VALUE: {text!r}")
    value = yaml.safe_load(text_value)
    with contextlib.suppress(ValueError):  # YAML 1.1 reads 1e-2 as a string
        value = float(value) if isinstance(value, str) else value
    return key, value


def apply_overrides(profile, overrides: dict) -> None:
    """Set each dotted key of ``overrides`` in ``profile``; a key the profile lacks is an error, not a new one."""
    for key, value in overrides.items():
        *parents, last = key.split(".")
        node = profile
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if not isinstance(node, dict) or last not in node:
            raise SystemExit(f"--set {key}: the profile {learnability.PROFILE.name} has no such key")
        node[last] = value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path, help="work folder: the task and its packed rows (reused)")
    p.add_argument("--train", type=int, default=learnability.SIZE["n_train"], help="training problems")
    p.add_argument("--held-out", type=int, default=learnability.SIZE["n_held_out"], help="held-out problems")
    p.add_argument("--epochs", type=int, default=learnability.SIZE["epochs"])
    p.add_argument("--seeds", type=seeds, default=seeds("1-12"), help="initialisation seeds, e.g. 1-12")
    p.add_argument("--every", type=int, help="score the held-out problems every N steps (default: one epoch)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        type=override,
        default=[],
        metavar="KEY=VALUE",
        help="change the profile, e.g. optimizer.weight_decay=0.1 (repeatable; the value is read as YAML)",
    )
    args = p.parse_args(argv)

    from distilled_plugins.handle.encoder import load_tokenizer

    if args.held_out < 1:
        p.error("--held-out must be at least 1")
    out = args.out.resolve() / f"{args.train}-{args.held_out}"
    tokenizer = learnability.build_tokenizer(out / "tokenizer")  # cheap; the rows are rebuilt if it changed
    train_rows, held_rows = learnability.make_task(args.train, args.held_out)
    packed = {}
    for name, rows in (("train", train_rows), ("held_out", held_rows)):
        folder = out / name
        made = all((folder / f).exists() for f in ("pack", "task.jsonl", "tokenizer.json"))
        if not made or [r for _, r in iter_jsonl(folder / "task.jsonl")] != rows or _changed(folder, tokenizer):
            shutil.rmtree(folder, ignore_errors=True)
            learnability.data_stages(folder, rewrite_jsonl(folder / "task.jsonl", rows), tokenizer)
            shutil.copy(tokenizer / "tokenizer.json", folder / "tokenizer.json")
        packed[name] = packed_samples(folder / "pack")
    probe = Probe(packed["train"], packed["held_out"], lookup_ids(load_tokenizer(tokenizer)))
    steps = args.epochs * len(probe.train)
    every = args.every or len(probe.train)
    changed = "".join(f", {k}={v}" for k, v in args.overrides)
    print(f"{len(probe.train)} packed rows x {args.epochs} epochs = {steps} steps; the profile's model{changed}")
    finals = []
    bar, target = learnability.TEST_MIN_AFTER, learnability.TARGET_AFTER
    for seed in args.seeds:
        started = time.monotonic()
        history = probe.run(seed, steps, every, dict(args.overrides))
        finals.append(history[-1][2])
        trail = " ".join(
            f"{s}:{right:.0f}%[{'/'.join(f'{v:.0f}' for v in lookups)}]" for s, _, right, lookups in history
        )
        print(f"seed {seed}: {trail} loss {history[-1][1]:.4f} ({time.monotonic() - started:.0f} s)", flush=True)
    print(
        f"{len(finals)} seeds, {steps} steps: held-out right (teacher-forced) >= {bar:.0f}% (the slow test's bar) in "
        f"{sum(f >= bar for f in finals)}, >= {target:.0f}% (the benchmark's target) in "
        f"{sum(f >= target for f in finals)}; lowest {min(finals):.0f}%"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
