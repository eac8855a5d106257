"""Preflight: every input a run of the pipeline will need, checked in seconds before anything is spent.

Usage:
    python -m distilled_plugins.preflight --source generate --seed-dataset seed.jsonl --output-root out/

A run that would fail on a missing file after hours of generation or training fails here instead, with one line per
problem, each naming the setting (its form title where the caller gives one) and what to do. Which inputs are
checked follows the entry point: the seed and its columns only when generating, the OpenR1-style or packed dataset
only for its own entry point; the tokenizer when a stage tokenizes (its ids must fit the fine-tune profile's
vocabulary); the fine-tune profile and the base checkpoint; the evaluation set or the evaluation endpoint's
connection; the output folder. Connections are checked through a callback (this module imports no Airflow):
:data:`CONNECTIONS` says when each one is needed, and a new one is one more line there and a field of
:class:`RunInputs`.

>>> inputs = RunInputs(source="packed_dataset", packed_dataset="/nonexistent/packed", output_root="/tmp",
...                    finetune_config="finetune_tiny_cpu.yaml", tokenizer_dir=str(configs.TINY_TOKENIZER),
...                    whole_numbers={"epochs": 2.5})
>>> for line in problems(inputs, titles={"packed_dataset": "Packed dataset"}):
...     print(line)
epochs: 2.5 is not a whole number; give a whole number
Packed dataset: /nonexistent/packed: no such folder; give a folder written by python -m distilled_plugins.pack
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from distilled_plugins import seed
from distilled_plugins.core import cli, configs
from distilled_plugins.core.artifacts import ARTIFACT_KINDS, artifact_kind
from distilled_plugins.core.errors import DataError
from distilled_plugins.core.io import hub_seed, iter_rows
from distilled_plugins.core.schema import MESSAGES_COLUMN, STATS_FILE, STATS_PAD_TOKEN_ID, STATS_SEQ_LENGTH
from distilled_plugins.core.settings import is_empty

logger = logging.getLogger(__name__)

ENTRY_POINTS = ("generate", "openr1_dataset", "packed_dataset")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
EVAL_COLUMNS = ("problem", "answer")


@dataclass
class RunInputs:
    """What a run reads; the field names are the DAG's parameter names (the line of a problem names them)."""

    source: str = "generate"
    seed_dataset: str | None = None
    prompt_column: str = "problem"
    uuid_column: str | None = None
    answer_column: str = "answer"
    openr1_dataset: str | None = None
    packed_dataset: str | None = None
    tokenizer_dir: str = str(configs.QWEN_TOKENIZER)  # the DAG's default
    finetune_config: str | None = None
    base_checkpoint: str | None = None
    eval_source: str = "checkpoint"
    eval_dataset: str = str(configs.MATH500)  # evaluate's default
    output_root: str | None = None
    teacher_conn_id: str | None = None
    eval_conn_id: str | None = None
    judge_conn_id: str | None = None  # empty: rejection sampling has no judge
    # settings the trigger form takes as numbers but that must be whole numbers (Airflow's form cannot refuse a
    # fraction): name -> value
    whole_numbers: dict = field(default_factory=dict)


# connection parameter -> when the run needs it. A new connection: a field above and a line here.
CONNECTIONS: dict[str, Callable[[RunInputs], bool]] = {
    "teacher_conn_id": lambda run: run.source == "generate",
    "eval_conn_id": lambda run: run.eval_source == "endpoint",
    # optional: checked when named, on the entry point that runs rejection sampling
    "judge_conn_id": lambda run: run.source == "generate" and not is_empty(run.judge_conn_id),
}


def _first_row(path: Path) -> dict | None:
    """The first row of a local dataset (a file, or the first data file of a folder), read without loading it all."""
    files = list(seed.data_files(path).values())  # a file is its own only data file
    return next(iter(iter_rows(files[0])), None) if files else None


def _dataset_problems(path: str, columns: list[str], what: str) -> list[str]:
    """Problems of a local dataset: missing, empty, unreadable or missing a column (``columns``: the ones needed)."""
    local = Path(path).expanduser()
    if not local.exists():
        return [f"{path}: no such file or folder; {what}"]
    try:
        row = _first_row(local)
    except (DataError, ValueError, OSError) as e:
        return [f"{path}: cannot be read ({cli.one_line(e)})"]
    if row is None:
        return [f"{path}: holds no rows (no jsonl/json/parquet/arrow data with rows)"]
    missing = [c for c in columns if c not in row]
    if missing:
        return [f"{path}: no column {', '.join(map(repr, missing))}; columns present: {', '.join(row)}"]
    return []


def _seed_problems(run: RunInputs) -> list[tuple[str, str]]:
    if is_empty(run.seed_dataset):
        return [("seed_dataset", "empty; give a local file or folder, or a hub dataset name (owner/name)")]
    if hub_seed(run.seed_dataset) is not None:
        try:
            seed.pin(run.seed_dataset)  # one API call: the dataset and its revision exist
        except seed.SeedNotFound as e:
            return [("seed_dataset", cli.one_line(e))]
        except seed.HubUnavailable as e:  # transient: the seed task asks again (and is retried)
            logger.warning("could not ask the hub about %s now (%s); the seed task will", run.seed_dataset, e)
        return []
    columns = [c for c in (run.prompt_column, run.uuid_column, run.answer_column) if not is_empty(c)]
    lines = _dataset_problems(run.seed_dataset, columns, "create it or give another seed")
    return [("seed_dataset", line) for line in lines]


def _packed_problems(run: RunInputs, seq_length: int | None) -> list[tuple[str, str]]:
    path = Path(str(run.packed_dataset or "")).expanduser()
    if is_empty(run.packed_dataset) or not path.is_dir():
        why = "empty" if is_empty(run.packed_dataset) else f"{run.packed_dataset}: no such folder"
        return [("packed_dataset", f"{why}; give a folder written by python -m distilled_plugins.pack")]
    kind = artifact_kind(path)
    if kind not in (None, "packed"):
        return [
            ("packed_dataset", f"{path}: holds a {kind} dataset ({ARTIFACT_KINDS.get(kind, kind)}), not a packed one")
        ]
    stats = path / STATS_FILE
    if not stats.is_file():
        return [
            ("packed_dataset", f"{path}: no {STATS_FILE}; not a folder written by python -m distilled_plugins.pack")
        ]
    recorded = json.loads(stats.read_text())
    rows = recorded.get(STATS_SEQ_LENGTH)
    if seq_length and rows != seq_length:
        return [
            (
                "packed_dataset",
                f"{path}: packed rows of {rows} tokens, but the fine-tune profile's seq_length is {seq_length}; "
                "pack again at that length or pick the profile it was packed for",
            )
        ]
    profile = run.finetune_config or configs.FINETUNE_7B.name
    try:
        model_config = configs.load_yaml(profile)["model"]["model_config"]
        mismatch = configs.packed_pad_mismatch(recorded.get(STATS_PAD_TOKEN_ID), profile, model_config)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # the profile's own check tells of it
        return []
    return [("packed_dataset", f"{path}: {mismatch}")] if mismatch else []


def _tokenizer_problems(name: str, folder: str | None) -> list[tuple[str, str]]:
    if is_empty(folder) or not Path(folder).is_dir():
        return [(name, f"{folder or '(empty)'}: no such folder; give the folder of the Qwen2.5 tokenizer")]
    if not (Path(folder) / "tokenizer.json").is_file():
        return [(name, f"{folder}: no tokenizer.json (a fast tokenizer with its chat template is needed)")]
    return []


def _vocabulary_problems(run: RunInputs) -> list[tuple[str, str]]:
    """The tokenizer's ids must fit the profile's model: a larger id than its vocab_size has no embedding row."""
    profile = run.finetune_config or configs.FINETUNE_7B.name
    try:
        spec = json.loads((Path(run.tokenizer_dir) / "tokenizer.json").read_text(encoding="utf-8"))
        top = max([*spec["model"]["vocab"].values(), *(token["id"] for token in spec.get("added_tokens", ()))])
        vocab_size = int(configs.load_yaml(profile)["model"]["model_config"]["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # the profile's own check tells of it
        return []
    if top < vocab_size:
        return []
    own = f" ({configs.TINY_TOKENIZER})" if Path(profile).name == configs.FINETUNE_TINY.name else ""
    return [
        (
            "tokenizer_dir",
            f"{run.tokenizer_dir}: token ids up to {top}, but the fine-tune profile {Path(profile).name} has a "
            f"vocabulary of {vocab_size}; give the tokenizer its model was made for{own}",
        )
    ]


def _finetune_problems(run: RunInputs) -> tuple[list[tuple[str, str]], int | None]:
    """Problems of the fine-tune profile and the base checkpoint, and the profile's seq_length (None if unknown)."""
    try:
        profile = configs.load_yaml(run.finetune_config or configs.FINETUNE_7B.name)
        seq_length = configs.seq_length_of(run.finetune_config or configs.FINETUNE_7B.name)
    except (FileNotFoundError, ValueError) as e:
        return [("finetune_config", cli.one_line(e))], None
    checkpoint = None if is_empty(run.base_checkpoint) else run.base_checkpoint
    checkpoint = checkpoint or profile.get("load_checkpoint")
    if checkpoint and not Path(str(checkpoint)).exists():
        where = "" if run.base_checkpoint else " (the fine-tune profile's load_checkpoint)"
        return [
            (
                "base_checkpoint",
                f"{checkpoint}{where}: no such file or folder; give the folder of the base model weights",
            )
        ], seq_length
    return [], seq_length


def _output_problems(run: RunInputs) -> list[tuple[str, str]]:
    if is_empty(run.output_root):
        return [("output_root", "empty; give a folder the workers can write")]
    root = Path(run.output_root).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".preflight-"):
            pass
    except OSError as e:
        return [("output_root", f"{root}: cannot write there ({e.strerror or e}); give a folder the workers can write")]
    return []


def problems(
    run: RunInputs,
    connection_problem: Callable[[str], str | None] | None = None,
    titles: Mapping[str, str] | None = None,
) -> list[str]:
    """One line per problem with the run's inputs (none: the run can start). ``connection_problem(conn_id)`` says
    what is wrong with a connection, or None; ``titles`` name the settings as the trigger form shows them."""
    found: list[tuple[str, str]] = []
    for name, value in run.whole_numbers.items():
        if not is_empty(value) and float(value) != int(float(value)):
            found.append((name, f"{value:g} is not a whole number; give a whole number"))
    if run.source not in ENTRY_POINTS:
        found.append(("source", f"{run.source!r} is not an entry point; choose one of {', '.join(ENTRY_POINTS)}"))
        return _lines(found, titles)
    if run.source == "generate":
        found += _seed_problems(run)
    if run.source == "openr1_dataset":
        lines = _dataset_problems(
            str(run.openr1_dataset or ""), [MESSAGES_COLUMN], "download OpenR1-Math-220k's data/*.parquet there"
        )
        found += [("openr1_dataset", line) for line in lines]
    # handle tokenizes the data, evaluation the checkpoint's prompts and answers: both with the form's tokenizer
    if run.source in ("generate", "openr1_dataset") or run.eval_source != "endpoint":
        found += _tokenizer_problems("tokenizer_dir", run.tokenizer_dir) or _vocabulary_problems(run)
    finetune, seq_length = _finetune_problems(run)
    found += finetune
    if run.source == "packed_dataset":
        found += _packed_problems(run, seq_length)
    lines = _dataset_problems(run.eval_dataset, list(EVAL_COLUMNS), "give MATH-500's test.jsonl")
    found += [("eval_dataset", line) for line in lines]
    for name, needed in CONNECTIONS.items():
        conn_id = getattr(run, name)
        if not needed(run) or connection_problem is None:
            continue
        problem = "empty; name an Airflow connection" if is_empty(conn_id) else connection_problem(conn_id)
        if problem:
            found.append((name, problem))
    found += _output_problems(run)
    return _lines(found, titles)


def _lines(found: list[tuple[str, str]], titles: Mapping[str, str] | None) -> list[str]:
    titles = {"eval_dataset": "Evaluation set", **(titles or {})}
    return [f"{titles.get(name, name)}: {what}" for name, what in found]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m distilled_plugins.preflight", description=__doc__.split("\n")[0])
    for f in dataclasses.fields(RunInputs):
        if f.name != "whole_numbers" and not f.name.endswith("_conn_id"):
            p.add_argument("--" + f.name.replace("_", "-"), default=f.default)
    return p


def main(argv: list[str] | None = None) -> int:
    cli.start_logging()
    args = vars(build_parser().parse_args(argv))
    found = problems(RunInputs(**args))
    for line in found:
        print(f"error: {line}", file=sys.stderr)
    if not found:
        logger.info("every input of the run is there")
    return 1 if found else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(cli.run(main))
