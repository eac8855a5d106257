"""The grader, shared by rejection sampling and evaluation: math_verify in worker processes with hard limits.

Semantics: ``verify(parse(gold), parse(completion))``, gold first (math_verify is not symmetric), the gold wrapped
as a LaTeX formula (``"$" + answer + "$"`` unless already delimited), math_verify's default extraction on the
completion, and only the text after the last ``</think>`` graded when there is one. A completion that ended on
``finish_reason == "length"`` is rejected as truncated without grading.

Why worker processes: math_verify's timeouts use ``signal.alarm``, which works only in a process's main thread,
only in whole seconds, and cancels any alarm of the caller (Airflow's ``execution_timeout`` among them). So it
is never called in the caller's process; each worker is a process whose main thread grades. Some inputs
(``\\boxed{9^{9^{9}}}``) stall inside C code where no alarm reaches: past ``sample_timeout`` seconds of wall
clock the worker is killed, the sample counted as ``timeout``, and a fresh worker takes its place.

>>> with GradingPool(workers=1) as pool:
...     verdicts = [v.verdict for v in pool.grade([Sample(0, "\\\\frac{1}{2}", "so $\\\\boxed{0.5}$")])]
>>> verdicts
['correct']
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing.connection
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from distilled_plugins.core.errors import ChildFailed

logger = logging.getLogger(__name__)

CORRECT, WRONG, NO_ANSWER, TRUNCATED, TIMEOUT, GOLD_UNPARSEABLE, ERROR = (
    "correct",
    "wrong",
    "no_answer",
    "truncated",
    "timeout",
    "gold_unparseable",
    "error",
)
VERDICTS = (CORRECT, WRONG, NO_ANSWER, TRUNCATED, TIMEOUT, GOLD_UNPARSEABLE, ERROR)
FILTERED_GOLDS = ("proof", "notfound")  # NuminaMath marks problems without a checkable answer so
_DELIMITERS = (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


class Sample(NamedTuple):
    """One completion to grade against one gold answer; ``id`` is the caller's, returned with the verdict."""

    id: object
    gold: str
    completion: str
    finish_reason: str | None = None


class Verdict(NamedTuple):
    id: object
    verdict: str
    reason: str


def gold_is_filtered(answer) -> bool:
    """Golds that cannot be checked: empty, ``proof`` or ``notfound``."""
    return answer is None or str(answer).strip().lower() in ("", *FILTERED_GOLDS)


def gold_as_latex(answer: str) -> str:
    """The gold as math_verify should read it: a formula in ``$...$`` unless it is delimited already."""
    text = str(answer).strip()
    if any(text.startswith(a) and text.endswith(b) and len(text) > len(a) + len(b) for a, b in _DELIMITERS):
        return text
    return f"${text}$"


def graded_part(completion: str) -> str:
    """What is graded: the text after the last ``</think>``, or the whole completion without one."""
    _head, sep, tail = completion.rpartition("</think>")
    return tail if sep else completion


# ---- inside a worker process ---------------------------------------------------------------------------------


class _TimeoutLog(logging.Handler):
    """math_verify reports its own (alarm) timeouts only in its log; this turns them into a flag."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.fired = False

    def emit(self, record: logging.LogRecord) -> None:
        if "timeout" in record.getMessage().lower():
            self.fired = True


def _grade_in_worker(
    sample: Sample, parse_timeout: int, verify_timeout: int, gold_cache: dict, timeouts: _TimeoutLog
) -> tuple[str, str]:
    from math_verify import parse, verify

    timeouts.fired = False
    gold = gold_cache.get(sample.gold)
    if gold is None:
        gold = parse(gold_as_latex(sample.gold), parsing_timeout=parse_timeout)
        if len(gold_cache) > 1024:
            gold_cache.clear()
        gold_cache[sample.gold] = gold
    if not gold:
        return GOLD_UNPARSEABLE, f"math_verify cannot parse the gold {sample.gold!r:.120}"
    prediction = parse(graded_part(sample.completion), parsing_timeout=parse_timeout)
    if not prediction:
        if timeouts.fired:
            return TIMEOUT, f"parsing the completion took over {parse_timeout} s"
        return NO_ANSWER, "no answer could be extracted"
    if verify(gold, prediction, timeout_seconds=verify_timeout):
        return CORRECT, f"{prediction[-1]!s:.120}"
    if timeouts.fired:
        return TIMEOUT, f"comparing took over {verify_timeout} s"
    return WRONG, f"{prediction[-1]!s:.80} != {gold[-1]!s:.80}"


def _worker_main(conn, parse_timeout: int, verify_timeout: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop

    conn.send("ready")
    timeouts = _TimeoutLog()
    for name in ("math_verify", "math_verify.parser", "math_verify.grader", "math_verify.utils"):
        logging.getLogger(name).addHandler(timeouts)
        logging.getLogger(name).propagate = False
    gold_cache: dict = {}
    while True:
        try:
            sample = conn.recv()
        except EOFError:
            return
        if sample is None:
            return
        try:
            verdict, reason = _grade_in_worker(sample, parse_timeout, verify_timeout, gold_cache, timeouts)
        except Exception as e:  # a bug in math_verify on odd input must not take the run down
            verdict, reason = ERROR, f"{type(e).__name__}: {e!s:.160}"
        conn.send((verdict, reason))


# ---- in the caller's process -----------------------------------------------------------------------------------


@dataclass
class _Worker:
    process: subprocess.Popen
    conn: multiprocessing.connection.Connection
    sample: Sample | None = None
    deadline: float = 0.0


class GradingPool:
    """Processes grading :class:`Sample` s; use as a context manager and feed :meth:`grade` an iterable.

    ``parse_timeout`` and ``verify_timeout`` are math_verify's own limits (whole seconds: its alarm cannot do
    fractions); ``sample_timeout`` is the hard wall-clock limit after which a worker is killed and replaced.
    """

    def __init__(
        self, workers: int | None = None, parse_timeout: int = 5, verify_timeout: int = 5, sample_timeout: float = 30.0
    ):
        for name, value in (("parse_timeout", parse_timeout), ("verify_timeout", verify_timeout)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"{name} must be a whole number of seconds >= 1 (math_verify uses signal.alarm), got {value!r}"
                )
        if sample_timeout <= 0:
            raise ValueError(f"sample_timeout must be positive, got {sample_timeout}")
        self.size = workers or os.cpu_count() or 1
        self.parse_timeout, self.verify_timeout, self.sample_timeout = parse_timeout, verify_timeout, sample_timeout
        self._workers: list[_Worker] = []
        self.replaced = 0

    def _start_worker(self) -> _Worker:
        # A fresh interpreter, not a fork: the caller may be an Airflow task with threads holding locks, and
        # multiprocessing's spawn/forkserver re-import the caller's __main__. Pickled messages cross two pipes.
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        package_root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "distilled_plugins.core.grader",
                "--worker",
                str(to_child_r),
                str(from_child_w),
                str(self.parse_timeout),
                str(self.verify_timeout),
            ],
            pass_fds=(to_child_r, from_child_w),
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        return _Worker(process, _Duplex(from_child_r, to_child_w))

    def __enter__(self) -> GradingPool:
        self._workers = [self._start_worker() for _ in range(self.size)]
        for worker in self._workers:  # started in parallel; wait until each has imported math_verify
            if worker.conn.recv() != "ready":
                raise ChildFailed("a grading worker failed to start")
        return self

    def __exit__(self, *exc) -> None:
        for worker in self._workers:
            with contextlib.suppress(OSError):
                worker.conn.send(None)
        for worker in self._workers:
            try:
                worker.process.wait(timeout=2)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
            worker.conn.close()
        self._workers = []

    def _replace(self, worker: _Worker) -> None:
        worker.process.kill()
        worker.process.wait()
        worker.conn.close()
        fresh = self._start_worker()
        if fresh.conn.recv() != "ready":
            raise ChildFailed("a grading worker failed to start")
        self._workers[self._workers.index(worker)] = fresh
        self.replaced += 1

    def grade(self, samples: Iterable[Sample]) -> Iterator[Verdict]:
        """Grade samples as they come (read lazily), yielding verdicts as they finish, in no fixed order."""
        pending = iter(samples)
        exhausted = False
        while True:
            for worker in self._workers:
                if worker.sample is None and not exhausted:
                    sample = next(pending, None)
                    while sample is not None and sample.finish_reason == "length":
                        yield Verdict(sample.id, TRUNCATED, "finish_reason is 'length': the completion was cut off")
                        sample = next(pending, None)
                    if sample is None:
                        exhausted = True
                        break
                    worker.conn.send(sample)
                    worker.sample, worker.deadline = sample, time.monotonic() + self.sample_timeout
            busy = [w for w in self._workers if w.sample is not None]
            if not busy:
                return
            wait = max(0.0, min(w.deadline for w in busy) - time.monotonic())
            ready = set(multiprocessing.connection.wait([w.conn for w in busy], timeout=wait))
            for worker in busy:
                sample = worker.sample
                if worker.conn in ready:
                    try:
                        verdict, reason = worker.conn.recv()
                    except (EOFError, OSError):
                        verdict, reason = ERROR, f"the grading worker died (exit code {worker.process.poll()})"
                        self._replace(worker)
                    worker.sample = None
                    yield Verdict(sample.id, verdict, reason)
                elif time.monotonic() >= worker.deadline:
                    logger.warning(
                        "sample %r stalled past %g s; its worker was replaced", sample.id, self.sample_timeout
                    )
                    self._replace(worker)
                    yield Verdict(sample.id, TIMEOUT, f"abandoned after {self.sample_timeout:g} s of wall clock")


class _Duplex:
    """Two pipe ends as one connection: ``recv`` and ``fileno`` on one, ``send`` on the other."""

    def __init__(self, read_fd: int, write_fd: int):
        self._reader = multiprocessing.connection.Connection(read_fd, writable=False)
        self._writer = multiprocessing.connection.Connection(write_fd, readable=False)
        self.recv, self.send, self.fileno = self._reader.recv, self._writer.send, self._reader.fileno

    def close(self) -> None:
        self._reader.close()
        self._writer.close()


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    read_fd, write_fd, parse_s, verify_s = map(int, sys.argv[2:6])
    _worker_main(_Duplex(read_fd, write_fd), parse_s, verify_s)
