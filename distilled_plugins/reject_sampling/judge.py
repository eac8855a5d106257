"""The LLM judge of rejection sampling: asked about the generations math_verify rejects, its verdicts cached.

OpenR1-Math-220k was made this way: R1's generations checked with math_verify, and those it rejected sent to an
LLM judge (Llama-3.3-70B-Instruct), which recovered correct answers math_verify cannot parse or match (words,
option letters with their value, units, sets written out). Rejection sampling (:mod:`.stage`) asks the
judge through the teacher's client (``client.ChatClient``: the same retries, rate limits and fleet of endpoints).

The prompt (:data:`JUDGE_PROMPT`, version :data:`JUDGE_PROMPT_VERSION`) shows the problem, the gold answer and
the generation's final answer part (the text after ``</think>``; its last :data:`ANSWER_CHARS` characters) and
asks for a last line ``Verdict: yes`` or ``Verdict: no``; any other reply is ``unparseable`` and counts as no.

Verdicts are kept in a SQLite file (:class:`VerdictCache`), keyed by (judge model, prompt version, problem, gold,
generation), so a rerun of the same input asks the judge nothing. Change the prompt's text and bump its version.

>>> parse_verdict("The forms agree.\\nVerdict: yes")
'yes'
>>> parse_verdict("**Verdict:** No."), parse_verdict("I think yes"), parse_verdict("Verdict: maybe")
('no', 'unparseable', 'unparseable')
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import queue
import re
import sqlite3
import threading
from pathlib import Path
from typing import NamedTuple

from distilled_plugins.core.errors import EndpointUnreachable, FatalRequestError
from distilled_plugins.core.grader import graded_part
from distilled_plugins.reject_sampling.config import CACHE_FILE
from distilled_plugins.teacher.client import BudgetExhausted, ChatClient, RetryableError
from distilled_plugins.teacher.endpoints import Endpoint
from distilled_plugins.teacher.settings import RequestSettings

JUDGE_PROMPT_VERSION = "v1"  # bump with any change of JUDGE_PROMPT: cached verdicts of another version are not used
JUDGE_PROMPT = """\
You check a student's final answer to a math problem against the reference answer.

Problem:
{problem}

Reference answer:
{gold}

Student's final answer (the end of the student's solution):
{answer}

Is the student's final answer mathematically equivalent to the reference answer? Count as equivalent: other \
notation or formatting, an equivalent form (0.5 and 1/2), units or words around the value, an option letter given \
with or as the correct option. Count as not equivalent: a different value, a partial answer, several answers where \
one is expected, or no final answer. Reason in a few sentences, then end your reply with exactly one line, \
"Verdict: yes" or "Verdict: no"."""
ANSWER_CHARS = 4000  # the end of a long answer part is where its final answer is
YES, NO, UNPARSEABLE, ERROR = "yes", "no", "unparseable", "error"
_VERDICT_LINE = re.compile(r"^[*_\s]*verdict[*_\s]*:[*_\s]*(yes|no)[*_\s.!]*$", re.IGNORECASE)
_COMMIT_EVERY = 64  # verdicts written per transaction


class JudgeVerdict(NamedTuple):
    """The judge's verdict on one generation: ``yes``, ``no``, ``unparseable`` (counts as no) or ``error`` (every
    attempt failed: not asked again by a rerun); ``reply`` is the end of its reply, or the error."""

    verdict: str
    reply: str
    cached: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0


def answer_part(generation: str) -> str:
    """What the judge sees of a generation: the text after its last ``</think>`` (all of it without one), its
    last ``ANSWER_CHARS`` characters.

    >>> answer_part("<think>so 4</think>\\nThe answer is four.")
    'The answer is four.'
    """
    return graded_part(generation).strip()[-ANSWER_CHARS:]


def judge_messages(problem: str, gold: str, generation: str) -> list[dict]:
    """The one user turn sent to the judge."""
    content = JUDGE_PROMPT.format(problem=str(problem).strip(), gold=str(gold).strip(), answer=answer_part(generation))
    return [{"role": "user", "content": content}]


def parse_verdict(reply: str) -> str:
    """``yes`` or ``no`` from the reply's last non-empty line (case and markdown emphasis aside), else
    ``unparseable``."""
    lines = [line for line in (reply or "").splitlines() if line.strip()]
    found = _VERDICT_LINE.match(lines[-1]) if lines else None
    return found.group(1).lower() if found else UNPARSEABLE


def cache_key(model: str, problem: str, gold: str, generation: str) -> str:
    """The cache key of a question: (judge model, prompt version, problem, gold, generation), hashed."""
    text = json.dumps([model, JUDGE_PROMPT_VERSION, str(problem), str(gold), generation], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


class VerdictCache:
    """The judge's answered questions in one SQLite file; read and written one key at a time (nothing held in
    memory but an open transaction of at most ``_COMMIT_EVERY`` verdicts). Errors are not kept.

    >>> import tempfile
    >>> with VerdictCache(tempfile.mkdtemp()) as cache:
    ...     cache.put("k", JudgeVerdict("yes", "Verdict: yes", False, 90, 4))
    ...     cache.get("k"), cache.get("other")
    (JudgeVerdict(verdict='yes', reply='Verdict: yes', cached=True, prompt_tokens=90, completion_tokens=4), None)
    """

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / CACHE_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=120, isolation_level=None)
        self.db.execute("PRAGMA busy_timeout = 120000")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS verdicts (key TEXT PRIMARY KEY, verdict TEXT NOT NULL, reply TEXT NOT NULL, "
            "prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL)"
        )
        self._unwritten = 0

    def __enter__(self) -> VerdictCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def get(self, key: str) -> JudgeVerdict | None:
        row = self.db.execute(
            "SELECT verdict, reply, prompt_tokens, completion_tokens FROM verdicts WHERE key = ?", (key,)
        ).fetchone()
        return JudgeVerdict(row[0], row[1], True, row[2], row[3]) if row else None

    def put(self, key: str, verdict: JudgeVerdict) -> None:
        if verdict.verdict == ERROR:
            return  # a failed question is asked again next time
        if not self.db.in_transaction:
            self.db.execute("BEGIN IMMEDIATE")
        self.db.execute(
            "INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?, ?)",
            (key, verdict.verdict, verdict.reply, verdict.prompt_tokens, verdict.completion_tokens),
        )
        self._unwritten += 1
        if self._unwritten >= _COMMIT_EVERY:
            self.commit()

    def commit(self) -> None:
        if self.db.in_transaction:
            self.db.execute("COMMIT")
        self._unwritten = 0

    def close(self) -> None:
        if self.db is not None:
            self.commit()
            self.db.close()
            self.db = None


class Judge:
    """Asks the judge from a synchronous caller: :meth:`ask` answers from the cache at once or sends the question to
    the client's event loop (a thread of its own), :meth:`answers` returns the verdicts that came back.

    ``ask`` never blocks; ``answers(block=True)`` waits for at least one while questions are in flight. A failure
    no retry can fix (a refused key, a wrong model, endpoints that never answered) is raised from ``answers``.
    """

    def __init__(
        self,
        api_addr: str | None,
        model: str,
        api_key: str | None,
        endpoints: list[Endpoint] | None,
        requests: RequestSettings,
        cache_dir: str | Path,
        max_concurrent: int = 32,
        max_tokens: int = 1024,
    ):
        self.model, self.requests, self.max_tokens = model, requests, max_tokens
        self.client = ChatClient(
            api_addr, model, api_key, requests, max_connections=max_concurrent, endpoints=endpoints
        )
        self.cache = VerdictCache(cache_dir)
        self.in_flight = 0
        self.asked = self.from_cache = self.answered = 0
        self.error_causes: dict[str, int] = {}
        self._max_concurrent = max_concurrent
        self._answers: queue.Queue = queue.Queue()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="judge-client", daemon=True)

    def __enter__(self) -> Judge:
        self._thread.start()
        self._call(self._open())
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._call(self._close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
            self._loop.close()
            self.cache.close()

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _open(self) -> None:
        self._slots = asyncio.Semaphore(self._max_concurrent)
        self._tasks: set[asyncio.Task] = set()
        await self.client.__aenter__()

    async def _close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.client.__aexit__()

    def ask(self, ticket, problem: str, gold: str, generation: str) -> JudgeVerdict | None:
        """The cached verdict on this generation, or None: then the question is sent and its verdict comes back
        from :meth:`answers` with ``ticket``."""
        key = cache_key(self.model, problem, gold, generation)
        cached = self.cache.get(key)
        if cached is not None:
            self.from_cache += 1
            return cached
        self.asked += 1
        self.in_flight += 1
        messages = judge_messages(problem, gold, generation)
        self._loop.call_soon_threadsafe(self._start, ticket, key, messages)
        return None

    def _start(self, ticket, key: str, messages: list[dict]) -> None:
        task = self._loop.create_task(self._question(ticket, key, messages))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _question(self, ticket, key: str, messages: list[dict]) -> None:
        async with self._slots:
            try:
                completion = await self.client.complete(messages, max_tokens=self.max_tokens, temperature=0.0)
            except (RetryableError, BudgetExhausted) as e:
                cause = getattr(e, "cause", "budget")
                if cause in ("connect_failed", "connection") and not self.answered and self.client.fleet.unreachable(2):
                    error = EndpointUnreachable(
                        f"cannot reach the judge endpoint {self.client.url}: {e}. Is the server running and the "
                        "address right (--judge-api-addr, or the judge connection)?"
                    )
                    self._answers.put((ticket, key, error))
                    return
                verdict = JudgeVerdict(ERROR, f"{cause}: {self.client.redact(str(e))[:300]}")
            except FatalRequestError as e:
                self._answers.put((ticket, key, e))
                return
            except Exception as e:  # anything else must still come back, or the caller would wait for ever
                self._answers.put((ticket, key, e))
                return
            else:
                self.answered += 1
                usage = completion.usage
                verdict = JudgeVerdict(
                    parse_verdict(completion.text),
                    completion.text.strip()[-300:],
                    False,
                    usage.get("prompt_tokens") or 0,
                    usage.get("completion_tokens") or 0,
                )
            self._answers.put((ticket, key, verdict))

    def answers(self, block: bool) -> list[tuple[object, JudgeVerdict]]:
        """The verdicts that came back (``block``: wait for one if questions are in flight), cached as they come."""
        got = []
        while self.in_flight:
            try:
                ticket, key, verdict = self._answers.get(block=block and not got, timeout=None)
            except queue.Empty:
                break
            self.in_flight -= 1
            if isinstance(verdict, BaseException):
                raise verdict
            if verdict.verdict == ERROR:
                cause = verdict.reply.split(":", 1)[0]
                self.error_causes[cause] = self.error_causes.get(cause, 0) + 1
            self.cache.put(key, verdict)
            got.append((ticket, verdict))
        return got

    def stats(self) -> dict:
        return {
            "requests_sent": self.client.requests_sent,
            "retries": dict(self.client.retries),
            "error_causes": dict(self.error_causes),
            "prompt_tokens": self.client.prompt_tokens,
            "completion_tokens": self.client.completion_tokens,
            "cost_estimate": round(self.client.cost, 6),
            "endpoints": self.client.fleet.stats() if self.client.fleet else {},
            "cache": str(self.cache.path),
        }
