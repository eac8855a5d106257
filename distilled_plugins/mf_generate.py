"""Completions from a fine-tuned checkpoint with mindformers' own generation (the tutorial's way to evaluate).

Usage (normally started by ``python -m distilled_plugins.evaluate --checkpoint ...`` as its own process):
    python -m distilled_plugins.mf_generate --config configs/finetune_tiny_cpu.yaml \\
        --checkpoint finetune/checkpoint --tokenizer ../shared/data/tokenizer/qwen2.5 \\
        --problems problems.jsonl --output completions.jsonl --num-samples 4 --max-new-tokens 64

Writes stage 1's schema (``{**problem, "generations", "finish_reasons", "prompt"}``), one line per problem,
appended as each finishes, so a rerun continues where it stopped. Runs in its own process: mindspore's context
is global and must not live in an Airflow task.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from distilled_plugins.configs import load_yaml
from distilled_plugins.generate import row_key
from distilled_plugins.io import DataError, dumps_line, iter_jsonl, read_appended_jsonl, rewrite_jsonl

logger = logging.getLogger(__name__)

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


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


def build_model(config_path: str, checkpoint: Path, seq_length: int):
    import mindspore as ms
    from mindformers.core.context import build_context
    from mindformers.models.llama import LlamaConfig, LlamaForCausalLM
    from mindformers.tools.register import MindFormerConfig

    from distilled_plugins.configs import resolve

    config = MindFormerConfig(str(resolve(config_path)))
    config.use_parallel = False
    config.context.mode = 1  # PyNative: generation runs once per token, nothing to gain from compiling
    config.postprocess_use_numpy = True  # sampling in NumPy: mindspore's sort kernel is missing on CPU
    build_context(config)
    settings = {k: v for k, v in config.model.model_config.items() if k != "type"}
    settings.update(use_past=False, seq_length=seq_length, batch_size=1)
    model = LlamaForCausalLM(LlamaConfig(**settings))
    params = ms.load_checkpoint(str(checkpoint), format="safetensors")
    not_loaded, _ = ms.load_param_into_net(model, params)
    if not_loaded:
        raise DataError(f"{checkpoint} lacks weights for {len(not_loaded)} parameters, e.g. {not_loaded[:3]}")
    model.set_train(False)
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m distilled_plugins.mf_generate", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="the fine-tune YAML (model architecture)")
    p.add_argument("--checkpoint", required=True, help="safetensors file or checkpoint folder (stage 5)")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--problems", required=True, help="JSONL with a 'problem' column")
    p.add_argument("--output", required=True)
    p.add_argument("--key-column", default="unique_id")
    p.add_argument("--system-prompt", required=True)
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32768)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import mindspore as ms

    from distilled_plugins.handle import load_tokenizer

    ms.set_seed(args.seed)
    tokenizer = load_tokenizer(args.tokenizer)
    stop_ids = {tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS}
    problems = [row for _, row in iter_jsonl(args.problems)]
    output = Path(args.output)
    done_rows, bad = read_appended_jsonl(output)
    if bad:
        rewrite_jsonl(output, done_rows)
    done = {row_key(r, args.key_column) for r in done_rows}
    prompts = []
    for row in problems:
        if row_key(row, args.key_column) in done:
            continue
        messages = [{"role": "system", "content": args.system_prompt}, {"role": "user", "content": row["problem"]}]
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        prompts.append((row, ids))
    if not prompts:
        logger.info("all %d problems already have completions in %s", len(problems), output)
        return 0
    max_positions = int(load_yaml(args.config)["model"]["model_config"]["max_position_embedding"])
    longest = max(len(ids) for _, ids in prompts)
    seq_length = min(max_positions, longest + args.max_new_tokens)  # no KV cache: every step costs seq_length
    model = build_model(args.config, newest_checkpoint(args.checkpoint), seq_length)
    logger.info(
        "generating %d x %d completions with %s (seq_length %d)",
        len(prompts),
        args.num_samples,
        args.checkpoint,
        seq_length,
    )
    fd = os.open(output, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        for number, (row, ids) in enumerate(prompts, start=1):
            budget = max(0, min(args.max_new_tokens, seq_length - len(ids)))
            texts, reasons = [], []
            for _ in range(args.num_samples):
                if budget == 0:
                    texts.append("")
                    reasons.append("length")
                    continue
                out = model.generate(
                    [ids],
                    max_new_tokens=budget,
                    do_sample=args.temperature > 0,
                    temperature=args.temperature or 1.0,
                    top_p=args.top_p,
                    top_k=0,
                )
                new = [int(t) for t in out[0][len(ids) :]]
                stop_at = next((i for i, t in enumerate(new) if t in stop_ids), None)
                reasons.append("stop" if stop_at is not None else "length")
                texts.append(tokenizer.decode(new[:stop_at], skip_special_tokens=True))
            line = {**row, "generations": texts, "finish_reasons": reasons, "prompt": row["problem"]}
            os.write(fd, dumps_line(line))
            logger.info("problem %d/%d done", number, len(prompts))
    finally:
        os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
