"""Test set-up: a private Airflow home with its own SQLite database, and the shared fixtures.

Airflow reads its configuration when first imported, so the environment is set here, before any test module
imports it. Plain helpers (data paths, rows, the stage CLIs, ``wait_until``) are in ``tests/support.py``.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from distilled_plugins.core.configs import TINY_TOKENIZER
from distilled_plugins.devtools.local_airflow import LocalAirflow, free_port
from distilled_plugins.devtools.teacher_server import (
    ReplayTeacher,
    ServerThread,
    load_answers,
    replay_answer,
    wait_for_port,
)
from tests.support import (  # MATH_TRAIN_SOLUTIONS, read_jsonl: still imported from here by tests/cluster/
    MATH_TRAIN_SOLUTIONS,  # noqa: F401
    REPO,
    TINY_ROWS,
    answer_with_solution,
    cli_env,
    failing_first,
    handled_and_packed_rows,
    math_train_rows,
    read_jsonl,  # noqa: F401
    write_jsonl,
)

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


AIRFLOW_GROUP = "airflow"


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Groups for ``--dist loadgroup`` (make test's two workers): the tests marked ``airflow`` form one group, run
    in turn on one worker and first (the longest part; two Airflows at once starve each other of CPU, and Airflow
    then meets its race between a deferral and a trigger that fires at once); every other test runs with the rest of
    its file, as under ``--dist loadfile`` (a file's tests share its module fixtures; files of one name share a
    worker too)."""
    for item in items if config.pluginmanager.hasplugin("xdist") else ():
        group = AIRFLOW_GROUP if item.get_closest_marker("airflow") else item.path.stem  # xdist appends it to ids
        item.add_marker(pytest.mark.xdist_group(group))
    items.sort(key=lambda item: not item.get_closest_marker("airflow"))  # stable: file order otherwise kept


_running_test: pytest.Item | None = None  # the test whose set-up, call or tear-down runs now
# make test's worker that runs the other tests yields the CPUs to the Airflow group's (the longest part, and mostly
# waiting on Airflow's loops): niceness of it and of all it starts (msrun, the learnability check)
OTHER_TESTS_NICENESS = 10


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    global _running_test
    _running_test = item
    if os.environ.get("PYTEST_XDIST_WORKER") and not item.get_closest_marker("airflow") and os.nice(0) == 0:
        os.nice(OTHER_TESTS_NICENESS)  # once; the Airflow group runs first and whole on one worker: never niced
    try:
        return (yield)
    finally:
        _running_test = None


@pytest.fixture(scope="session", autouse=True)
def _airflow_starts_only_in_tests_marked_airflow():
    """A test that starts Airflow's services (itself or by a fixture) must be marked ``airflow``: unmarked, make
    test would run it beside the Airflow group, two Airflows at once. Fails such a test when it starts them."""
    start = LocalAirflow.start

    @functools.wraps(start)
    def start_if_marked(self, *args, **kwargs):
        if _running_test is not None and not _running_test.get_closest_marker("airflow"):
            pytest.fail(
                f"{_running_test.nodeid} starts Airflow's services, itself or through one of its fixtures "
                f"({', '.join(_running_test.fixturenames)}): mark it @pytest.mark.airflow",
                pytrace=False,
            )
        return start(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LocalAirflow, "start", start_if_marked)
        yield


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: its controller, once a worker collected
def pytest_xdist_node_collection_finished(node, ids: list[str]) -> None:
    """Stop at once where pytest-xdist dropped the groups: it would spread the Airflow tests over both workers
    without a word (it marks a test's group in its id, which pytest 9.2 no longer reads: pytest-xdist#1386; hence
    pytest 9.1 in requirements-test.txt)."""
    if node.config.getoption("dist") == "loadgroup" and ids and "@" not in ids[0]:
        pytest.exit("pytest-xdist's --dist loadgroup lost the tests' groups (pytest-xdist#1386)", returncode=4)


@pytest.fixture(scope="session")
def airflow_db():
    """A migrated Airflow metadata database, created once per test session."""
    from airflow.utils import db

    db.initdb()
    return _AIRFLOW_HOME


@dataclass
class Teacher:
    """A running replay teacher: ``url`` is its base URL; ``replay`` (in this process) counts and records the
    requests; ``process`` is the teacher's own process when started with ``process=True``. Unpacks as
    ``replay, url``."""

    replay: ReplayTeacher | None
    url: str
    process: subprocess.Popen | None = None

    def __iter__(self):
        return iter((self.replay, self.url))

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname

    @property
    def port(self) -> int:
        return urlsplit(self.url).port


class _Teachers:
    """The replay teachers a fixture started, stopped together by ``close()``."""

    def __init__(self, tmp_path_factory):
        self.tmp_path_factory = tmp_path_factory
        self.servers: list[ServerThread] = []
        self.processes: list[subprocess.Popen] = []

    def start(self, answer=None, *, solutions=None, problems=(), fail_first=0, process=False, **options) -> Teacher:
        if answer is not None and solutions is not None:
            raise TypeError("a replay teacher answers from answer() or from solutions=, not both")
        if process:
            if fail_first:
                raise TypeError("a teacher process cannot fail_first: start it in this process instead")
            return self._process(answer, solutions, problems, options)
        if solutions is not None:
            answer = replay_answer(_solutions(str(solutions)))
        answer = answer or answer_with_solution
        if fail_first:
            answer = failing_first(answer, fail_first)
        replay = ReplayTeacher(answer, **options)
        server = ServerThread(replay.app()).__enter__()
        self.servers.append(server)
        return Teacher(replay, server.url)

    def _process(self, answer, solutions, problems, options) -> Teacher:
        if set(options) - {"delay"}:
            raise TypeError(f"a teacher process takes only the delay option, not {sorted(set(options) - {'delay'})}")
        if solutions is None:  # the CLI replays a file: write answer(problem) for each problem
            answer = answer or answer_with_solution
            solutions = self.tmp_path_factory.mktemp("teacher") / "answers.jsonl"
            write_jsonl(solutions, [{"problem": p, "solution": answer(p)} for p in problems])
        port = free_port()
        command = [sys.executable, "-m", "distilled_plugins.devtools.teacher_server", "--answers", str(solutions)]
        command += ["--port", str(port), "--delay", str(options.get("delay", 0.0))]
        proc = subprocess.Popen(command, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.processes.append(proc)
        wait_for_port(port)
        return Teacher(None, f"http://127.0.0.1:{port}", proc)

    def close(self) -> None:
        for server in self.servers:
            server.__exit__(None, None, None)
        for proc in self.processes:
            proc.kill()
            proc.wait()


@pytest.fixture
def replay_teacher(tmp_path_factory):
    """Start replay teachers (OpenAI-compatible endpoints on 127.0.0.1) for one test; each stops when it ends.

    ``replay_teacher(answer=None, *, solutions=None, problems=(), fail_first=0, process=False, **options)``:

    - the completion of a problem is ``answer(problem)`` (default ``support.answer_with_solution``), or, with
      ``solutions=<file>``, the problem's reference solution from that file (``MATH_TRAIN_SOLUTIONS``,
      ``MATH500``: real text with correct final answers);
    - ``fail_first=N``: the first N requests get HTTP 500;
    - ``options``: the rest of :class:`ReplayTeacher` (``faults``, ``fault_rate``, ``delay``, ``api_key``,
      ``rate_limit_rpm``, ``retry_after``, ``stream_chunks``, ...);
    - ``process=True``: the teacher runs in its own process (its CLI), so a test can SIGKILL it
      (``teacher.process``); then it replays ``solutions`` (or ``answer`` over ``problems``), and of the
      options only ``delay``.

    Call it again for more endpoints; ``replay, url = replay_teacher()`` unpacks.
    """
    teachers = _Teachers(tmp_path_factory)
    yield teachers.start
    teachers.close()


@pytest.fixture(scope="module")
def module_replay_teacher(tmp_path_factory):
    """``replay_teacher`` for a module-scoped fixture (a private Airflow shared by a module's tests)."""
    teachers = _Teachers(tmp_path_factory)
    yield teachers.start
    teachers.close()


@pytest.fixture
def seed(tmp_path):
    """A seed file of the first 12 MATH training problems (with reference solutions)."""
    return write_jsonl(tmp_path / "seed.jsonl", math_train_rows(12))


@functools.lru_cache(maxsize=4)
def _solutions(path: str) -> dict[str, str]:
    return load_answers(path, "problem", "solution")


@pytest.fixture(scope="session")
def tiny_packed(tmp_path_factory):
    """Packed rows at the tiny CPU profile's seq_length (256), in its tokenizer: a few training steps' worth."""
    _, packed = handled_and_packed_rows(tmp_path_factory.mktemp("tiny-packed"), TINY_TOKENIZER, 5, start=2)
    rows = json.loads((packed / "stats.json").read_text())["packs"]
    assert rows == TINY_ROWS, f"the tiny packed data has {rows} rows; the fine-tune tests count on {TINY_ROWS}"
    return packed


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_packed, tmp_path_factory):
    """A tiny model fine-tuned for 8 steps by stage 5 (msrun, 1 CPU worker): its checkpoint folder."""
    from distilled_plugins.core import configs
    from distilled_plugins.finetune import FinetuneConfig
    from distilled_plugins.finetune.stage import run

    out = tmp_path_factory.mktemp("tiny-finetune")
    result = run(
        FinetuneConfig(
            config=str(configs.CONFIG_DIR / "finetune_tiny_cpu.yaml"),
            dataset_path=str(tiny_packed),
            output_dir=str(out),
            master_port=free_port(),
            poll_interval=0.5,
        )
    )
    return Path(result.checkpoint_dir)


@pytest.fixture
def batch_teacher():
    """Start a local Batch API (``devtools/batch_server.py``) over a replay teacher for one test:
    ``batch_teacher(answer=None, **options)`` -> ``(BatchTeacher, url)``; options as :class:`BatchTeacher` takes
    them (``hold``, ``fail_first``, ``expire_after``, ``seconds_per_request``, ``max_requests``, ``api_key``...)."""
    from distilled_plugins.devtools.batch_server import BatchTeacher

    servers = []

    def start(answer=None, **options):
        provider = BatchTeacher(ReplayTeacher(answer or answer_with_solution), **options)
        servers.append(ServerThread(provider.app()).__enter__())
        return provider, servers[-1].url

    yield start
    for server in servers:
        server.__exit__(None, None, None)
