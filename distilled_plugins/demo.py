"""The embedded demo: the pipeline's stages on ~32 MATH training problems, with no network.

Usage:
    make demo            # or: python -m distilled_plugins.demo --workdir .demo

A local teacher endpoint replays each problem's reference solution from the MATH training set in
``../shared/data`` as its completion (real text, correct answers), so every stage has real work to do.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from distilled_plugins import generate, handle, pack, reject_sampling
from distilled_plugins.teacher_server import ReplayTeacher, ServerThread, load_answers, replay_answer

logger = logging.getLogger("distilled_plugins.demo")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
MATH_TRAIN = SHARED_DATA / "math_train" / "math12k_train_with_solutions.jsonl"
TOKENIZER = SHARED_DATA / "tokenizer" / "qwen2.5"
DEMO_SEQ_LENGTH = 1024


def make_seed(path: Path, n: int) -> Path:
    """The first ``n`` MATH training problems with a reference solution and a gold answer."""
    rows = []
    with open(MATH_TRAIN) as f:
        for line in f:
            row = json.loads(line)
            if row.get("solution") and row.get("answer"):
                rows.append({"problem": row["problem"], "answer": row["answer"], "subject": row.get("subject")})
            if len(rows) == n:
                break
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_demo(workdir: Path, problems: int, shards: int) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    seed = make_seed(workdir / "seed.jsonl", problems)
    teacher = ReplayTeacher(replay_answer(load_answers(MATH_TRAIN, "problem", "solution")))
    artifacts: dict[str, str] = {"seed": str(seed)}
    with ServerThread(teacher.app()) as server:
        logger.info("demo teacher replaying MATH reference solutions at %s", server.url)
        shard_files = []
        for index in range(shards):
            result = generate.run(generate.GenerateConfig(
                dataset_name=str(seed), output_file=str(workdir / "generate" / f"shard-{index}.jsonl"),
                model="demo-teacher", api_addr=server.url, num_generations=2, max_concurrent=16,
                shard_index=index, num_shards=shards))
            shard_files.append(result.output_file)
        artifacts["generations"] = str(generate.merge(shard_files, workdir / "generate" / "merged.jsonl", "problem"))
    filtered = reject_sampling.run(reject_sampling.RejectSamplingConfig(
        src=artifacts["generations"], dst=str(workdir / "reject_sampling" / "filtered.jsonl")))
    artifacts["filtered"] = str(filtered.output)
    handled = handle.run(handle.HandleConfig(src=[str(filtered.output)], tokenizer=str(TOKENIZER),
                                             dst=str(workdir / "handle")))
    artifacts["handled"] = str(handled)
    artifacts["packed"] = str(pack.run(pack.PackConfig(src=str(handled), dst=str(workdir / "pack"),
                                                       seq_length=DEMO_SEQ_LENGTH)))
    return artifacts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m distilled_plugins.demo", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", type=Path, default=REPO / ".demo", help="where the demo writes (recreated)")
    p.add_argument("--problems", type=int, default=32)
    p.add_argument("--shards", type=int, default=2)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not MATH_TRAIN.exists():
        logger.error("%s not found: the demo needs the shared data folder beside the checkout", MATH_TRAIN)
        return 1
    shutil.rmtree(args.workdir, ignore_errors=True)
    artifacts = run_demo(args.workdir, args.problems, args.shards)
    print("\nDemo finished. Artifacts:")
    for name, path in artifacts.items():
        print(f"  {name:<12} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
