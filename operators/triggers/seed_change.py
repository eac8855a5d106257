"""SeedChangeTrigger: the event trigger behind the seed asset's ``AssetWatcher``.

It runs in the triggerer for as long as a DAG schedules on the watched asset, polls the seed with
:mod:`distilled_plugins.seed` (stat every file, hash only what moved) and fires one event per real content
change. Its last fingerprint is kept in the asset's state store (in the metadata database), so a triggerer
restart neither fires again for an old change nor misses one made while it was down. A hub dataset seed is polled
by its commit sha (one API call per poll); a hub that cannot be reached is asked again later, with a log line and
no event.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from airflow.triggers.base import BaseEventTrigger, TriggerEvent

if TYPE_CHECKING:
    from distilled_plugins.seed import Fingerprint

STATE_KEY = "seed_fingerprint"


class SeedChangeTrigger(BaseEventTrigger):
    """Fire ``{"uri", "path", "fingerprint", "rows", "changed_files"}`` each time the seed's content changes.

    The first look at a seed with no stored fingerprint records a baseline and fires nothing: the seed that
    exists when the DAG is deployed is run on purpose (from the UI), refreshes after that run on their own.
    """

    def __init__(self, *, path: str, poll_interval: float = 5.0):
        super().__init__()
        self.path = path
        self.poll_interval = poll_interval
        self._memory: dict | None = None  # the fingerprint when no state store is available

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return "operators.triggers.seed_change.SeedChangeTrigger", {
            "path": self.path,
            "poll_interval": self.poll_interval,
        }

    async def _load(self) -> Fingerprint | None:
        from distilled_plugins import seed  # here and in run: the DAG file imports this module

        if self.asset_state_store is not None:
            try:
                return seed.Fingerprint.from_json(await self.asset_state_store.aget(STATE_KEY))
            except Exception as e:  # a state store that cannot be read: keep the fingerprint in memory
                self.log.warning(
                    "seed watcher %s: asset state store unreadable (%s); keeping state in memory", self.path, e
                )
                self.asset_state_store = None
        return seed.Fingerprint.from_json(self._memory)

    async def _save(self, fingerprint: Fingerprint) -> None:
        self._memory = fingerprint.to_json()
        if self.asset_state_store is not None:
            try:
                await self.asset_state_store.aset(STATE_KEY, self._memory)
            except Exception as e:
                self.log.warning(
                    "seed watcher %s: could not store the fingerprint (%s); keeping it in memory", self.path, e
                )
                self.asset_state_store = None

    async def run(self):
        from distilled_plugins import seed

        previous = await self._load()
        hub = seed.hub_seed(self.path) is not None  # a commit is atomic: nothing to wait for to settle
        missing_reported = False
        hub_failures = 0
        last_snapshot = None
        while True:
            try:
                if not hub:
                    # a file still being written is looked at again next poll: only a settled seed is fingerprinted
                    snapshot = await asyncio.to_thread(seed.stat_snapshot, self.path)
                    if snapshot != last_snapshot:
                        last_snapshot = snapshot
                        await asyncio.sleep(self.poll_interval)
                        continue
                result = await asyncio.to_thread(seed.check, self.path, previous)
            except seed.HubUnavailable as e:  # transient: ask again later, backing off up to 16 polls
                hub_failures += 1
                delay = self.poll_interval * min(2 ** (hub_failures - 1), 16)
                self.log.warning("seed watcher: %s (failure %d, next try in %g s)", e, hub_failures, delay)
                await asyncio.sleep(delay)
                continue
            except OSError as e:  # no seed (yet), a file removed while being looked at, an unknown hub dataset
                if not missing_reported:
                    self.log.warning("seed watcher: %s", e)
                    missing_reported = True
                await asyncio.sleep(self.poll_interval)
                continue
            if hub_failures:
                self.log.info("seed watcher %s: the hub answers again after %d failed tries", self.path, hub_failures)
            missing_reported = False
            hub_failures = 0
            if previous is None:
                self.log.info("seed watcher %s: baseline %s recorded", self.path, result.fingerprint.digest)
                await self._save(result.fingerprint)
            elif result.changed:
                extra = await asyncio.to_thread(seed.event_extra, self.path, result.fingerprint, result.changed_files)
                self.log.info(
                    "seed watcher %s: content changed (%s), fingerprint %s, %s rows: firing",
                    self.path,
                    ", ".join(result.changed_files),
                    extra["fingerprint"],
                    extra["rows"],
                )
                yield TriggerEvent(extra)
                await self._save(result.fingerprint)  # after the event: a crash in between repeats it, never loses it
            elif result.stat_changed:
                self.log.info("seed watcher %s: size/mtime moved, content unchanged: no event", self.path)
                await self._save(result.fingerprint)
            previous = result.fingerprint
            await asyncio.sleep(self.poll_interval)
