"""Test set-up: a private Airflow home with its own SQLite database, and shared data paths.

Airflow reads its configuration when first imported, so the environment is set here, before any test module
imports it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

from distilled_plugins.configs import SHARED_DATA
from distilled_plugins.devtools.local_airflow import free_port

REPO = Path(__file__).resolve().parents[1]
MATH500 = SHARED_DATA / "math500" / "test.jsonl"
MATH_TRAIN_SOLUTIONS = SHARED_DATA / "math_train" / "math12k_train_with_solutions.jsonl"
TOKENIZER_DIR = SHARED_DATA / "tokenizer" / "qwen2.5"

_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="distilled-airflow-"))
os.environ["AIRFLOW_HOME"] = str(_AIRFLOW_HOME)
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_AIRFLOW_HOME}/airflow.db"
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
# mindformers writes its logs under ./output unless told otherwise
os.environ["LOG_MF_PATH"] = str(_AIRFLOW_HOME / "mindformers-log")
os.environ["LOCAL_DEFAULT_PATH"] = str(_AIRFLOW_HOME / "mindformers-output")
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")
# dag.test() runs only DAGs found in a bundle: the project's dags/ and the tests' own small DAGs
os.environ["AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST"] = json.dumps(
    [
        {
            "name": "dags-folder",
            "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
            "kwargs": {"path": str(REPO / "dags"), "refresh_interval": 0},
        },
        {
            "name": "test-dags",
            "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
            "kwargs": {"path": str(REPO / "tests" / "dags"), "refresh_interval": 0},
        },
    ]
)


@pytest.fixture(scope="session")
def airflow_db():
    """A migrated Airflow metadata database, created once per test session."""
    from airflow.utils import db

    db.initdb()
    return _AIRFLOW_HOME


def read_jsonl(path) -> list[dict]:
    import json

    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def write_jsonl(path, rows) -> Path:
    import json

    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def math_train_rows(n: int, start: int = 0) -> list[dict]:
    """The first ``n`` MATH training problems that have a reference solution."""
    import json

    rows = []
    with open(MATH_TRAIN_SOLUTIONS) as f:
        for i, line in enumerate(f):
            if i < start:
                continue
            row = json.loads(line)
            if row.get("solution"):
                rows.append(row)
            if len(rows) == n:
                break
    return rows


def conversation_rows(n: int, start: int = 0) -> list[dict]:
    """MATH training problems with their reference solutions as user/assistant conversations."""
    return [
        {"messages": [{"role": "user", "content": r["problem"]}, {"role": "assistant", "content": r["solution"]}]}
        for r in math_train_rows(n, start)
    ]


# rows of the tiny packed data: one training step each with one worker, half as many per worker with two
TINY_ROWS = 10


@pytest.fixture(scope="session")
def tiny_packed(tmp_path_factory):
    """Packed rows at the tiny CPU profile's seq_length (256): a few training steps' worth."""
    from distilled_plugins import handle, pack

    tmp = tmp_path_factory.mktemp("tiny-packed")
    src = write_jsonl(tmp / "filtered.jsonl", conversation_rows(6, start=2))
    handled = handle.run(handle.HandleConfig(src=[str(src)], tokenizer=str(TOKENIZER_DIR), dst=str(tmp / "handled")))
    packed = pack.run(pack.PackConfig(src=str(handled), dst=str(tmp / "packed"), seq_length=256))
    rows = json.loads((packed / "stats.json").read_text())["packs"]
    assert rows == TINY_ROWS, f"the tiny packed data has {rows} rows; the fine-tune tests count on {TINY_ROWS}"
    return packed


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_packed, tmp_path_factory):
    """A tiny model fine-tuned for 8 steps by stage 5 (msrun, 1 CPU worker): its checkpoint folder."""
    from distilled_plugins import configs, finetune

    out = tmp_path_factory.mktemp("tiny-finetune")
    result = finetune.run(
        finetune.FinetuneConfig(
            config=str(configs.CONFIG_DIR / "finetune_tiny_cpu.yaml"),
            dataset_path=str(tiny_packed),
            output_dir=str(out),
            master_port=free_port(),
            poll_interval=0.5,
        )
    )
    return Path(result.checkpoint_dir)
