"""Helpers shared by the test modules: data paths and rows, the stage CLIs, waiting on a condition.

Plain functions and constants only; the fixtures built on them (``replay_teacher``, ``airflow_db``, the tiny
packed data and checkpoint) live in ``tests/conftest.py``. A test module imports from here, never from another
test module.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from distilled_plugins import generate
from distilled_plugins.core.configs import SHARED_DATA
from distilled_plugins.core.io import rewrite_jsonl
from distilled_plugins.core.schema import row_key
from distilled_plugins.teacher.settings import RetryPolicy

REPO = Path(__file__).resolve().parents[1]
MATH500 = SHARED_DATA / "math500" / "test.jsonl"
MATH_TRAIN_SOLUTIONS = SHARED_DATA / "math_train" / "math12k_train_with_solutions.jsonl"
TOKENIZER_DIR = SHARED_DATA / "tokenizer" / "qwen2.5"

# rows of the tiny packed data: one training step each with one worker, half as many per worker with two
TINY_ROWS = 10
# epochs of the tiny data for a test that stops or kills training while it trains: its steps take ~40 ms (the tiny
# profile's 4,096-token vocabulary), so one epoch is over in half a second; 20 give a window of ~10 s
INTERRUPTIBLE_EPOCHS = 20

# ---- rows and files -------------------------------------------------------------------------------------------


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def write_jsonl(path, rows) -> Path:
    return rewrite_jsonl(Path(path), rows)


def math_train_rows(n: int, start: int = 0) -> list[dict]:
    """The first ``n`` MATH training problems that have a reference solution."""
    rows = []
    with open(MATH_TRAIN_SOLUTIONS) as f:
        for i, line in enumerate(f):
            if i < start:
                continue
            row = json.loads(line)
            if row.get("solution"):
                rows.append(row)
            if len(rows) == n:
                break
    return rows


def conversation_rows(n: int, start: int = 0) -> list[dict]:
    """MATH training problems with their reference solutions as user/assistant conversations."""
    return [
        {"messages": [{"role": "user", "content": r["problem"]}, {"role": "assistant", "content": r["solution"]}]}
        for r in math_train_rows(n, start)
    ]


def handled_and_packed_rows(folder: Path, tokenizer, rows: int, start: int = 0, seq_length: int = 256):
    """``rows`` conversations handled with ``tokenizer`` and packed at ``seq_length`` by the stages themselves, in
    ``folder``: the handled folder and the packed one."""
    from distilled_plugins.handle.config import HandleConfig
    from distilled_plugins.handle.stage import run as handle_run
    from distilled_plugins.pack.config import PackConfig
    from distilled_plugins.pack.stage import run as pack_run

    src = write_jsonl(folder / "filtered.jsonl", conversation_rows(rows, start=start))
    handled = handle_run(HandleConfig(src=[str(src)], tokenizer=str(tokenizer), dst=str(folder / "handled")))
    return handled, pack_run(PackConfig(src=str(handled), dst=str(folder / "packed"), seq_length=seq_length))


def generation_rows() -> list[dict]:
    """Stage 1 rows covering each verdict and each reason an example is dropped (see test_reject_sampling)."""
    return [
        {
            "problem": "Compute 1/2 + 1/2 - 1/2.",
            "answer": "\\frac{1}{2}",
            "prompt": "P1",
            "generations": [
                "so $\\boxed{\\frac{1}{3}}$",
                "so $\\boxed{\\frac{1}{2}}$",
                "so $\\boxed{0.5}$",
                "so $\\boxed{\\frac{1}{2}}$",
            ],
            "finish_reasons": ["stop", "stop", "stop", "length"],
            "api_metadata": [{"n": 0}, {"n": 1}, {"n": 2}, {"n": 3}],
        },
        {
            "problem": "Prove that there are infinitely many primes.",
            "answer": "proof",
            "generations": ["..."],
            "finish_reasons": ["stop"],
        },
        {"problem": "Find x.", "answer": "notfound", "generations": ["x"], "finish_reasons": ["stop"]},
        {
            "problem": "What is 2+2?",
            "answer": "4",
            "generations": ["It is $\\boxed{5}$", "no idea"],
            "finish_reasons": ["stop", "stop"],
        },
        {
            "problem": "Solve x^2 = 4 for positive x.",
            "answer": "2",
            "generations": ["$\\boxed{2}$"],
            "finish_reasons": ["stop"],
        },
        {"problem": "Odd gold.", "answer": "\\text{}", "generations": ["$\\boxed{1}$"], "finish_reasons": ["stop"]},
        {"problem": "Empty gold.", "answer": " ", "generations": ["$\\boxed{1}$"], "finish_reasons": ["stop"]},
    ]


def contaminated_row() -> dict:
    """The first MATH-500 problem in other case and spacing: decontamination must still catch it."""
    first = read_jsonl(MATH500)[0]["problem"]
    changed = "  ".join(first.upper().split())  # other case and spacing
    return {"problem": changed, "answer": "1", "generations": ["$\\boxed{1}$"], "finish_reasons": ["stop"]}


# ---- generation -----------------------------------------------------------------------------------------------

SECRET = "sk-test-7c1d9e0b5a3f4242"
FAST_RETRY = RetryPolicy(max_attempts=4, backoff_base=0.01, backoff_max=0.05, connect_timeout=2, request_timeout=5)


def answer_with_solution(problem: str) -> str:
    """The replay teacher's default completion: a fixed final answer that names the problem."""
    return f"Solving: {problem[:40]} ... so the answer is $\\boxed{{42}}$."


def failing_first(answer: Callable[[str], str], failures: int) -> Callable[[str], str]:
    """``answer``, except that the first ``failures`` requests get HTTP 500 (a teacher overloaded for a while)."""
    from aiohttp import web

    calls = []

    def flaky(problem: str) -> str:
        calls.append(problem)
        if len(calls) <= failures:
            raise web.HTTPInternalServerError(text='{"error": "teacher overloaded"}', content_type="application/json")
        return answer(problem)

    return flaky


def generate_config(seed, tmp_path, url, **overrides) -> generate.GenerateConfig:
    """Stage 1 settings for a test: 2 completions a row, 4 at once, fast retries, output under ``tmp_path/out``."""
    settings = {
        "dataset_name": str(seed),
        "output_file": str(Path(tmp_path) / "out" / "gen.jsonl"),
        "model": "teacher",
        "api_addr": url,
        "num_generations": 2,
        "max_concurrent": 4,
        "retry": FAST_RETRY,
        "progress_interval": 0.2,
    }
    settings.update(overrides)
    return generate.GenerateConfig(**settings)


def keys_of(path, column="problem") -> list[str]:
    """Row keys of a generations file, in file order."""
    return [row_key(row[column]) for row in read_jsonl(path)]


# ---- processes and waiting ------------------------------------------------------------------------------------


def cli_command(module: str, *args) -> list[str]:
    """The command line of a stage CLI: ``python -m distilled_plugins.<module> args...``."""
    return [sys.executable, "-m", f"distilled_plugins.{module}", *map(str, args)]


def cli_env(**extra: str) -> dict[str, str]:
    """This process's environment with the checkout on PYTHONPATH (plus ``extra``)."""
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def run_cli(module: str, *args, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a stage CLI from the checkout to its end; output captured as text."""
    return subprocess.run(
        cli_command(module, *args),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env() if env is None else env,
    )


def wait_until(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    """Poll ``condition`` until it returns something true, and return that; fail naming ``what`` was awaited.

    >>> wait_until(lambda: 42, 1, "the answer")
    42
    >>> wait_until(lambda: None, 0.05, "the impossible", interval=0.01)
    Traceback (most recent call last):
    ...
    AssertionError: timed out after 0.05 s waiting for the impossible
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def job_processes(folder: Path) -> list[psutil.Process]:
    """Live processes of the training jobs under ``folder``: the supervisor, msrun and its workers all carry the
    job's folder in their command line."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["status"] != psutil.STATUS_ZOMBIE and any(str(folder) in p for p in proc.info["cmdline"] or []):
            found.append(proc)
    return found


def line_count(path: Path) -> int:
    """Whole lines in ``path`` so far (0 when it does not exist yet)."""
    try:
        return Path(path).read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def in_memory_merge(paths, uuid_column: str) -> bytes:
    """The merge as it was before it streamed: every row in a dict, first shard wins, sorted by key."""
    by_key = {}
    for path in paths:
        for row in read_jsonl(path):
            by_key.setdefault(row_key(row[uuid_column]), row)
    return b"".join(json.dumps(by_key[key], ensure_ascii=False).encode() + b"\n" for key in sorted(by_key))


class XComTI:
    """What the operator uses of its task instance: XCom of this try, kept in a dict as the worker's XCom keeps it
    while the task is deferred (a real task instance needs a running Airflow task)."""

    def __init__(self, task_id: str = "finetune", map_index: int = -1):
        self.task_id, self.map_index, self.xcom = task_id, map_index, {}

    def xcom_push(self, key: str, value) -> None:
        self.xcom[(self.task_id, self.map_index, key)] = value

    def xcom_pull(self, task_ids: str, key: str, map_indexes: int):
        return self.xcom.get((task_ids, map_indexes, key))


# ---- a real browser (headless Chromium driven by selenium) ----

BROWSER_WAIT = 120  # seconds: a loaded 2-core machine renders slowly


def chromium(shots: Path):
    """A headless Chromium; a missing browser skips the test, except under CI=true where it fails it."""
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        browser = None
    if not (browser and driver):
        message = "headless Chromium is missing: apt-get install -y chromium chromium-driver; pip install selenium"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1100",
    ):
        options.add_argument(arg)
    options.binary_location = browser
    return webdriver.Chrome(service=Service(driver), options=options)


class Page:
    """The browser with numbered screenshots; ``fail`` names them all."""

    def __init__(self, driver, shots: Path):
        self.driver, self.shots, self.taken = driver, shots, []
        shots.mkdir(parents=True, exist_ok=True)

    def shot(self, name: str) -> Path:
        path = self.shots / f"{len(self.taken) + 1:02d}-{name}.png"
        self.driver.save_screenshot(str(path))
        self.taken.append(path)
        return path

    def wait(self, condition, what: str, timeout: float = BROWSER_WAIT):
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.5).until(lambda _: condition())
        except TimeoutException:
            self.shot("timeout")
            raise AssertionError(f"waited {timeout:g} s for {what}; screenshots: {self.listing()}") from None

    def listing(self) -> str:
        return ", ".join(str(p) for p in self.taken)


@contextlib.contextmanager
def browser(shots: Path) -> Iterator[Page]:
    """A headless Chromium :class:`Page`; a failure inside names every screenshot taken (an unexpected error takes
    one more first), and the browser quits however the block ends."""
    page = Page(chromium(shots), shots)
    try:
        yield page
    except AssertionError as e:
        raise AssertionError(f"{e}\nscreenshots: {page.listing()}") from None
    except Exception as e:
        page.shot("error")
        raise AssertionError(f"{type(e).__name__}: {e}\nscreenshots: {page.listing()}") from e
    finally:
        page.driver.quit()
