"""Bad input and misuse through every stage's command line: one clear line, exit 1, nothing destroyed.

Each case builds its inputs in a fresh folder, runs the real CLI as a subprocess, and checks the exit code, that
stderr ends in one ``error: ...`` line naming what is wrong (no traceback), and that every file that was there
before is still there, byte for byte.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distilled_plugins.handle.config import HandleConfig
from distilled_plugins.handle.stage import run as handle_run
from distilled_plugins.pack.config import PackConfig
from distilled_plugins.pack.stage import run as pack_run
from tests.support import TOKENIZER_DIR, conversation_rows, handled_and_packed_rows, run_cli, write_jsonl


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def handled_and_packed(tmp_path_factory) -> tuple[Path, Path]:
    """A small handled folder and its packed folder, made by the stages themselves (with their markers)."""
    return handled_and_packed_rows(tmp_path_factory.mktemp("stages"), TOKENIZER_DIR, 4)


def copy_tree(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@dataclass
class Case:
    """A misuse: ``setup(tmp, stages)`` makes the inputs and returns the CLI's module and arguments."""

    name: str
    setup: Callable[[Path, tuple[Path, Path]], tuple[str, list]]
    message: str  # a fragment the one-line error must contain


def _reject_sampling_rows() -> list[dict]:
    return [{"problem": "1+1?", "answer": "2", "generations": ["$\\boxed{2}$"], "finish_reasons": None}]


CASES = [
    Case(
        "handle refuses a --dst folder holding other files",
        lambda tmp, s: (
            "handle",
            [
                "--src",
                write_jsonl(tmp / "f.jsonl", conversation_rows(2)),
                "--tokenizer",
                TOKENIZER_DIR,
                "--dst",
                _folder_with(tmp / "dst", "important.txt"),
            ],
        ),
        "is not empty (important.txt) and was not made by handle",
    ),
    Case(
        "handle refuses a packed dataset as input",
        lambda tmp, s: (
            "handle",
            ["--src", copy_tree(s[1], tmp / "packed"), "--tokenizer", TOKENIZER_DIR, "--dst", tmp / "out"],
        ),
        "holds a packed dataset",
    ),
    Case(
        "handle refuses an output folder under a file",
        lambda tmp, s: (
            "handle",
            [
                "--src",
                write_jsonl(tmp / "f.jsonl", conversation_rows(2)),
                "--tokenizer",
                TOKENIZER_DIR,
                "--dst",
                _file(tmp / "notes.txt") / "handled",
            ],
        ),
        "notes.txt",
    ),
    Case(
        "generate refuses to resume into a file it did not write",
        lambda tmp, s: (
            "generate",
            [
                "--model",
                "m",
                "--dataset-name",
                _seed(tmp / "seed.jsonl"),
                "--dst",
                _file(tmp / "notes.txt"),
                "--api-addr",
                "127.0.0.1:9",
                "--max-attempts",
                "1",
            ],
        ),
        "notes.txt:1: not a line written by generate",
    ),
    Case(
        "generate names a seed row without the prompt column",
        lambda tmp, s: (
            "generate",
            [
                "--model",
                "m",
                "--dataset-name",
                _seed(tmp / "seed.jsonl"),
                "--dst",
                tmp / "out.jsonl",
                "--api-addr",
                "127.0.0.1:9",
                "--max-attempts",
                "1",
            ],
        ),
        "seed.jsonl: row 2 has no column 'problem'",
    ),
    Case(
        "merge refuses a shard that does not exist",
        lambda tmp, s: (
            "generate",
            ["--merge", write_jsonl(tmp / "shard-0.jsonl", []), tmp / "shard-1.jsonl", "--dst", tmp / "all.jsonl"],
        ),
        "shard-1.jsonl",
    ),
    Case(
        "finetune refuses a handled folder as packed data",
        lambda tmp, s: (
            "finetune",
            [
                "--config",
                "finetune_tiny_cpu.yaml",
                "--dataset-path",
                copy_tree(s[0], tmp / "h"),
                "--output-dir",
                tmp / "job",
            ],
        ),
        "holds a handled dataset (made by handle (stage 3)); --dataset-path expects a packed dataset",
    ),
    Case(
        "generate refuses a folder as its output file",
        lambda tmp, s: (
            "generate",
            [
                "--model",
                "m",
                "--dataset-name",
                _seed(tmp / "seed.jsonl"),
                "--dst",
                _folder_with(tmp / "out", "x"),
                "--api-addr",
                "127.0.0.1:9",
                "--max-attempts",
                "1",
            ],
        ),
        "--dst is a folder; give the path of a JSONL file",
    ),
    Case(
        "pack refuses --src equal to --dst",
        lambda tmp, s: ("pack", ["--src", copy_tree(s[0], tmp / "h"), "--dst", tmp / "h", "--seq-length", 256]),
        "same folder",
    ),
    Case(
        "pack refuses an already packed --src",
        lambda tmp, s: ("pack", ["--src", copy_tree(s[1], tmp / "p"), "--dst", tmp / "p2", "--seq-length", 256]),
        "holds a packed dataset",
    ),
    Case(
        "pack refuses a --dst folder holding other files",
        lambda tmp, s: (
            "pack",
            ["--src", copy_tree(s[0], tmp / "h"), "--dst", _folder_with(tmp / "d", "keep.me"), "--seq-length", 256],
        ),
        "was not made by pack",
    ),
    Case(
        "pack names a stats.json that is not JSON",
        lambda tmp, s: (
            "pack",
            [
                "--src",
                _spoil(copy_tree(s[0], tmp / "h") / "stats.json", b"{not json").parent,
                "--dst",
                tmp / "p",
                "--seq-length",
                256,
            ],
        ),
        "stats.json: not a valid handle stats file",
    ),
    Case(
        "pack names a cut-short Arrow file",
        lambda tmp, s: ("pack", ["--src", _cut_arrow(copy_tree(s[0], tmp / "h")), "--dst", tmp / "p"]),
        "cannot be read as a handled dataset",
    ),
    Case(
        "reject_sampling names a parquet file given as JSONL",
        lambda tmp, s: ("reject_sampling", ["--src", _parquet(tmp / "gen.jsonl"), "--dst", tmp / "out.jsonl"]),
        "not a JSON Lines file (one JSON object per line): it looks like a parquet file",
    ),
    Case(
        "finetune names a config that is not YAML",
        lambda tmp, s: (
            "finetune",
            [
                "--config",
                _spoil(tmp / "bad.yaml", b"model: [unclosed\n"),
                "--dataset-path",
                s[1],
                "--output-dir",
                tmp / "job",
            ],
        ),
        "not valid YAML",
    ),
    Case(
        "finetune names a --set value of the wrong type",
        lambda tmp, s: (
            "finetune",
            [
                "--config",
                "finetune_tiny_cpu.yaml",
                "--dataset-path",
                s[1],
                "--output-dir",
                tmp / "job",
                "--set",
                "runner_config.epochs=abc",
            ],
        ),
        "--set runner_config.epochs='abc': the YAML holds a int there",
    ),
    Case(
        "evaluate checks --baseline before any work",
        lambda tmp, s: (
            "evaluate",
            ["--rescore", _completions(tmp / "c.jsonl"), "--out", tmp / "e", "--baseline", tmp / "none.json"],
        ),
        "none.json",
    ),
    Case(
        "evaluate refuses completions of the wrong type",
        lambda tmp, s: (
            "evaluate",
            [
                "--rescore",
                write_jsonl(tmp / "c.jsonl", [{"problem": "p", "answer": "1", "generations": 7}]),
                "--out",
                tmp / "e",
            ],
        ),
        "'generations' must be a string or a list of strings, got int",
    ),
]


def _folder_with(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True)
    (folder / name).write_text("the user's own file\n")
    return folder


def _file(path: Path) -> Path:
    path.write_text("notes\n")
    return path


def _seed(path: Path) -> Path:
    return write_jsonl(path, [{"problem": "1+1?", "answer": "2"}, {"question": "no problem column"}])


def _spoil(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def _cut_arrow(folder: Path) -> Path:
    arrow = next(folder.glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:200])
    return folder


def _parquet(path: Path) -> Path:
    pq.write_table(pa.Table.from_pylist(_reject_sampling_rows()), path)
    return path


def _completions(path: Path) -> Path:
    return write_jsonl(path, [{"problem": "1+1?", "answer": "2", "generations": ["$\\boxed{2}$"]}])


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_misuse_gives_one_line_and_destroys_nothing(case, tmp_path, handled_and_packed):
    module, args = case.setup(tmp_path, handled_and_packed)
    before = snapshot(tmp_path)
    done = run_cli(module, *args)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1, f"exit {done.returncode}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in lines if "error" in line.lower()]
    assert len(errors) == 1, f"expected one error line, got {errors}"
    assert case.message in errors[0], errors[0]
    after = snapshot(tmp_path)
    changed = {k for k in before if before[k] != after.get(k)}
    assert not changed, f"files changed or removed: {sorted(changed)}"


def test_debug_shows_the_traceback(tmp_path):
    src = _parquet(tmp_path / "gen.jsonl")
    done = run_cli("reject_sampling", "--src", src, "--dst", tmp_path / "out.jsonl", "--debug")
    assert done.returncode == 1 and "Traceback" in done.stderr and "DataError" in done.stderr


def test_null_finish_reasons_are_treated_as_absent(tmp_path):
    src = write_jsonl(tmp_path / "gen.jsonl", _reject_sampling_rows())
    done = run_cli(
        "reject_sampling", "--src", src, "--dst", tmp_path / "out.jsonl", "--eval-sets", "none", "--workers", 1
    )
    assert done.returncode == 0, done.stderr[-2000:]
    kept = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["generations"] for r in kept] == [["$\\boxed{2}$"]]


def test_null_message_content_is_counted_not_a_crash(tmp_path):
    good = conversation_rows(1)
    bad = [
        {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
    ]
    src = write_jsonl(tmp_path / "f.jsonl", good + bad)
    dst = handle_run(HandleConfig(src=[str(src)], tokenizer=str(TOKENIZER_DIR), dst=str(tmp_path / "h")))
    stats = json.loads((dst / "stats.json").read_text())
    assert stats["rows"] == stats["rows_out"] == 1 and stats["rows_in"] == 3
    assert stats["dropped"] == {"malformed_messages": 2, "no_assistant_turn": 0, "too_long": 0}


def test_temp_files_of_a_killed_run_are_removed(tmp_path, handled_and_packed):
    dst = tmp_path / "packed"
    stale_dir = tmp_path / ".packed.tmp-999999999"
    stale_dir.mkdir()
    (stale_dir / "data-00000-of-00001.arrow").write_bytes(b"x" * 1000)
    stale_arrow = tmp_path / ".packed.tmp-999999999.staging.arrow"
    stale_arrow.write_bytes(b"x" * 1000)
    pack_run(PackConfig(src=str(handled_and_packed[0]), dst=str(dst), seq_length=256))
    assert not stale_dir.exists() and not stale_arrow.exists()
    assert (dst / "artifact.json").exists()


def test_overwrite_replaces_a_foreign_folder(tmp_path, handled_and_packed):
    dst = _folder_with(tmp_path / "packed", "old.txt")
    done = run_cli("pack", "--src", handled_and_packed[0], "--dst", dst, "--seq-length", 256, "--overwrite")
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (dst / "old.txt").exists() and json.loads((dst / "artifact.json").read_text())["kind"] == "packed"


def test_rescore_counts_unusable_golds_and_states_the_denominator(tmp_path):
    rows = [
        {"problem": "a", "answer": "2", "generations": ["$\\boxed{2}$"]},
        {"problem": "b", "answer": "proof", "generations": ["$\\boxed{2}$"]},
        {"problem": "c", "answer": "", "generations": ["$\\boxed{2}$"]},
        {"problem": "d", "answer": None, "generations": ["$\\boxed{2}$"]},
        {"problem": "e", "answer": "3", "generations": []},
    ]
    src = write_jsonl(tmp_path / "c.jsonl", rows)
    done = run_cli("evaluate", "--rescore", src, "--out", tmp_path / "e", "--workers", 1)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert report["problems"] == 1 and report["pass@1"] == 100.0
    assert report["excluded"] == {"gold_filtered": 3, "no_completions": 1}
    stats = json.loads((tmp_path / "e" / "stats.json").read_text())
    assert stats["rows_in"] == 5 and stats["rows_out"] == 1
    assert stats["dropped"] == {"gold_filtered": 3, "no_completions": 1}
    assert "kept 1 of 5 problems; dropped 4: gold_filtered 3, no_completions 1" in done.stderr
    assert "Left out of pass@1: 3 (gold_filtered), 1 (no_completions)" in (tmp_path / "e" / "report.md").read_text()
