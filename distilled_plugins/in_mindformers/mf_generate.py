"""Completions from a fine-tuned checkpoint with mindformers' model, generated in batches (the tutorial's way to
evaluate, made fast enough for a held-out set).

Usage (normally started by ``python -m distilled_plugins.evaluate --checkpoint ...`` as its own process):
    python -m distilled_plugins.in_mindformers.mf_generate --config configs/finetune_tiny_cpu.yaml \\
        --checkpoint finetune/checkpoint --tokenizer configs/tokenizer_tiny \\
        --problems problems.jsonl --output completions.jsonl --num-samples 4 --max-new-tokens 64 --batch-size 64

Prompts are rendered exactly as stage 3 renders training conversations (system prompt, the tokenizer's chat
template, the Rust tokenizer), up to and including ``<|im_start|>assistant\\n``. A batch of prompts is
left-padded and decoded together (graph mode, one fixed shape for the run): one forward pass of the whole batch
per new token, with an attention mask that hides the padding and the future (RoPE makes attention depend only on relative positions, so left padding
changes nothing for the real tokens). Finished sequences leave the batch. ``--checkpoint untrained`` generates
from the model as initialised (``--seed``): the "before" of a learnability check.

Writes stage 1's schema (``{**problem, "generations", "finish_reasons", "prompt"}``), one line per problem,
appended as each finishes, so a rerun continues where it stopped. A progress line every few seconds. Runs in its
own process: mindspore's context is global and must not live in an Airflow task.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distilled_plugins.core.appended_jsonl import read_appended_jsonl
from distilled_plugins.core.configs import load_yaml
from distilled_plugins.core.errors import DataError
from distilled_plugins.core.io import dumps_line, iter_jsonl, rewrite_jsonl
from distilled_plugins.core.progress import Progress
from distilled_plugins.core.schema import FINISH_REASONS_COLUMN, GENERATIONS_COLUMN, PROMPT_COLUMN, row_key
from distilled_plugins.teacher.settings import TEMPERATURE, TOP_P

logger = logging.getLogger("distilled_plugins.in_mindformers.mf_generate")  # not __main__: evaluate relays these lines

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
UNTRAINED = "untrained"


def newest_checkpoint(checkpoint: str | Path) -> Path:
    """A safetensors file: the given one, or the newest in a folder (or in its rank_0 folder)."""
    path = Path(checkpoint)
    if path.is_file():
        return path
    for folder in (path, path / "rank_0"):
        files = sorted(folder.glob("*.safetensors"), key=lambda f: f.stat().st_mtime)
        if files:
            return files[-1]
    raise DataError(f"no .safetensors checkpoint found in {path} (nor in {path / 'rank_0'})")


def prompt_ids(tokenizer, system_prompt: str, problems: list[str]) -> list[list[int]]:
    """Token ids of each problem's prompt, rendered as stage 3 renders training data (see ``handle.encoder.ChatEncoder``)."""
    conversations = [[{"role": "system", "content": system_prompt}, {"role": "user", "content": p}] for p in problems]
    texts = tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=True)
    return [e.ids for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]


def build_model(config_path: str, checkpoint: str | Path, seq_length: int):
    """mindformers' ``LlamaForCausalLM`` of the fine-tune YAML with the checkpoint's weights (or as initialised)."""
    import mindspore as ms
    from mindformers.core.context import build_context
    from mindformers.models.llama import LlamaConfig, LlamaForCausalLM
    from mindformers.tools.register import MindFormerConfig

    from distilled_plugins.core.configs import resolve
    from distilled_plugins.in_mindformers.train import apply_explicit_mask_fix

    config = MindFormerConfig(str(resolve(config_path)))
    config.use_parallel = False
    config.context.mode = 0  # graph: every step has the same shapes (one compile, then ~4x faster than PyNative)
    build_context(config)
    settings = {k: v for k, v in config.model.model_config.items() if k != "type"}
    settings.update(use_past=False, seq_length=seq_length, batch_size=1)
    apply_explicit_mask_fix(settings.get("use_flash_attention", False))
    model = LlamaForCausalLM(LlamaConfig(**settings))
    if str(checkpoint) != UNTRAINED:
        params = ms.load_checkpoint(str(checkpoint), format="safetensors")
        not_loaded, _ = ms.load_param_into_net(model, params)
        if not_loaded:
            raise DataError(f"{checkpoint} lacks weights for {len(not_loaded)} parameters, e.g. {not_loaded[:3]}")
    model.set_train(False)
    return model


def attention_mask(pad: np.ndarray) -> np.ndarray:
    """``(batch, T, T)`` uint8, 1 = hidden: the future and the left padding (a pad query sees only itself).

    >>> attention_mask(np.array([[True, False, False]]))[0]
    array([[0, 1, 1],
           [1, 0, 1],
           [1, 0, 0]], dtype=uint8)
    """
    length = pad.shape[1]
    future = np.triu(np.ones((length, length), dtype=bool), 1)
    hidden = future[None] | pad[:, None, :]
    hidden[:, np.arange(length), np.arange(length)] = False
    return hidden.astype(np.uint8)


class Sampler:
    """Greedy (temperature 0) or temperature + top-p sampling over a batch of logits, in NumPy."""

    def __init__(self, temperature: float, top_p: float, seed: int):
        self.temperature, self.top_p = temperature, top_p
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        if self.temperature <= 0:
            return logits.argmax(-1)
        scaled = logits / self.temperature
        probs = np.exp(scaled - scaled.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        order = np.argsort(-probs, axis=-1)
        sorted_probs = np.take_along_axis(probs, order, -1)
        keep = np.cumsum(sorted_probs, -1) - sorted_probs < self.top_p  # the smallest set reaching top_p
        sorted_probs = np.where(keep, sorted_probs, 0.0)
        sorted_probs /= sorted_probs.sum(-1, keepdims=True)
        picks = [self.rng.choice(len(p), p=p) for p in sorted_probs]
        return order[np.arange(len(order)), picks]


def generate_batch(
    model,
    prompts: list[list[int]],
    budget: int,
    pad_id: int,
    stop_ids: set[int],
    sample,
    on_step=None,
    width: int | None = None,
    rows: int | None = None,
) -> list:
    """New token ids and finish reason of each prompt; one forward pass of the whole batch per new token.

    The batch lives in one fixed ``(rows, width + budget)`` buffer (``width``: the longest prompt of the run,
    ``rows``: the batch size; a short last batch is filled with copies), prompts left-padded, new tokens written
    in place: every step of every batch has the same shapes, so the graph is compiled once; the few masked
    positions computed in vain cost far less than recompiling.
    """
    import mindspore as ms

    count = len(prompts)
    width = width or max(len(p) for p in prompts)
    prompts = prompts + [prompts[0]] * max(0, (rows or count) - count)
    total = width + budget
    tokens = np.full((len(prompts), total), pad_id, dtype=np.int32)
    pad = np.zeros((len(prompts), total), dtype=bool)
    for i, ids in enumerate(prompts):
        tokens[i, width - len(ids) : width] = ids
        pad[i, : width - len(ids)] = True
    mask = ms.Tensor(attention_mask(pad)[:, None])  # (batch, 1, T, T): positions not written yet are the future
    new: list[list[int]] = [[] for _ in prompts]
    reasons = ["length"] * len(prompts)
    running = np.ones(len(prompts), dtype=bool)
    for step in range(budget):
        position = width + step - 1  # the last written position: its logits give the next token
        hidden = model.model(ms.Tensor(tokens), attention_mask=mask)
        logits = model.lm_head(hidden[:, position, :]).asnumpy().astype(np.float32)
        picked = sample(logits)
        for index in np.flatnonzero(running).tolist():
            token = int(picked[index])
            if token in stop_ids:
                reasons[index] = "stop"
                running[index] = False
            else:
                new[index].append(token)
        if on_step is not None:
            on_step(step + 1, budget, int(running[:count].sum()), count)
        if not running[:count].any():
            break
        tokens[:, position + 1] = np.where(running, picked, pad_id)
    return list(zip(new[:count], reasons[:count], strict=True))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m distilled_plugins.in_mindformers.mf_generate", description=__doc__.split("\n")[0]
    )
    p.add_argument("--config", required=True, help="the fine-tune YAML (model architecture)")
    p.add_argument(
        "--checkpoint", required=True, help=f"safetensors file or checkpoint folder (stage 5), or '{UNTRAINED}'"
    )
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--problems", required=True, help="JSONL with a 'problem' column")
    p.add_argument("--output", required=True)
    p.add_argument("--key-column", default="unique_id")
    p.add_argument("--system-prompt", required=True)
    p.add_argument(
        "--prompt-template",
        default="{prompt}",
        help="user turn around the problem, as training saw it (stage 1's --prompt-template when its prompts were "
        "trained on)",
    )
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32768)
    p.add_argument("--temperature", type=float, default=TEMPERATURE, help="0: greedy")
    p.add_argument("--top-p", type=float, default=TOP_P)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="sequences decoded together")
    return p


def pending_problems(problems: list[dict], output: Path, key_column: str) -> list[dict]:
    """The problems without a line in ``output`` yet (a line cut short by a kill is dropped first)."""
    done_rows, bad = read_appended_jsonl(output)
    if bad:
        rewrite_jsonl(output, done_rows)
    done = {row_key(r[key_column]) for r in done_rows}
    return [row for row in problems if row_key(row[key_column]) not in done]


@dataclass
class Decoder:
    """The model and what every batch is decoded with: one shape for the whole run, so one graph compile."""

    model: Any
    tokenizer: Any
    sample: Sampler
    checkpoint: Path | str
    seq_length: int
    width: int  # the longest prompt
    rows: int  # sequences per batch
    budget: int  # new tokens per sequence
    pad_id: int
    stop_ids: set[int]

    def __call__(self, prompts: list[list[int]], on_step) -> list:
        """New token ids and finish reason of each prompt."""
        if not self.budget:
            return [([], "length")] * len(prompts)
        return generate_batch(
            self.model,
            prompts,
            self.budget,
            self.pad_id,
            self.stop_ids,
            self.sample,
            on_step,
            width=self.width,
            rows=self.rows,
        )


def load_decoder(args: argparse.Namespace, tokenizer, prompts: list[list[int]], sequences: int) -> Decoder:
    """The model of ``--config`` with ``--checkpoint``'s weights, sized for the longest prompt and its budget."""
    stop_ids = {tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS}
    max_positions = int(load_yaml(args.config)["model"]["model_config"]["max_position_embedding"])
    longest = max(len(ids) for ids in prompts)
    seq_length = min(max_positions, longest + args.max_new_tokens)  # no KV cache: every step costs the sequence
    checkpoint = UNTRAINED if args.checkpoint == UNTRAINED else newest_checkpoint(args.checkpoint)
    return Decoder(
        model=build_model(args.config, checkpoint, seq_length),
        tokenizer=tokenizer,
        sample=Sampler(args.temperature, args.top_p, args.seed),
        checkpoint=checkpoint,
        seq_length=seq_length,
        width=longest,
        rows=min(args.batch_size, sequences),
        budget=max(0, min(args.max_new_tokens, seq_length - longest)),
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop_ids),
        stop_ids=stop_ids,
    )


class DecodingProgress:
    """A progress line every few seconds: inside a batch (token by token) and as problems are done."""

    def __init__(self, total: int):
        self.total = total
        self.problems = Progress(logger, "problems", total, interval=5.0)
        self.started = self.last_line = self.batch_started = time.monotonic()
        self.new_tokens = self.problems_done = 0

    def on_step(self, step: int, budget: int, running: int, size: int) -> None:
        now = time.monotonic()
        if now - self.last_line >= 5.0:
            self.last_line = now
            logger.info(
                "problems %d/%d done; batch of %d at token %d/%d, %d sequences still running (%.1f batch tokens/s)",
                self.problems_done,
                self.total,
                size,
                step,
                budget,
                running,
                step * size / max(now - self.batch_started, 1e-9),
            )

    def tokens_per_second(self) -> float:
        return self.new_tokens / max(time.monotonic() - self.started, 1e-9)

    def batch_done(self, problems_done: int) -> None:
        self.problems_done = problems_done
        if problems_done < self.total:
            self.problems.maybe_log(problems_done, f"{self.tokens_per_second():.0f} new tokens/s")

    def finish(self) -> None:
        self.problems.finish(self.problems_done, f"{self.new_tokens} new tokens, {self.tokens_per_second():.1f}/s")


def completions_line(row: dict, samples: list[tuple[str, str]]) -> bytes:
    """A problem's line in stage 1's schema: its samples' texts and finish reasons."""
    texts, reasons = zip(*samples, strict=True)
    return dumps_line(
        {**row, GENERATIONS_COLUMN: list(texts), FINISH_REASONS_COLUMN: list(reasons), PROMPT_COLUMN: row["problem"]}
    )


def generate_completions(
    decoder: Decoder, todo: list[dict], prompts: list[list[int]], num_samples: int, batch_size: int, output: Path
) -> None:
    """Every sample of every problem is one sequence, decoded in batches; a problem's line is appended to
    ``output`` once all its samples are done."""
    sequences = [(i, j) for i in range(len(todo)) for j in range(num_samples)]
    results: dict[int, list] = {i: [None] * num_samples for i in range(len(todo))}
    progress = DecodingProgress(len(todo))
    fd = os.open(output, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        for first in range(0, len(sequences), batch_size):
            batch = sequences[first : first + batch_size]
            progress.batch_started = time.monotonic()
            outcomes = decoder([prompts[i] for i, _ in batch], progress.on_step)
            for (i, j), (ids, reason) in zip(batch, outcomes, strict=True):
                progress.new_tokens += len(ids)
                results[i][j] = (decoder.tokenizer.decode(ids, skip_special_tokens=True), reason)
            for i in sorted({i for i, _ in batch}):
                if all(r is not None for r in results[i]):
                    os.write(fd, completions_line(todo[i], results.pop(i)))
            progress.batch_done(len(todo) - len(results))
        progress.finish()
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.batch_size < 1:
        logger.error("--batch-size must be at least 1, got %d", args.batch_size)
        return 2

    import mindspore as ms

    from distilled_plugins.handle.encoder import load_tokenizer

    ms.set_seed(args.seed)
    tokenizer = load_tokenizer(args.tokenizer)
    vocab_size = int(load_yaml(args.config)["model"]["model_config"]["vocab_size"])
    if len(tokenizer) > vocab_size:  # its larger ids have no embedding row: a mindspore index error, or garbage
        logger.error(
            "%s has %d tokens, more than the model's vocabulary (%s: %d); give the tokenizer it was trained with",
            args.tokenizer,
            len(tokenizer),
            args.config,
            vocab_size,
        )
        return 2
    problems = [row for _, row in iter_jsonl(args.problems)]
    output = Path(args.output)
    todo = pending_problems(problems, output, args.key_column)
    if not todo:
        logger.info("all %d problems already have completions in %s", len(problems), output)
        return 0
    prompts = prompt_ids(
        tokenizer, args.system_prompt, [args.prompt_template.format(prompt=r["problem"]) for r in todo]
    )
    decoder = load_decoder(args, tokenizer, prompts, len(todo) * args.num_samples)
    logger.info(
        "generating %d x %d completions with %s (batches of %d, up to %d new tokens, seq_length %d)",
        len(todo),
        args.num_samples,
        decoder.checkpoint,
        args.batch_size,
        args.max_new_tokens,
        decoder.seq_length,
    )
    generate_completions(decoder, todo, prompts, args.num_samples, args.batch_size, output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
