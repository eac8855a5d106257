"""The tutorial's three ways into the pipeline, as tasks: check the run's inputs and pick the entry point, check its
input, find the seed.

``choose_source``, the run's first task, checks every input the chosen entry point will need
(:mod:`distilled_plugins.preflight`: the seed and its columns, the tokenizer, the fine-tune profile and base
checkpoint, the evaluation set, the connections, the output folder) and fails at once with one line per problem,
before anything is spent; then it branches on the ``source`` parameter, and the stages that do not apply are
skipped (and shown so in the grid). ``generate`` runs everything from a seed (the triggering seed event's, or the ``seed_dataset``
parameter for manual runs); ``openr1_dataset`` starts at ``handle`` from OpenR1-Math-220k's distilled parquet
(1.3.2, option 1); ``packed_dataset`` starts at ``finetune`` from an already packed dataset (option 2).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from airflow.providers.standard.operators.branch import BaseBranchOperator
from airflow.sdk import Context, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from distilled_plugins.core.io import write_json
from distilled_plugins.core.schema import PACKED_ENTRY, STATS_FILE
from operators.dag_helpers.assets import seed_from_event
from operators.dag_helpers.failures import fails_clearly
from operators.dag_helpers.params import WHOLE_NUMBERS
from operators.hooks import TeacherEndpointHook

logger = logging.getLogger(__name__)

SOURCES = {"generate": "seed", "openr1_dataset": "from_openr1", "packed_dataset": "from_packed"}


def connection_problem(conn_id: str) -> str | None:
    """What is wrong with an OpenAI-compatible endpoint's connection (missing, no host), or None."""
    try:
        TeacherEndpointHook(conn_id).get_fleet()
    except Exception as e:  # AirflowNotFoundException, ValueError: one line either way
        return f"connection {conn_id!r}: {str(e).strip().splitlines()[0]}"
    return None


class ChooseSourceOperator(BaseBranchOperator):
    """The run's first task: checks the inputs of the run's entry point, then continues with its first task.

    Every problem is one line of the log and of the error (named by the form's titles); the task fails at once,
    without retries. The seed checked is the one the run will read: the triggering event's, else the parameter.
    """

    ui_color = "#fff7e6"

    @fails_clearly
    def choose_branch(self, context: Context) -> str:
        from distilled_plugins import preflight  # here: the DAG file imports this module

        params = context["params"]
        run = preflight.RunInputs(
            **{f.name: params[f.name] for f in dataclasses.fields(preflight.RunInputs) if f.name in params},
            whole_numbers={name: params[name] for name in sorted(WHOLE_NUMBERS) if name in params},
        )
        if run.source == "generate":
            run.seed_dataset = seed_from_event(context, run.seed_dataset)["seed"]
        found = preflight.problems(run, connection_problem, _titles(context))
        for line in found:
            self.log.error("%s", line)
        if found:
            raise AirflowFailException(f"{len(found)} input(s) of this run are missing or wrong: " + " | ".join(found))
        self.log.info("every input of entry point %s is there: starting at task %s", run.source, SOURCES[run.source])
        return SOURCES[run.source]


def _titles(context: Context) -> dict[str, str]:
    """Each parameter's label in the trigger form, to name it as the user saw it."""
    titles = {}
    for name in context["params"]:
        try:
            titles[name] = context["dag"].params.get_param(name).schema.get("title") or name
        except (AttributeError, KeyError):
            titles[name] = name
    return titles


@task(multiple_outputs=True)
def seed(default: str) -> dict:
    """The seed this run generates from: the newest triggering seed event's path, else ``default``.

    A hub dataset is pinned to one commit here (the event's, or the one the hub reports now for a manual run), so
    every generate shard loads that same commit even if the dataset changes during the run.
    """
    from distilled_plugins import seed as seeds

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
def from_packed(path: str, run_dir: str) -> str:
    """Check the packed dataset is a stage 4 output (a ``save_to_disk`` folder with ``stats.json``), and record it
    in the run folder: the approval gate and the run report read its packing figures there."""
    folder = Path(path)
    has_data = any(folder.glob("*.arrow")) or (folder / "dataset_info.json").exists()
    if not (folder / STATS_FILE).is_file() or not has_data:
        raise AirflowFailException(
            f"packed_dataset {path}: not a packed dataset folder (stats.json and the arrow files of "
            "`python -m distilled_plugins.pack`) -- pack it first or set the packed_dataset parameter"
        )
    write_json(Path(run_dir) / PACKED_ENTRY, {"path": str(folder.resolve())})
    return path
