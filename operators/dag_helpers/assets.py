"""The assets the distillation DAG reads and writes, shared by every DAG that chains onto it.

The seed asset (:func:`seed_asset`) is watched by :class:`~operators.triggers.seed_change.SeedChangeTrigger`; the others are outlets of the
``distill_r1`` tasks, each event carrying in its ``extra`` the run's artifact path and a few figures (see
:func:`emit`). A team schedules its own DAG on one of them (``schedule=[MODEL]``), as ``dags/publish_model.py``
does, and reads the figures from ``triggering_asset_events``.
"""

from __future__ import annotations

from typing import NamedTuple

from airflow.sdk import Asset, AssetWatcher

from distilled_plugins import seed
from distilled_plugins.core.configs import SHARED_DATA
from operators.dag_helpers import deployment
from operators.triggers.seed_change import SeedChangeTrigger


class SeedAsset(NamedTuple):
    asset: Asset  # with its watcher
    path: str  # a local file or folder, or a hub dataset name
    uri: str  # file://<absolute path>, or hf://datasets/<owner>/<name>
    poll_seconds: float


def seed_asset(config: dict) -> SeedAsset:
    """The seed asset and its settings from the deployment's configuration (:func:`operators.dag_helpers.deployment.load`: its
    ``defaults.seed_dataset`` and ``seed_poll_seconds``). A DAG file calls it with the configuration it read once
    for its whole parse; not at the import of this module, which the triggerer and the operators import too."""
    path = str(deployment.defaults(config).get("seed_dataset") or SHARED_DATA / "math_train" / "math12k_train.parquet")
    poll = deployment.seconds(config, "seed_poll_seconds")
    uri = seed.uri(path)
    asset = Asset(
        name=SEED_NAME,
        uri=uri,
        extra={
            "description": "Seed problems of distill_r1: an update to this asset starts a distillation run (a "
            "watcher notices changes of the seed's content by itself)",
            "uri": uri,
            "announce_refresh": "Nothing to do: a watcher notices content changes. To announce one yourself: Create "
            "Event > Manual on this page, or POST /api/v2/assets/events with this asset_id",
        },
        watchers=[
            AssetWatcher(
                name="distill_seed_watcher",
                trigger=SeedChangeTrigger(path=seed.canonical(path), poll_interval=poll),
            )
        ],
    )
    return SeedAsset(asset, path, uri, poll)


SEED_NAME = "distill_seed"  # its URI is the seed's: see seed_asset
FILTERED = Asset(name="distill_filtered_dataset")  # extra: path, kept, rejected, generations_correct
PACKED = Asset(name="distill_packed_dataset")  # extra: path, rows, seq_length, efficiency
MODEL = Asset(name="distill_model")  # extra: checkpoint_uri, steps, final_loss, metrics
EVAL_REPORT = Asset(name="distill_eval_report")  # extra: report, pass@1, ci95, n, n_samples


def emit(context, task, extra: dict) -> None:
    """Attach ``extra`` to the events of every asset among ``task``'s outlets (none: nothing to do)."""
    for outlet in getattr(task, "outlets", None) or []:
        if isinstance(outlet, Asset):
            context["outlet_events"][outlet].extra.update(extra)


def seed_from_event(context, default: str) -> dict:
    """The seed a run should read: the newest triggering seed event's path, or ``default`` (manual runs)."""
    events = [
        event
        for asset_events in (context.get("triggering_asset_events") or {}).values()
        for event in asset_events
        if isinstance(event.extra, dict)
    ]
    for event in sorted(events, key=lambda e: e.timestamp, reverse=True):
        payload = event.extra.get("payload") if event.extra.get("from_trigger") else event.extra
        if isinstance(payload, dict) and payload.get("path"):
            return {"seed": payload["path"], **{k: payload.get(k) for k in ("fingerprint", "rows", "uri")}}
    return {"seed": default, "fingerprint": None, "rows": None, "uri": None}
