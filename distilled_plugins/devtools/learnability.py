"""Learnability check: the project's own stages must teach a small model a synthetic task it cannot guess.

Usage:
    .venv/bin/python bench/learnability.py --out /tmp/learnability      # the full check (the benchmark)
    python -m distilled_plugins.devtools.learnability --out /tmp/l --train 1080 --held-out 32 --epochs 5  # the test's

The task: "Ben has fifty cats and seven dogs. How many pets does Ben have?" (a tens word twenty..ninety, a units
word one..nine, the two digits different: 64 answers; names and objects vary, each one token long). The 14
answers of ``held_out_answer`` are never trained on: held-out problems ask sums the model has not seen, so it must
read the two number words. Each training completion is an R1-style trace, ``<think>\\nWe add fifty and seven.\\n</think>``
then ``\\boxed{57}``, served by the replay teacher. Then, in order and through the stages' own code: generate
(the replay teacher over HTTP) -> reject_sampling (math_verify) -> handle (chat template) -> pack -> finetune
(msrun, ``configs/finetune_learnability_cpu.yaml``, from scratch) -> evaluate from the checkpoint with
mindformers (batched greedy decoding, the same chat template as training), once with the untrained model
("before") and once with the trained one ("after").

Writes ``--out``/report.json (before and after pass@1 in %, held-out count, steps, seconds, per-stage seconds,
first and final loss) and ``--out``/loss.png. Target on a 2-core CPU: after >= 90, before <= 5, < 20 minutes.
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

from distilled_plugins import configs, evaluate, finetune, generate, handle, pack, reject_sampling
from distilled_plugins.devtools.local_airflow import free_port
from distilled_plugins.devtools.teacher_server import ReplayTeacher, ServerThread, load_answers, replay_answer
from distilled_plugins.io import iter_jsonl, rewrite_jsonl
from distilled_plugins.schema import STATS_ROWS_OUT

logger = logging.getLogger("distilled_plugins.devtools.learnability")

PROFILE = configs.CONFIG_DIR / "finetune_learnability_cpu.yaml"
TOKENIZER = configs.SHARED_DATA / "tokenizer" / "qwen2.5"
# the demo's size (270 rows x 4 epochs: 1,080 steps); the benchmark's is 1440 / 64 / 4 (1,440 steps)
DEMO_SIZE = {"n_train": 1080, "n_held_out": 32, "epochs": 4}
# the slow test's: one epoch more (1,350 steps), for the runs whose last lookup forms late (README)
TEST_SIZE = {**DEMO_SIZE, "epochs": 5}
TARGET_AFTER = 90.0  # the benchmark's target: held-out pass@1 (%) after fine-tuning
# the slow test's bar: 8 of 32 right; guessing (1 in 64 a problem) gets there with probability 3e-8
TEST_MIN_AFTER = 25.0
MAX_NEW_TOKENS = 32  # a trace is 18 tokens, then the end of turn


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


def _evaluate(out: Path, held_out: Path, checkpoint: str, label: str, baseline: Path | None = None) -> dict:
    report = evaluate.run(
        evaluate.EvalConfig(
            out=str(out),
            dataset=str(held_out),
            checkpoint=checkpoint,
            mindformers_config=str(PROFILE),
            tokenizer=str(TOKENIZER),
            protocol=evaluate.Protocol(temperature=0.0, n_samples=1, max_new_tokens=MAX_NEW_TOKENS),
            baseline=str(baseline) if baseline else None,
            report_label=label,
            workers=1,
        )
    )
    return json.loads(report.read_text())


def _finetune(packed: Path, output_dir: Path, epochs: int) -> finetune.FinetuneResult:
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
            return finetune.run(cfg)
        except finetune.FinetuneFailed as e:
            if attempt == 2:
                raise
            logger.warning("fine-tuning failed (%s); retrying once, resuming", str(e).splitlines()[0])
    raise AssertionError("unreachable")


def data_stages(out: Path, train: Path, timed=lambda stage, fn, *args: fn(*args)) -> tuple[Path, int]:
    """generate (the replay teacher over HTTP) -> reject_sampling -> handle -> pack; the packed folder and the
    number of training completions kept."""
    teacher = ReplayTeacher(replay_answer(load_answers(train, "problem", "solution")), prompt_template="{prompt}")
    with ServerThread(teacher.app()) as server:
        generated = timed(
            "generate",
            generate.run,
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
        reject_sampling.run,
        reject_sampling.RejectSamplingConfig(
            src=str(generated.output_file), dst=str(out / "reject_sampling" / "filtered.jsonl"), workers=1
        ),
    )
    handled = timed(
        "handle",
        handle.run,
        handle.HandleConfig(src=[str(filtered.output)], tokenizer=str(TOKENIZER), dst=str(out / "handle")),
    )
    packed = timed(
        "pack", pack.run, pack.PackConfig(src=str(handled), dst=str(out / "pack"), finetune_config=str(PROFILE))
    )
    return packed, filtered.stats[STATS_ROWS_OUT]


def run_check(out: Path, n_train: int, n_held_out: int, epochs: int, seed: int = 0) -> dict:
    """Run the whole check in ``out``; returns the report (also written to ``out/report.json``)."""
    started = time.monotonic()
    seconds: dict[str, float] = {}

    def timed(stage: str, fn, *args):
        t = time.monotonic()
        result = fn(*args)
        seconds[stage] = round(time.monotonic() - t, 1)
        logger.info("%s done in %.1f s", stage, seconds[stage])
        return result

    if out.exists():
        shutil.rmtree(out)
    train_rows, held_rows = make_task(n_train, n_held_out, seed)
    train = rewrite_jsonl(out / "task" / "train.jsonl", train_rows)
    held_out = rewrite_jsonl(out / "task" / "held_out.jsonl", held_rows)
    packed, kept = data_stages(out, train, timed)
    before = timed("evaluate_before", _evaluate, out / "before", held_out, "untrained", "untrained model")
    trained = timed("finetune", _finetune, packed, out / "finetune", epochs)
    after = timed(
        "evaluate_after",
        _evaluate,
        out / "after",
        held_out,
        trained.checkpoint_dir,
        "trained model",
        out / "before" / "report.json",
    )
    metrics = json.loads(Path(trained.metrics_file).read_text())
    shutil.copy(trained.loss_curve, out / "loss.png")
    pack_stats = json.loads((Path(packed) / "stats.json").read_text())
    report = {
        "task": TASK,
        "before": before["pass@1"],
        "after": after["pass@1"],
        "held_out": after["problems"],
        "trace_format_before": format_rate(out / "before" / "completions.jsonl"),
        "trace_format_after": format_rate(out / "after" / "completions.jsonl"),
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
    p.add_argument("--train", type=int, default=1440, help="training problems")
    p.add_argument("--held-out", type=int, default=64, help="held-out problems (at least 50 for the full check)")
    p.add_argument("--epochs", type=int, default=4)
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
