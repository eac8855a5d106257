"""Seed fingerprints (distilled_plugins.seed), the seed watcher's event trigger, the event-to-seed glue, and the
fallback CLI."""

from __future__ import annotations

import asyncio
import json
import os
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distilled_plugins import seed
from tests.support import REPO, run_cli, write_jsonl

ROWS = [{"problem": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(5)]


def touch(path, seconds_later: float = 5.0) -> None:
    """Move the mtime forward without changing a byte (what ``touch`` does)."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + int(seconds_later * 1e9)))


class TestCheck:
    def test_touch_alone_is_no_change(self, tmp_path):
        path = write_jsonl(tmp_path / "seed.jsonl", ROWS)
        first = seed.check(path).fingerprint
        touch(path)
        again = seed.check(path, first)
        assert again.stat_changed and not again.changed and again.changed_files == []
        assert again.fingerprint.digest == first.digest
        assert again.fingerprint.files["seed.jsonl"][1] != first.files["seed.jsonl"][1]  # the new mtime is kept

    def test_appended_rows_are_a_change(self, tmp_path):
        path = write_jsonl(tmp_path / "seed.jsonl", ROWS)
        first = seed.check(path).fingerprint
        write_jsonl(path, [*ROWS, {"problem": "What is 7 + 7?", "answer": "14"}])
        again = seed.check(path, first)
        assert again.changed and again.changed_files == ["seed.jsonl"]
        assert again.fingerprint.digest != first.digest
        assert seed.rows(path) == 6

    def test_same_size_rewrite_with_restored_mtime_is_missed_by_design_but_new_mtime_is_caught(self, tmp_path):
        path = write_jsonl(tmp_path / "seed.jsonl", ROWS)
        first = seed.check(path).fingerprint
        text = path.read_text().replace("What is 1 + 1?", "What is 1 + 2?")
        path.write_text(text)  # same size, new mtime: hashed again, found different
        assert seed.check(path, first).changed

    def test_unchanged_files_are_not_hashed_again(self, tmp_path, monkeypatch):
        path = write_jsonl(tmp_path / "seed.jsonl", ROWS)
        first = seed.check(path).fingerprint
        hashed = []
        monkeypatch.setattr(seed, "file_hash", lambda p: hashed.append(p) or "x")
        assert not seed.check(path, first).changed
        assert hashed == []

    def test_folder_files_added_removed_and_rewritten(self, tmp_path):
        folder = tmp_path / "seed"
        (folder / "data").mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(ROWS[:3]), folder / "data" / "part-0.parquet")
        write_jsonl(folder / "data" / "part-1.jsonl", ROWS[3:])
        (folder / "README.md").write_text("not data")
        (folder / ".cache").mkdir()
        write_jsonl(folder / ".cache" / "tmp.jsonl", ROWS)  # hidden: ignored
        first = seed.check(folder).fingerprint
        assert sorted(first.files) == ["data/part-0.parquet", "data/part-1.jsonl"]
        assert seed.rows(folder) == 5

        (folder / "README.md").write_text("edited, still not data")
        assert not seed.check(folder, first).changed

        write_jsonl(folder / "data" / "part-2.jsonl", ROWS[:1])
        added = seed.check(folder, first)
        assert added.changed and added.changed_files == ["data/part-2.jsonl"]

        (folder / "data" / "part-1.jsonl").unlink()
        removed = seed.check(folder, added.fingerprint)
        assert removed.changed and removed.changed_files == ["data/part-1.jsonl"]

    def test_stat_snapshot_moves_with_every_write(self, tmp_path):
        path = write_jsonl(tmp_path / "seed.jsonl", ROWS)
        first = seed.stat_snapshot(path)
        assert first == {"seed.jsonl": (path.stat().st_size, path.stat().st_mtime_ns)}
        assert seed.stat_snapshot(path) == first
        touch(path)
        assert seed.stat_snapshot(path) != first

    def test_fingerprint_round_trips_through_json(self, tmp_path):
        path = write_jsonl(tmp_path / "seed.jsonl", ROWS)
        fp = seed.check(path).fingerprint
        back = seed.Fingerprint.from_json(json.loads(json.dumps(fp.to_json())))
        assert back == fp and back.digest == fp.digest
        assert seed.Fingerprint.from_json(None) is None

    def test_missing_seed_and_hub_names_fail_clearly(self, tmp_path):
        with pytest.raises(seed.SeedNotFound, match="no such file or folder"):
            seed.check(tmp_path / "nope.jsonl")
        with pytest.raises(seed.SeedNotFound, match="hub dataset name"):
            seed.check("AI-MO/NuminaMath-TIR")

    def test_event_extra(self, tmp_path):
        path = write_jsonl(tmp_path / "seed.jsonl", ROWS)
        fp = seed.check(path).fingerprint
        extra = seed.event_extra(path, fp, ["seed.jsonl"])
        assert extra == {
            "uri": f"file://{path}",
            "path": str(path),
            "fingerprint": fp.digest,
            "rows": 5,
            "changed_files": ["seed.jsonl"],
        }


class TestCli:
    def run(self, *args):
        return run_cli("seed", *args, timeout=60)

    def test_changed_then_unchanged_then_changed(self, tmp_path):
        path = write_jsonl(tmp_path / "seed.jsonl", ROWS)
        state = tmp_path / "state.json"
        first = self.run(path, "--state", state)
        assert first.returncode == 0, first.stderr
        assert json.loads(first.stdout)["rows"] == 5
        touch(path)
        assert self.run(path, "--state", state).returncode == seed.UNCHANGED
        write_jsonl(path, ROWS + ROWS[:1])
        third = self.run(path, "--state", state)
        assert third.returncode == 0 and json.loads(third.stdout)["rows"] == 6

    def test_missing_seed_is_one_line(self, tmp_path):
        done = self.run(tmp_path / "missing.jsonl", "--state", tmp_path / "state.json")
        assert done.returncode == 2
        assert "Traceback" not in done.stderr and "no such file or folder" in done.stderr


class FakeStateStore:
    """The triggerer's asset state store, in memory (its real one writes to the metadata database)."""

    def __init__(self):
        self.values = {}

    async def aget(self, key, default=None):
        return self.values.get(key, default)

    async def aset(self, key, value):
        self.values[key] = value


class TestSeedChangeTrigger:
    def test_serialization(self):
        from operators.seed_watcher import SeedChangeTrigger

        trigger = SeedChangeTrigger(path="/data/seed.jsonl", poll_interval=2.5)
        assert trigger.serialize() == (
            "operators.seed_watcher.SeedChangeTrigger",
            {"path": "/data/seed.jsonl", "poll_interval": 2.5},
        )

    def test_fires_once_per_content_change_and_survives_a_restart(self, tmp_path):
        from operators.seed_watcher import STATE_KEY, SeedChangeTrigger

        path = write_jsonl(tmp_path / "seed.jsonl", ROWS)
        store = FakeStateStore()

        async def scenario():
            trigger = SeedChangeTrigger(path=str(path), poll_interval=0.01)
            trigger.asset_state_store = store
            events = trigger.run()
            pending = asyncio.ensure_future(events.__anext__())
            while STATE_KEY not in store.values:  # the baseline is recorded, nothing fired
                await asyncio.sleep(0.01)
            touch(path)
            digest = store.values[STATE_KEY]["digest"]
            while store.values[STATE_KEY]["files"]["seed.jsonl"][1] != os.stat(path).st_mtime_ns:
                await asyncio.sleep(0.01)  # the watcher has seen the touch
            assert not pending.done() and store.values[STATE_KEY]["digest"] == digest  # touch: no event
            write_jsonl(path, ROWS + ROWS[:2])
            first = await asyncio.wait_for(pending, 30)
            # the triggerer asks for the next event at once; the fingerprint is stored only after the event left
            # (a crash in between repeats the event rather than losing it)
            pending = asyncio.ensure_future(events.__anext__())
            while store.values[STATE_KEY]["digest"] != first.payload["fingerprint"]:
                await asyncio.sleep(0.01)
            pending.cancel()

            restarted = SeedChangeTrigger(path=str(path), poll_interval=0.01)  # a triggerer restart
            restarted.asset_state_store = store
            again = restarted.run()
            pending = asyncio.ensure_future(again.__anext__())
            await asyncio.sleep(0.2)
            assert not pending.done()  # the change it already announced does not fire again
            write_jsonl(path, ROWS)
            second = await asyncio.wait_for(pending, 30)
            await again.aclose()
            return digest, first, second

        baseline, first, second = asyncio.run(scenario())
        assert first.payload["rows"] == 7 and first.payload["path"] == str(path)
        assert first.payload["changed_files"] == ["seed.jsonl"]
        assert second.payload["rows"] == 5 and second.payload["fingerprint"] != first.payload["fingerprint"]
        assert second.payload["fingerprint"] == baseline  # the fingerprint is of the content: back to the original


def event(extra, minutes=0):
    return SimpleNamespace(extra=extra, timestamp=datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=minutes))


class TestSeedFromEvent:
    def test_newest_watcher_event_wins(self):
        from operators.assets import SEED, seed_from_event

        context = {
            "triggering_asset_events": {
                SEED: [
                    event({"from_trigger": True, "payload": {"path": "/new.jsonl", "fingerprint": "b", "rows": 9}}, 1),
                    event({"from_trigger": True, "payload": {"path": "/old.jsonl", "fingerprint": "a", "rows": 8}}),
                ]
            }
        }
        assert seed_from_event(context, "/default.jsonl") == {
            "seed": "/new.jsonl",
            "fingerprint": "b",
            "rows": 9,
            "uri": None,
        }

    def test_manual_runs_and_bare_events_use_the_parameter(self):
        from operators.assets import SEED, seed_from_event

        assert seed_from_event({"triggering_asset_events": {}}, "/p.jsonl")["seed"] == "/p.jsonl"
        assert seed_from_event({"triggering_asset_events": {SEED: [event({})]}}, "/p.jsonl")["seed"] == "/p.jsonl"
        producer = {"triggering_asset_events": {SEED: [event({"path": "/from-producer.jsonl"})]}}
        assert seed_from_event(producer, "/p.jsonl")["seed"] == "/from-producer.jsonl"


class TestWatchSeedDag:
    """The scheduled fallback, in ``dag.test()``: its fingerprint lives in the seed asset's state store."""

    def test_baseline_touch_change(self, airflow_db, tmp_path):
        import importlib.util

        spec = importlib.util.spec_from_file_location("watch_seed_dag", REPO / "dags" / "watch_seed.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        path = write_jsonl(tmp_path / "seed.jsonl", ROWS)

        def check():
            run = module.dag.test(run_conf={"seed_path": str(path)})
            ti = run.get_task_instance("check_seed")
            return ti.state, ti.xcom_pull(task_ids="check_seed")

        assert check() == ("skipped", None)  # the baseline
        touch(path)
        assert check() == ("skipped", None)
        write_jsonl(path, [*ROWS, *ROWS[:1]])
        state, extra = check()
        assert state == "success" and extra["rows"] == 6 and extra["path"] == str(path)
        assert check() == ("skipped", None)
        assert [e for e in self.seed_events() if e.get("path") == str(path)] == [extra]  # one event, one change

    @staticmethod
    def seed_events() -> list[dict]:
        from airflow.models.asset import AssetEvent, AssetModel
        from airflow.utils.session import create_session
        from sqlalchemy import select

        with create_session() as session:
            query = (
                select(AssetEvent.extra)
                .join(AssetModel, AssetModel.id == AssetEvent.asset_id)
                .where(AssetModel.name == "distill_seed")
            )
            return list(session.scalars(query))
