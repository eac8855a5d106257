"""Learnability check: the project's own stages must teach a small model a synthetic task it cannot guess.

Usage:
    .venv/bin/python bench/learnability.py --out /tmp/learnability   # the check (the benchmark, the demo, the test)
    python -m distilled_plugins.devtools.learnability --out /tmp/l [--train 1440 --held-out 64 --epochs 6]

The task: "Ben has fifty cats and seven dogs. How many pets does Ben have?" (a tens word twenty..ninety, a units
word one..nine, the two digits different: 64 answers; names and objects vary, each one token long). The 14
answers of ``held_out_answer`` are never trained on: held-out problems ask sums the model has not seen, so it must
read the two number words. Each training completion is an R1-style trace, ``<think>\\nWe add fifty and seven.\\n</think>``
then ``\\boxed{57}``, served by the replay teacher. Then, in order and through the stages' own code: generate
(the replay teacher over HTTP) -> reject_sampling (math_verify) -> handle (chat template) -> pack -> finetune
(msrun, ``configs/finetune_learnability_cpu.yaml``, from scratch) -> evaluate from the checkpoint with
mindformers (batched greedy decoding, the same chat template as training), once with the untrained model
("before") and once with the trained one ("after"). The tokenizer is the task's own (``build_tokenizer``:
Qwen2.5's chat template and pre-tokenizer, a vocabulary of the task's ~100 words and special tokens, saved in
``--out``/task/tokenizer), given to handle, evaluation and the profile's ``vocab_size``: a model with Qwen2.5's
151,936-token vocabulary spent nearly all of each step on tokens the task never uses.

Writes ``--out``/report.json (before and after pass@1 in %, held-out count, steps, seconds, per-stage seconds,
first and final loss) and ``--out``/loss.png. Target on a 2-core CPU: after >= 90, before <= 5, <= 300 s.
A model that writes the trace without reading the problem answers 1 time in 64: an "after" far above that means
content flowed from the prompt to the answer through every stage; one near that with the trace's shape learnt
means a wiring fault (masks, positions, label shift, template, checkpoint, decoding).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import shutil
import sys
import time
from pathlib import Path

from distilled_plugins import evaluate, finetune, generate, handle, pack, reject_sampling
from distilled_plugins.core import configs, errors
from distilled_plugins.core.io import atomic_dir, iter_jsonl, rewrite_jsonl
from distilled_plugins.core.schema import STATS_FILE, STATS_ROWS_OUT
from distilled_plugins.devtools.local_airflow import free_port
from distilled_plugins.devtools.teacher_server import ReplayTeacher, ServerThread, load_answers, replay_answer
from distilled_plugins.evaluate.stage import run as evaluate_run
from distilled_plugins.finetune.metrics import FinetuneResult
from distilled_plugins.finetune.stage import run as finetune_run
from distilled_plugins.generate.stage import run as generate_run
from distilled_plugins.handle.config import SYSTEM_PROMPT
from distilled_plugins.handle.stage import run as handle_run
from distilled_plugins.pack.stage import run as pack_run
from distilled_plugins.reject_sampling.stage import run as reject_sampling_run

logger = logging.getLogger("distilled_plugins.devtools.learnability")

PROFILE = configs.CONFIG_DIR / "finetune_learnability_cpu.yaml"
# the task's tokenizer is built from this one: its chat template, normaliser, pre-tokenizer and decoder are kept,
# only the vocabulary is the task's (see build_tokenizer)
QWEN_TOKENIZER = configs.QWEN_TOKENIZER
# Qwen2.5's pad/end-of-text token, then the two the chat template writes; ids 0, 1, 2 (the profile's pad, bos, eos
# ids are 0); then the unknown word (never in the task's text: build_tokenizer checks it), then the task's words
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
UNKNOWN_TOKEN = "<|unk|>"
# one size for the benchmark, the demo and the slow test: 1,440 training problems in 360 packed rows, 6 epochs
# (2,160 steps, ~25 ms each: the lookups the task needs mostly form at ~400-1,000 steps, in some runs past 1,100,
# while the learning rate falls linearly to 0 at the last step; README), 64 held-out problems
SIZE = {"n_train": 1440, "n_held_out": 64, "epochs": 6}
TARGET_AFTER = 90.0  # held-out pass@1 (%) after fine-tuning: the benchmark's target
# the slow test's bar: 52 of 64 right, where guessing (1 in 64 a problem) gets ~1 and a wiring fault ~0
TEST_MIN_AFTER = 80.0
MAX_NEW_TOKENS = 32  # a trace is 18 tokens, then the end of turn
# the check's parts, in order, as its progress lines name and count them
STAGES = {
    "tokenizer": "build the task's tokenizer",
    "generate": "generate traces from the replay teacher over HTTP",
    "reject_sampling": "keep the correct ones (math_verify)",
    "handle": "chat template, prompt masked",
    "pack": "pack into the profile's rows",
    "evaluate_before": "evaluate the untrained model (mindformers, batched greedy decoding)",
    "finetune": "fine-tune from scratch with msrun (a progress line a second)",
    "evaluate_after": "evaluate the trained checkpoint (mindformers)",
}
SAMPLES_PER_ROW = 4  # every training sample is 61 tokens: 4 fill a 256-token packed row
# measured on an idle 2-core machine: seconds a training step takes, and the rest of the check (README)
STEP_SECONDS, OTHER_SECONDS = 0.03, 35.0


def training_steps(n_train: int, epochs: int) -> int:
    return -(-n_train // SAMPLES_PER_ROW) * epochs


def estimate_seconds(n_train: int, epochs: int) -> float:
    """How long the check takes on an idle 2-core machine (held-out problems are decoded in one batch of 64).

    >>> round(estimate_seconds(SIZE["n_train"], SIZE["epochs"]))
    100
    """
    return OTHER_SECONDS + STEP_SECONDS * training_steps(n_train, epochs)


TENS = ("twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")  # 2..9
UNITS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")  # 1..9
# Every name (at the start and after a space) and object word (after a space) is one Qwen2.5 token, so every
# problem has the same token count and each number word sits at the same distance from the answer: the model then
# needs lookups by relative position, which formed at ~400-800 steps across seeds. With words of varying token
# counts it needs lookups by content, which formed anywhere from ~400 to past 1,200 steps across seeds (README).
NAMES = ("Ada", "Ben", "Dan", "Jon", "Tom", "Sam", "Max", "Amy", "Bob", "Ann", "Jim", "Tim")
STORIES = (
    ("coins", "stamps", "items"),
    ("cats", "dogs", "pets"),
    ("books", "pens", "things"),
    ("cars", "bikes", "toys"),
)
TASK = "add a number of tens and a number of units written in words (64 answers, 14 held out); R1-style traces"
ANSWERS = tuple((t, u) for t in range(2, 10) for u in range(1, 10) if t != u)  # 64: chance is 1 in 64


def held_out_answer(tens: int, units: int) -> bool:
    """14 of the 64 answers are never trained on; every tens and units word still is, in other answers."""
    return (tens + units) % 4 == 0


def problem(tens: int, units: int, name: str = "Ada", story: tuple[str, str, str] = STORIES[0]) -> dict:
    """One problem of the task, with its gold answer and the R1-style trace the teacher replays.

    The trace copies the tens word (twenty..ninety) and the units word (one..nine) from the problem, then writes
    the answer's first digit from the one and its second from the other: four lookups, each always the same
    number of tokens back (see NAMES).
    """
    big, small, total = story
    tens_word, units_word = TENS[tens - 2], UNITS[units - 1]
    answer = f"{tens}{units}"
    return {
        "problem": f"{name} has {tens_word} {big} and {units_word} {small}. How many {total} does {name} have?",
        "answer": answer,
        "solution": f"<think>\nWe add {tens_word} and {units_word}.\n</think>\n\\boxed{{{answer}}}",
        "unique_id": f"add/{answer}/{name}/{total}",
        "level": "synthetic",
        "subject": "adding tens and units",
    }


TRACE_FORMAT = re.compile(r"<think>\nWe add [a-z]+ and [a-z]+\.\n</think>\n\\boxed\{\d{2}\}")


def _completions_file(evaluated: Path) -> Path:
    """The completions an evaluation graded (its stats name them: they live in a sub-folder per checkpoint)."""
    return Path(json.loads((evaluated / STATS_FILE).read_text())["completions"])


def format_rate(completions: Path) -> float:
    """Share (%) of completions shaped exactly like a training trace, whatever their numbers."""
    texts = [text for _, row in iter_jsonl(completions) for text in row["generations"]]
    return round(100.0 * sum(bool(TRACE_FORMAT.fullmatch(t.strip())) for t in texts) / max(len(texts), 1), 2)


def make_task(n_train: int, n_held_out: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Training problems and held-out problems whose answers no training problem has."""
    stories = [(name, story) for name in NAMES for story in STORIES]
    train = [(a, s) for a in ANSWERS if not held_out_answer(*a) for s in stories]
    held = [(a, s) for a in ANSWERS if held_out_answer(*a) for s in stories]
    if n_train > len(train) or n_held_out > len(held):
        raise ValueError(
            f"at most {len(train)} training and {len(held)} held-out problems, got {n_train} and {n_held_out}"
        )
    rng = random.Random(seed)
    pick = rng.sample(train, n_train), rng.sample(held, n_held_out)
    return tuple([problem(*answer, *story) for answer, story in rows] for rows in pick)


def task_texts(tokenizer) -> list[str]:
    """Every text the stages tokenize for this task, rendered with ``tokenizer``'s chat template: each problem's
    training conversation as handle renders it, and its prompt as evaluation renders it."""
    rows = [problem(*answer, name, story) for answer in ANSWERS for name in NAMES for story in STORIES]
    system = {"role": "system", "content": SYSTEM_PROMPT}
    prompts = [[system, {"role": "user", "content": row["problem"]}] for row in rows]
    trained = [
        [*prompt, {"role": "assistant", "content": row["solution"]}] for prompt, row in zip(prompts, rows, strict=True)
    ]
    return tokenizer.apply_chat_template(trained, tokenize=False) + tokenizer.apply_chat_template(
        prompts, tokenize=False, add_generation_prompt=True
    )


def build_tokenizer(folder: Path) -> Path:
    """The task's tokenizer, saved in ``folder`` as a transformers tokenizer folder (what handle, mf_generate and
    mindformers' handler load, as they load Qwen2.5's).

    It is Qwen2.5's tokenizer with its vocabulary replaced: the same chat template, NFC normaliser, pre-tokenizer
    (Qwen's split pattern, then byte-level) and decoder, and as model a word-level vocabulary (``tokenizers``'
    ``WordLevel``) of the special tokens and every pre-token of the task's texts, ~100 tokens instead of 151,936.
    Each of those pre-tokens is one Qwen2.5 token too, except ``<think`` and ``\\boxed`` (two each), so every
    problem still has one token length. The profile's ``vocab_size`` and pad id must be this tokenizer's (checked
    here): the 2-layer model then spends its steps on the task, not on an embedding and output layer of 151,936
    rows it never uses.
    """
    qwen = json.loads((QWEN_TOKENIZER / "tokenizer.json").read_text(encoding="utf-8"))
    qwen_config = json.loads((QWEN_TOKENIZER / "tokenizer_config.json").read_text(encoding="utf-8"))
    # the chat template needs no vocabulary: render the task's texts with the special tokens alone
    bare = _word_level(qwen, qwen_config, [*SPECIAL_TOKENS, UNKNOWN_TOKEN])
    texts, pipeline = task_texts(bare), bare.backend_tokenizer
    specials = re.compile("|".join(map(re.escape, SPECIAL_TOKENS)))
    words = {
        word
        for text in texts
        for piece in specials.split(text)
        for word, _ in pipeline.pre_tokenizer.pre_tokenize_str(pipeline.normalizer.normalize_str(piece))
    }
    tokenizer = _word_level(qwen, qwen_config, [*SPECIAL_TOKENS, UNKNOWN_TOKEN, *sorted(words)])
    configs.check_built_tokenizer(PROFILE, tokenizer, "task tokenizer")
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    decoded = tokenizer.backend_tokenizer.decode_batch([e.ids for e in encodings], skip_special_tokens=False)
    for text, encoding, back in zip(texts, encodings, decoded, strict=True):  # every word known, and lossless
        if tokenizer.unk_token_id in encoding.ids or back != text:
            raise ValueError(f"the task's tokenizer does not encode this text losslessly: {text!r}")
    with atomic_dir(folder) as tmp:
        tokenizer.save_pretrained(str(tmp))
    return folder


def _word_level(qwen: dict, qwen_config: dict, tokens: list[str]):
    """Qwen2.5's tokenizer (``qwen``: its tokenizer.json; ``qwen_config``: its tokenizer_config.json) with a
    word-level vocabulary of ``tokens``, in that order."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(tokens)}
    spec = {
        **qwen,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": UNKNOWN_TOKEN},
        "added_tokens": [{**t, "id": vocab[t["content"]]} for t in qwen["added_tokens"] if t["content"] in vocab],
    }
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        chat_template=qwen_config["chat_template"],
        pad_token=qwen_config["pad_token"],
        eos_token=qwen_config["eos_token"],
        unk_token=UNKNOWN_TOKEN,
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        clean_up_tokenization_spaces=False,
        model_max_length=qwen_config["model_max_length"],
    )


def _evaluate(
    out: Path, held_out: Path, tokenizer: Path, checkpoint: str, label: str, baseline: Path | None = None
) -> dict:
    report = evaluate_run(
        evaluate.EvalConfig(
            out=str(out),
            dataset=str(held_out),
            checkpoint=checkpoint,
            mindformers_config=str(PROFILE),
            tokenizer=str(tokenizer),
            protocol=evaluate.Protocol(temperature=0.0, n_samples=1, max_new_tokens=MAX_NEW_TOKENS),
            baseline=str(baseline) if baseline else None,
            report_label=label,
            workers=1,
        )
    )
    return json.loads(report.read_text())


def _finetune(packed: Path, output_dir: Path, epochs: int) -> FinetuneResult:
    """Stage 5; once more (resuming from the newest checkpoint) if the job dies, as the DAG's retry would.

    On a heavily loaded machine msrun's scheduler can declare a starved worker timed out.
    """
    for attempt in (1, 2):
        cfg = finetune.FinetuneConfig(
            config=str(PROFILE),
            dataset_path=str(packed),
            output_dir=str(output_dir),
            master_port=free_port(),
            overrides={"runner_config.epochs": epochs},
            poll_interval=1.0,
        )
        try:
            return finetune_run(cfg)
        except errors.FinetuneFailed as e:
            if attempt == 2:
                raise
            logger.warning("fine-tuning failed (%s); retrying once, resuming", str(e).splitlines()[0])
    raise AssertionError("unreachable")


def data_stages(out: Path, train: Path, tokenizer: Path, timed=lambda stage, fn, *args: fn(*args)) -> tuple[Path, int]:
    """generate (the replay teacher over HTTP) -> reject_sampling -> handle (with the task's ``tokenizer``) ->
    pack; the packed folder and the number of training completions kept."""
    teacher = ReplayTeacher(replay_answer(load_answers(train, "problem", "solution")), prompt_template="{prompt}")
    with ServerThread(teacher.app()) as server:
        generated = timed(
            "generate",
            generate_run,
            generate.GenerateConfig(
                dataset_name=str(train),
                output_file=str(out / "generate" / "generations.jsonl"),
                model="replay-teacher",
                prompt_column="problem",
                api_addr=server.url,
                num_generations=1,
                max_tokens=MAX_NEW_TOKENS,
                max_concurrent=32,
                prompt_template="{prompt}",  # the user turn is the problem itself, as at evaluation
            ),
        )
    filtered = timed(
        "reject_sampling",
        reject_sampling_run,
        reject_sampling.RejectSamplingConfig(
            src=str(generated.output_file), dst=str(out / "reject_sampling" / "filtered.jsonl"), workers=1
        ),
    )
    handled = timed(
        "handle",
        handle_run,
        handle.HandleConfig(src=[str(filtered.output)], tokenizer=str(tokenizer), dst=str(out / "handle")),
    )
    packed = timed(
        "pack", pack_run, pack.PackConfig(src=str(handled), dst=str(out / "pack"), finetune_config=str(PROFILE))
    )
    return packed, filtered.stats[STATS_ROWS_OUT]


def run_check(out: Path, n_train: int, n_held_out: int, epochs: int, seed: int = 0) -> dict:
    """Run the whole check in ``out``; returns the report (also written to ``out/report.json``)."""
    started = time.monotonic()
    seconds: dict[str, float] = {}
    logger.info(
        "learnability check: %d training problems, %d training steps (%d epochs), %d held-out problems; about %.0f s "
        "on an idle 2-core machine",
        n_train,
        training_steps(n_train, epochs),
        epochs,
        n_held_out,
        estimate_seconds(n_train, epochs),
    )

    def timed(stage: str, fn, *args):
        t = time.monotonic()
        part = f"learnability [{list(STAGES).index(stage) + 1}/{len(STAGES)}] {stage}"
        logger.info("%s: %s", part, STAGES[stage])
        result = fn(*args)
        seconds[stage] = round(time.monotonic() - t, 1)
        logger.info("%s done in %.1f s (%.0f s so far)", part, seconds[stage], time.monotonic() - started)
        return result

    if out.exists():
        shutil.rmtree(out)
    train_rows, held_rows = make_task(n_train, n_held_out, seed)
    train = rewrite_jsonl(out / "task" / "train.jsonl", train_rows)
    held_out = rewrite_jsonl(out / "task" / "held_out.jsonl", held_rows)
    tokenizer = timed("tokenizer", build_tokenizer, out / "task" / "tokenizer")
    packed, kept = data_stages(out, train, tokenizer, timed)
    before = timed("evaluate_before", _evaluate, out / "before", held_out, tokenizer, "untrained", "untrained model")
    trained = timed("finetune", _finetune, packed, out / "finetune", epochs)
    after = timed(
        "evaluate_after",
        _evaluate,
        out / "after",
        held_out,
        tokenizer,
        trained.checkpoint_dir,
        "trained model",
        out / "before" / "report.json",
    )
    metrics = json.loads(Path(trained.metrics_file).read_text())
    shutil.copy(trained.loss_curve, out / "loss.png")
    pack_stats = json.loads((Path(packed) / STATS_FILE).read_text())
    report = {
        "task": TASK,
        "before": before["pass@1"],
        "after": after["pass@1"],
        "held_out": after["problems"],
        "trace_format_before": format_rate(_completions_file(out / "before")),
        "trace_format_after": format_rate(_completions_file(out / "after")),
        "train_problems": n_train,
        "train_kept": kept,
        "packed_rows": pack_stats["packs"],
        "epochs": epochs,
        "steps": len(metrics["steps"]),  # over all epochs
        "first_loss": metrics["first_loss"],
        "final_loss": metrics["final_loss"],
        "seconds": round(time.monotonic() - started, 1),
        "stage_seconds": seconds,
        "decoding": f"greedy, 1 sample, up to {MAX_NEW_TOKENS} new tokens, batched",
        "profile": str(PROFILE.name),
        "loss_curve": str(out / "loss.png"),
        "reports": {"before": str(out / "before" / "report.json"), "after": str(out / "after" / "report.json")},
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m distilled_plugins.devtools.learnability", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", required=True, type=Path, help="work folder (emptied first); report.json goes here")
    p.add_argument("--train", type=int, default=SIZE["n_train"], help="training problems")
    p.add_argument("--held-out", type=int, default=SIZE["n_held_out"], help="held-out problems (at least 50)")
    p.add_argument("--epochs", type=int, default=SIZE["epochs"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = run_check(args.out.resolve(), args.train, args.held_out, args.epochs, args.seed)
    logger.info("%s; report %s", summary(report), args.out / "report.json")
    return 0


def summary(report: dict) -> str:
    """One plain line: what was learned."""
    return (
        f"learnability: adding tens and units written in words, pass@1 {report['before']:.1f}% untrained -> "
        f"{report['after']:.1f}% after fine-tuning through the pipeline's stages, on {report['held_out']} held-out "
        f"problems whose answers were never trained on ({report['steps']} steps, loss {report['first_loss']:.2f} -> "
        f"{report['final_loss']:.2f}, {report['seconds']:.0f} s; chance: 1 in {len(ANSWERS)}); trace shape "
        f"{report['trace_format_before']:.0f}% -> {report['trace_format_after']:.0f}%"
    )


if __name__ == "__main__":
    sys.exit(main())
