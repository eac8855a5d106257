"""The assets the distillation DAG reads and writes, shared by every DAG that chains onto it.

``SEED`` is watched by :class:`~operators.seed_watcher.SeedChangeTrigger`; the others are outlets of the
``distill_r1`` tasks, each event carrying in its ``extra`` the run's artifact path and a few figures (see
:func:`emit`). A team schedules its own DAG on one of them (``schedule=[MODEL]``), as ``dags/publish_model.py``
does, and reads the figures from ``triggering_asset_events``.
"""

from __future__ import annotations

from airflow.sdk import Asset, AssetWatcher

from distilled_plugins import seed
from distilled_plugins.configs import SHARED_DATA
from operators import deployment
from operators.seed_watcher import SeedChangeTrigger


def _seed() -> dict:
    """The seed asset and its settings, from the deployment's configuration (the Variable distill_deployment: its
    ``defaults.seed_dataset`` and ``seed_poll_seconds``), read when a DAG file imports them: by the dag-processor,
    whose parse fixes the watcher's kwargs, and by a worker's parse. Not at the import of this module, which the
    triggerer and the operators import too."""
    config = deployment.load()
    path = str(deployment.defaults(config).get("seed_dataset") or SHARED_DATA / "math_train" / "math12k_train.parquet")
    poll = deployment.seconds(config, "seed_poll_seconds")
    uri = seed.uri(path)  # file://<absolute path>, or hf://datasets/<owner>/<name> for a hub dataset
    asset = Asset(
        name="distill_seed",
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
    return {"SEED": asset, "SEED_PATH": path, "SEED_URI": uri, "SEED_POLL_SECONDS": poll}


def __getattr__(name: str):
    """``SEED``, ``SEED_PATH``, ``SEED_URI``, ``SEED_POLL_SECONDS``: computed at each import (never cached, so a
    process that parses DAG files again sees a changed Variable)."""
    if name in ("SEED", "SEED_PATH", "SEED_URI", "SEED_POLL_SECONDS"):
        return _seed()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
