"""The scheduled fallback of the seed watcher: one check per run of the ``watch_seed`` DAG.

For deployments where the triggerer cannot run :class:`~operators.triggers.seed_change.SeedChangeTrigger` (no
triggerer, or a seed the triggerer cannot see). It shares the watcher's fingerprint logic and its state-store
key, so both can be on without announcing one change twice (the first to see it records it).
"""

from __future__ import annotations

import logging

from airflow.sdk import get_current_context
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from operators.dag_helpers.assets import SEED_NAME
from operators.triggers.seed_change import STATE_KEY

logger = logging.getLogger(__name__)


def check_seed(path: str) -> dict:
    """Announce the seed asset (the task succeeds) when ``path``'s content changed; skip otherwise."""
    from distilled_plugins import seed  # here: the DAG file imports this module

    context = get_current_context()
    # the task's outlet: the seed asset as the DAG file built it (one read of the deployment's configuration)
    seed_outlet = next(outlet for outlet in context["task"].outlets if getattr(outlet, "name", None) == SEED_NAME)
    store = context["asset_state_store"][seed_outlet]
    previous = seed.Fingerprint.from_json(store.get(STATE_KEY))
    try:
        result = seed.check(path, previous)
    except seed.SeedNotFound as e:
        raise AirflowFailException(str(e)) from None
    except seed.HubUnavailable as e:  # transient: the next scheduled check asks again
        logger.warning("%s", e)
        raise AirflowSkipException(f"seed {path}: the hub could not be asked; the next check tries again") from None
    store.set(STATE_KEY, result.fingerprint.to_json())
    if previous is None:
        raise AirflowSkipException(f"seed {path}: baseline {result.fingerprint.digest} recorded, nothing to announce")
    if not result.changed:
        raise AirflowSkipException(f"seed {path}: unchanged ({result.fingerprint.digest})")
    extra = seed.event_extra(path, result.fingerprint, result.changed_files)
    context["outlet_events"][seed_outlet].extra.update(extra)
    logger.info("seed %s changed (%s): announcing %s rows", path, ", ".join(result.changed_files), extra["rows"])
    return extra
