"""The tutorial's three ways into the pipeline, as tasks: pick the entry point, check its input, find the seed.

``choose_source`` branches on the ``source`` parameter; the stages that do not apply are skipped (and shown so
in the grid). ``generate`` runs everything from a seed (the triggering seed event's, or the ``seed_dataset``
parameter for manual runs); ``openr1_dataset`` starts at ``handle`` from OpenR1-Math-220k's distilled parquet
(1.3.2, option 1); ``packed_dataset`` starts at ``finetune`` from an already packed dataset (option 2).
"""

from __future__ import annotations

import logging
from pathlib import Path

from airflow.sdk import get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from distilled_plugins import seed as seeds
from operators.assets import seed_from_event

logger = logging.getLogger(__name__)

SOURCES = {"generate": "seed", "openr1_dataset": "from_openr1", "packed_dataset": "from_packed"}


@task.branch
def choose_source(source: str) -> str:
    """The first task of the chosen entry point; the others' tasks are skipped."""
    if source not in SOURCES:
        raise AirflowFailException(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
    logger.info("entry point %s: starting at task %s", source, SOURCES[source])
    return SOURCES[source]


@task(multiple_outputs=True)
def seed(default: str) -> dict:
    """The seed this run generates from: the newest triggering seed event's path, else ``default``.

    A hub dataset is pinned to one commit here (the event's, or the one the hub reports now for a manual run), so
    every generate shard loads that same commit even if the dataset changes during the run.
    """
    chosen = seed_from_event(get_current_context(), default)
    if chosen["fingerprint"]:
        logger.info(
            "seed from the triggering event: %s (fingerprint %s, %s rows)",
            *map(chosen.get, ("seed", "fingerprint", "rows")),
        )
        return chosen
    if seeds.hub_seed(chosen["seed"]) is None:
        logger.info("seed from the run's parameters: %s", chosen["seed"])
        return chosen
    try:
        chosen = seeds.pin(chosen["seed"])
    except seeds.SeedNotFound as e:
        raise AirflowFailException(f"{e} (or set the seed_dataset parameter)") from None
    # seeds.HubUnavailable (no network, hub failing) is transient: raised as is, the task is retried
    logger.info("seed from the run's parameters, pinned to the hub's current commit: %s", chosen["seed"])
    return chosen


@task
def from_openr1(path: str) -> str:
    """Check the OpenR1-style dataset (parquet/jsonl file or folder with a ``messages`` column) exists."""
    if not Path(path).exists():
        raise AirflowFailException(
            f"openr1_dataset {path}: no such file or folder -- download OpenR1-Math-220k's parquet files "
            "(data/*.parquet) there or set the openr1_dataset parameter"
        )
    return path


@task
def from_packed(path: str) -> str:
    """Check the packed dataset is a stage 4 output (a ``save_to_disk`` folder with ``stats.json``)."""
    folder = Path(path)
    has_data = any(folder.glob("*.arrow")) or (folder / "dataset_info.json").exists()
    if not (folder / "stats.json").is_file() or not has_data:
        raise AirflowFailException(
            f"packed_dataset {path}: not a packed dataset folder (stats.json and the arrow files of "
            "`python -m distilled_plugins.pack`) -- pack it first or set the packed_dataset parameter"
        )
    return path
