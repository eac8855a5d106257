"""Seed fingerprints (distilled_plugins.seed), the seed watcher's event trigger, the event-to-seed glue, and the
fallback CLI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distilled_plugins import seed
from tests.support import REPO, cli_env, run_cli, write_jsonl

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

    def test_missing_seed_fails_clearly(self, tmp_path):
        with pytest.raises(seed.SeedNotFound, match="no such file or folder"):
            seed.check(tmp_path / "nope.jsonl")

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
        from operators.triggers.seed_change import SeedChangeTrigger

        trigger = SeedChangeTrigger(path="/data/seed.jsonl", poll_interval=2.5)
        assert trigger.serialize() == (
            "operators.triggers.seed_change.SeedChangeTrigger",
            {"path": "/data/seed.jsonl", "poll_interval": 2.5},
        )

    def test_fires_once_per_content_change_and_survives_a_restart(self, tmp_path):
        from operators.triggers.seed_change import STATE_KEY, SeedChangeTrigger

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
        from operators.dag_helpers.assets import SEED_NAME, seed_from_event

        context = {
            "triggering_asset_events": {
                SEED_NAME: [
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
        from operators.dag_helpers.assets import SEED_NAME, seed_from_event

        assert seed_from_event({"triggering_asset_events": {}}, "/p.jsonl")["seed"] == "/p.jsonl"
        assert seed_from_event({"triggering_asset_events": {SEED_NAME: [event({})]}}, "/p.jsonl")["seed"] == "/p.jsonl"
        producer = {"triggering_asset_events": {SEED_NAME: [event({"path": "/from-producer.jsonl"})]}}
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

    def test_hub_seed(self, airflow_db, hub):
        """The fallback on a hub dataset: a new commit is announced once; a failing hub skips, it does not fail."""
        module = self.load_dag()
        sha = hub.publish(REPO_ID, {"train.jsonl": jsonl(ROWS)})

        def check():
            run = module.dag.test(run_conf={"seed_path": REPO_ID})
            ti = run.get_task_instance("check_seed")
            return ti.state, ti.xcom_pull(task_ids="check_seed")

        check()  # the baseline, or a change from another test's seed in the same state store
        assert check() == ("skipped", None)
        hub.failing = 500
        assert check() == ("skipped", None)
        hub.failing = None
        sha = hub.publish(REPO_ID, {"train.jsonl": jsonl(ROWS[:2])})
        state, extra = check()
        assert state == "success" and extra["path"] == f"{REPO_ID}@{sha}" and extra["rows"] == 2
        assert check() == ("skipped", None)
        assert [e for e in self.seed_events() if e.get("fingerprint") == sha] == [extra]

    @staticmethod
    def load_dag():
        import importlib.util

        spec = importlib.util.spec_from_file_location("watch_seed_dag", REPO / "dags" / "watch_seed.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

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


REPO_ID = "standin/math-seed"


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The hub stand-in on 127.0.0.1, with ``HF_ENDPOINT`` pointing at it (read at call time by seed.py)."""
    from distilled_plugins.devtools.hub_standin import HubStandin
    from distilled_plugins.devtools.teacher_server import ServerThread

    standin = HubStandin()
    with ServerThread(standin.app()) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        standin.url = server.url
        yield standin


class TestHubSeed:
    """A hub dataset seed, fingerprinted by its commit sha, against the local hub stand-in (never the real hub)."""

    def test_names(self, tmp_path, monkeypatch):
        monkeypatch.chdir(tmp_path)
        (tmp_path / "local").mkdir()
        assert seed.hub_seed("AI-MO/NuminaMath-TIR") == seed.HubSeed("AI-MO/NuminaMath-TIR")
        assert seed.hub_seed("hf://datasets/AI-MO/NuminaMath-TIR@v2") == seed.HubSeed("AI-MO/NuminaMath-TIR", "v2")
        assert seed.hub_seed("org/name@0123abc").pinned("fff") == "org/name@fff"
        for local in ("/data/seed.jsonl", "./a/b", "local/missing.jsonl", "local/sub", "x/y.parquet", "seed.jsonl"):
            assert seed.hub_seed(local) is None, local
        assert seed.uri("org/name") == "hf://datasets/org/name" == seed.canonical("org/name")
        assert seed.uri("local/sub") == f"file://{tmp_path / 'local' / 'sub'}"

    def test_fingerprint_is_the_commit_sha_and_changes_only_with_it(self, hub):
        first_sha = hub.publish(REPO_ID, {"train.jsonl": jsonl(ROWS), "README.md": "# seed\n"})
        first = seed.check(REPO_ID)
        assert first.changed and first.fingerprint.digest == first_sha and first.fingerprint.rows == 5
        for _ in range(3):  # asked again, same commit: no change
            again = seed.check(REPO_ID, first.fingerprint)
            assert not again.changed and not again.stat_changed and again.fingerprint == first.fingerprint
        back = seed.Fingerprint.from_json(json.loads(json.dumps(first.fingerprint.to_json())))
        assert back == first.fingerprint and back.digest == first_sha

        second_sha = hub.publish(REPO_ID, {"train.jsonl": jsonl(ROWS + ROWS[:2]), "README.md": "# seed\n"})
        second = seed.check(f"hf://datasets/{REPO_ID}", back)
        assert second.changed and second.fingerprint.digest == second_sha != first_sha
        assert second.changed_files == [f"revision {first_sha} -> {second_sha}"]
        assert seed.event_extra(REPO_ID, second.fingerprint, second.changed_files) == {
            "uri": f"hf://datasets/{REPO_ID}@{second_sha}",
            "path": f"{REPO_ID}@{second_sha}",
            "fingerprint": second_sha,
            "revision": second_sha,
            "rows": 7,
            "changed_files": second.changed_files,
        }
        # a manual run pins the commit the hub reports now
        assert seed.pin(REPO_ID) == {
            "seed": f"{REPO_ID}@{second_sha}",
            "fingerprint": second_sha,
            "rows": 7,
            "uri": f"hf://datasets/{REPO_ID}@{second_sha}",
        }
        # a branch or an older commit can be watched by name
        assert seed.check(f"{REPO_ID}@{first_sha}").fingerprint.digest == first_sha

    def test_rows_are_null_when_the_card_declares_no_split(self, hub):
        sha = hub.publish(REPO_ID, {"data/part-0.parquet": b"PAR1"})
        fingerprint = seed.check(REPO_ID).fingerprint
        assert fingerprint.rows is None
        assert seed.event_extra(REPO_ID, fingerprint, [])["rows"] is None and fingerprint.digest == sha

    def test_errors_are_one_line(self, hub, monkeypatch):
        hub.publish(REPO_ID, {"train.jsonl": jsonl(ROWS)})
        with pytest.raises(seed.SeedNotFound, match="no such dataset, or it is private -- check the name") as e:
            seed.check("standin/unknown")
        assert "\n" not in str(e.value)
        with pytest.raises(seed.SeedNotFound, match="no revision 'nope'"):
            seed.check(f"{REPO_ID}@nope")
        hub.tokens[REPO_ID] = "hf_right"  # a private dataset
        with pytest.raises(seed.SeedNotFound, match="or it is private -- check the name, or set HF_TOKEN"):
            seed.check(REPO_ID)
        monkeypatch.setenv("HF_TOKEN", "hf_wrong")
        with pytest.raises(seed.SeedNotFound, match="HTTP 401, access refused -- set HF_TOKEN to a valid token"):
            seed.check(REPO_ID)
        monkeypatch.setenv("HF_TOKEN", "hf_right")
        assert seed.check(REPO_ID).fingerprint.rows == 5
        hub.failing = 500
        with pytest.raises(seed.HubUnavailable, match="HTTP 500 -- the hub is failing, trying again later"):
            seed.check(REPO_ID)
        hub.failing = None
        from distilled_plugins.devtools.local_airflow import free_port

        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
        with pytest.raises(seed.HubUnavailable, match="cannot be reached .* check the network or HF_ENDPOINT") as e:
            seed.check(REPO_ID)
        assert "\n" not in str(e.value)

    def test_cli(self, hub, tmp_path):
        hub.publish(REPO_ID, {"train.jsonl": jsonl(ROWS)})
        state = tmp_path / "state.json"

        def run():
            return run_cli("seed", REPO_ID, "--state", state, env=cli_env(HF_ENDPOINT=hub.url), timeout=60)

        assert json.loads(run().stdout)["rows"] == 5
        assert run().returncode == seed.UNCHANGED
        sha = hub.publish(REPO_ID, {"train.jsonl": jsonl(ROWS[:3])})
        changed = run()
        assert changed.returncode == 0 and json.loads(changed.stdout)["path"] == f"{REPO_ID}@{sha}"
        hub.failing = 500
        failed = run()
        assert (
            failed.returncode == seed.UNAVAILABLE and "Traceback" not in failed.stderr and "HTTP 500" in failed.stderr
        )

    def test_generate_loads_exactly_the_pinned_commit(self, hub, tmp_path):
        """The real ``datasets.load_dataset`` through the stand-in: ``owner/name@<sha>`` reads that commit only."""
        old = hub.publish(REPO_ID, {"train.jsonl": jsonl(ROWS)})
        hub.publish(REPO_ID, {"train.jsonl": jsonl(ROWS[:2])})  # a refresh after the run was pinned
        code = (
            "import json, sys; from distilled_plugins.core.io import load_rows; "
            "print(json.dumps([load_rows(name) for name in sys.argv[1:]]))"
        )
        env = cli_env(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"))
        done = subprocess.run(
            [sys.executable, "-c", code, f"{REPO_ID}@{old}", REPO_ID],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        pinned, latest = json.loads(done.stdout.splitlines()[-1])
        assert pinned == ROWS and latest == ROWS[:2]


class TestHubWatcher:
    def test_fires_once_per_new_commit_and_outlives_a_failing_hub(self, hub):
        from operators.triggers.seed_change import STATE_KEY, SeedChangeTrigger

        first_sha = hub.publish(REPO_ID, {"train.jsonl": jsonl(ROWS)})
        store = FakeStateStore()

        async def scenario():
            trigger = SeedChangeTrigger(path=seed.canonical(REPO_ID), poll_interval=0.02)
            trigger.asset_state_store = store
            events = trigger.run()
            pending = asyncio.ensure_future(events.__anext__())
            while STATE_KEY not in store.values:  # the baseline is recorded, nothing fired
                await asyncio.sleep(0.01)
            assert store.values[STATE_KEY]["digest"] == first_sha
            asked = hub.requests
            while hub.requests < asked + 5:  # the same commit, asked again and again: nothing fires
                await asyncio.sleep(0.01)
            assert not pending.done()

            hub.failing = 500  # an outage: the watcher keeps asking, fires nothing and does not die
            asked = hub.requests
            while hub.requests < asked + 3:
                await asyncio.sleep(0.01)
            assert not pending.done()
            hub.failing = None

            second_sha = hub.publish(REPO_ID, {"train.jsonl": jsonl(ROWS + ROWS[:1])})
            fired = await asyncio.wait_for(pending, 30)
            pending = asyncio.ensure_future(events.__anext__())
            while store.values[STATE_KEY]["digest"] != second_sha:
                await asyncio.sleep(0.01)
            asked = hub.requests
            while hub.requests < asked + 5:
                await asyncio.sleep(0.01)
            assert not pending.done()  # one event per commit
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pending
            return second_sha, fired

        second_sha, fired = asyncio.run(scenario())
        assert fired.payload == {
            "uri": f"hf://datasets/{REPO_ID}@{second_sha}",
            "path": f"{REPO_ID}@{second_sha}",
            "fingerprint": second_sha,
            "revision": second_sha,
            "rows": 6,
            "changed_files": [f"revision {fired.payload['changed_files'][0].split()[1]} -> {second_sha}"],
        }
        assert fired.payload["changed_files"][0].split()[1] != second_sha

    def test_seed_task_reads_the_pinned_commit_from_the_event(self):
        from operators.dag_helpers.assets import SEED_NAME, seed_from_event

        payload = {"path": f"{REPO_ID}@abc", "fingerprint": "abc", "rows": 6, "uri": f"hf://datasets/{REPO_ID}@abc"}
        context = {"triggering_asset_events": {SEED_NAME: [event({"from_trigger": True, "payload": payload})]}}
        assert seed_from_event(context, REPO_ID) == {
            "seed": f"{REPO_ID}@abc",
            **{k: payload[k] for k in payload if k != "path"},
        }


class TestSeedTask:
    """The ``seed`` task of ``distill_r1`` for a manual run (no triggering event)."""

    def run_task(self, monkeypatch, default):
        import operators.sources as sources

        monkeypatch.setattr(sources, "get_current_context", lambda: {"triggering_asset_events": {}})
        return sources.seed.function(default)

    def test_a_hub_seed_is_pinned_to_the_current_commit(self, hub, monkeypatch):
        sha = hub.publish(REPO_ID, {"train.jsonl": jsonl(ROWS)})
        assert self.run_task(monkeypatch, REPO_ID) == {
            "seed": f"{REPO_ID}@{sha}",
            "fingerprint": sha,
            "rows": 5,
            "uri": f"hf://datasets/{REPO_ID}@{sha}",
        }

    def test_an_unknown_hub_dataset_fails_at_once_in_one_line(self, hub, monkeypatch):
        from airflow.sdk.exceptions import AirflowFailException

        with pytest.raises(AirflowFailException, match="no such dataset.*set the seed_dataset parameter"):
            self.run_task(monkeypatch, "standin/unknown")

    def test_a_local_seed_is_used_as_it_is(self, tmp_path, monkeypatch):
        path = write_jsonl(tmp_path / "seed.jsonl", ROWS)
        assert self.run_task(monkeypatch, str(path)) == {
            "seed": str(path),
            "fingerprint": None,
            "rows": None,
            "uri": None,
        }
