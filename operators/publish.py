"""Glue of the example ``publish_model`` DAG: append each triggering model event to a registry file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from operators.dag_helpers.assets import MODEL

logger = logging.getLogger(__name__)


def record_model_events(context, registry: str | Path) -> list[dict]:
    """Append one JSON line per triggering ``distill_model`` event (its extra, source run and time)."""
    records = []
    for event in (context.get("triggering_asset_events") or {}).get(MODEL, []):
        if not (event.extra or {}).get("checkpoint_uri"):  # e.g. the plain event of a training node other than 0
            continue
        records.append(
            {
                **(event.extra or {}),
                "source_dag_id": event.source_dag_id,
                "source_run_id": event.source_run_id,
                "source_task_id": event.source_task_id,
                "timestamp": event.timestamp.isoformat(),
            }
        )
    registry = Path(registry)
    registry.parent.mkdir(parents=True, exist_ok=True)
    with open(registry, "a") as f:
        f.write("".join(json.dumps(r, default=str) + "\n" for r in records))
    for r in records:
        logger.info(
            "recorded model %s (%s steps, final loss %s)", r.get("checkpoint_uri"), r.get("steps"), r.get("final_loss")
        )
    return records
