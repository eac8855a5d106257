"""A local OpenAI-compatible teacher that replays stored completions: the demo's endpoint, and the tests' and
benchmarks' server. No model runs: each request's problem is looked up and its stored text is returned.

Usage:
    python -m distilled_plugins.devtools.teacher_server \\
        --answers ../shared/data/math_train/math12k_train_with_solutions.jsonl \\
        --problem-field problem --answer-field solution --port 39876

Faults can be injected, for tests and benchmarks: a scripted sequence (``faults``, consumed one per request) or
a random share of requests (``fault_rate``) answered 429 or 500.

As a judge for rejection sampling (``--judge-verdicts``), it replies to ``distilled_plugins.reject_sampling.judge``'s prompt with
fixed verdicts by problem (and, where given, by the generation's answer part): ``judge_answer``.

Like a provider, it can enforce a rate limit (``rate_limit_rpm``: a bucket of one second's worth of requests, or
with ``rate_limit_per_second`` a count per wall-clock second; over it, 429 with ``Retry-After`` and
``x-ratelimit-*`` headers, which every reply carries), and it streams
server-sent events when a request asks ``stream: true`` (the ``cut_stream`` fault drops the connection midway).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from aiohttp import web

from distilled_plugins.generate.config import DEFAULT_PROMPT_TEMPLATE

logger = logging.getLogger(__name__)

FAULTS = (
    "ok",
    "429",
    "429_exhausted",  # 429 saying x-ratelimit-remaining-requests: 0
    "500",
    "503",
    "400",
    "401",
    "404",
    "bad_json",
    "truncated",
    "slow",
    "reasoning",
    "length",
    "null_content",
    "no_choices",
    "cut_stream",
)


class RequestBucket:
    """The server side of a rate limit: ``rpm`` requests a minute, at most one second's worth at once."""

    def __init__(self, rpm: float):
        self.rpm, self.rate = rpm, rpm / 60.0
        self.capacity = max(1.0, self.rate)
        self.level, self.stamp = self.capacity, time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.level >= 1:
            self.level -= 1
            return True
        return False

    def headers(self) -> dict[str, str]:
        reset = max(0.0, (self.capacity - self.level) / self.rate)
        return {
            "x-ratelimit-limit-requests": f"{self.rpm:g}",
            "x-ratelimit-remaining-requests": str(int(self.level)),
            "x-ratelimit-reset-requests": f"{reset:.3f}s",
        }


class SecondWindow(RequestBucket):
    """A rate limit counted per wall-clock second, as many providers count it: ``rpm / 60`` requests in each
    second of the clock, the next one refused until the second turns."""

    def __init__(self, rpm: float):
        super().__init__(rpm)
        self.second, self.count = int(time.time()), 0

    def take(self) -> bool:
        second = int(time.time())
        if second != self.second:
            self.second, self.count = second, 0
        if self.count < self.rate:
            self.count += 1
            self.level = self.rate - self.count  # what headers() reports as remaining
            return True
        self.level = 0.0
        return False

    def headers(self) -> dict[str, str]:
        reset = max(0.0, self.second + 1 - time.time())
        return {
            "x-ratelimit-limit-requests": f"{self.rpm:g}",
            "x-ratelimit-remaining-requests": str(int(self.level)),
            "x-ratelimit-reset-requests": f"{reset:.3f}s",
        }


class ReplayTeacher:
    """Answers ``/v1/chat/completions`` with ``answer(problem)``; counts requests and records what it saw."""

    def __init__(
        self,
        answer: Callable[[str], str],
        *,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        faults: Iterable[str] = (),
        fault_rate: float = 0.0,
        seed: int = 0,
        delay: float = 0.0,
        retry_after: str | None = "1",
        api_key: str | None = None,
        rate_limit_rpm: float | None = None,
        rate_limit_per_second: bool = False,
        stream_chunks: int = 8,
    ):
        self.answer = answer
        prefix, _, suffix = prompt_template.replace("{{", "{").replace("}}", "}").partition("{prompt}")
        self.prefix, self.suffix = prefix, suffix
        self.faults = collections.deque(faults)
        self.fault_rate, self.rng = fault_rate, random.Random(seed)
        self.delay, self.retry_after, self.api_key = delay, retry_after, api_key
        self.requests = 0
        self.refused = 0  # requests over the rate limit
        self.request_times: list[float] = []  # monotonic arrival time of each request
        limit = SecondWindow if rate_limit_per_second else RequestBucket
        self.limit = limit(rate_limit_rpm) if rate_limit_rpm else None
        self.stream_chunks = stream_chunks
        self.seen_authorization: list[str | None] = []
        self.seen_problems: list[str] = []
        self.seen_payloads: list[dict] = []

    def problem_of(self, content: str) -> str:
        if content.startswith(self.prefix) and content.endswith(self.suffix):
            return content[len(self.prefix) : len(content) - len(self.suffix)]
        return content

    def _next_fault(self) -> str:
        if self.faults:
            return self.faults.popleft()
        if self.fault_rate and self.rng.random() < self.fault_rate:
            return self.rng.choice(("429", "500"))
        return "ok"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        self.request_times.append(time.monotonic())
        self.seen_authorization.append(request.headers.get("Authorization"))
        fault = self._next_fault()
        if self.api_key and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.json_response({"error": {"message": "Incorrect API key provided", "code": 401}}, status=401)
        limit_headers = {}
        if self.limit is not None:
            allowed = self.limit.take()
            limit_headers = self.limit.headers()
            if not allowed:
                self.refused += 1
                fault = "429"
        if fault in ("429", "429_exhausted"):
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            headers.update(limit_headers)
            if fault == "429_exhausted":
                headers["x-ratelimit-remaining-requests"] = "0"
            return web.json_response({"error": {"message": "rate limited", "code": 429}}, status=429, headers=headers)
        if fault == "500":
            return web.json_response({"error": {"message": "internal error", "code": 500}}, status=500)
        if fault == "503":
            return web.Response(text="Service Unavailable: upstream overloaded", status=503)
        if fault in ("400", "401", "404"):
            return web.json_response({"error": {"message": f"injected {fault}"}}, status=int(fault))
        payload = await request.json()
        self.seen_payloads.append(payload)
        problem = self.problem_of(payload["messages"][-1]["content"])
        self.seen_problems.append(problem)
        if fault == "slow" or self.delay:
            await asyncio.sleep(self.delay or 2.0)
        text = self.answer(problem)
        message = {"role": "assistant", "content": text}
        if fault == "reasoning":
            message = {"role": "assistant", "reasoning_content": "Let me think.\n", "content": text}
        if fault == "null_content":
            message = {"role": "assistant", "content": None}
        usage = {
            "prompt_tokens": len(problem) // 4,
            "completion_tokens": len(text) // 4,
            "total_tokens": (len(problem) + len(text)) // 4,
        }
        if payload.get("stream"):
            return await self._stream(request, payload, message, fault, usage, limit_headers)
        body = json.dumps(
            {
                "id": f"replay-{self.requests}",
                "object": "chat.completion",
                "model": payload.get("model"),
                "choices": [
                    {"index": 0, "message": message, "finish_reason": "length" if fault == "length" else "stop"}
                ],
                "usage": usage,
            }
        ).encode()
        if fault == "no_choices":
            body = json.dumps({"id": f"replay-{self.requests}", "object": "chat.completion", "usage": usage}).encode()
        if fault == "bad_json":
            return web.Response(body=body[: len(body) // 2], content_type="application/json")
        if fault == "truncated":
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            response.content_length = len(body)
            await response.prepare(request)
            await response.write(body[: len(body) // 2])
            request.transport.close()
            return response
        return web.Response(body=body, content_type="application/json", headers=limit_headers)

    async def _stream(self, request, payload, message, fault, usage, headers) -> web.StreamResponse:
        """Server-sent events as OpenAI sends them: role, reasoning and content deltas, finish, usage, [DONE]."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", **headers})
        await response.prepare(request)

        def event(delta: dict | None, finish: str | None = None, usage_chunk: dict | None = None) -> bytes:
            chunk = {"id": f"replay-{self.requests}", "object": "chat.completion.chunk", "model": payload.get("model")}
            chunk["choices"] = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
            if usage_chunk is not None:
                chunk["usage"] = usage_chunk
            return b"data: " + json.dumps(chunk).encode() + b"\n\n"

        events = [event({"role": "assistant", "content": ""})] if message.get("content") is not None else []
        if message.get("reasoning_content"):
            events.append(event({"reasoning_content": message["reasoning_content"]}))
        text = message.get("content")
        if text:
            step = max(1, -(-len(text) // self.stream_chunks))
            events.extend(event({"content": text[i : i + step]}) for i in range(0, len(text), step))
        events.append(event({}, "length" if fault == "length" else "stop"))
        if (payload.get("stream_options") or {}).get("include_usage"):
            events.append(event(None, usage_chunk=usage))
        events.append(b"data: [DONE]\n\n")
        for i, data in enumerate(events):
            if fault == "cut_stream" and i == len(events) // 2:
                request.transport.close()  # a proxy dropping the connection midway
                return response
            await response.write(data)
            await asyncio.sleep(0)
        await response.write_eof()
        return response

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.handle)
        return app


class ServerThread:
    """Runs an aiohttp application on 127.0.0.1 in a background thread; ``url`` is its base URL."""

    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0):
        self._app, self.host, self.port = app, host, port
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        self._loop = asyncio.new_event_loop()
        runner = web.AppRunner(self._app, access_log=None)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, self.host, self.port)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self._stop = asyncio.Event()
        self._ready.set()
        self._loop.run_until_complete(self._stop.wait())
        self._loop.run_until_complete(runner.cleanup())
        self._loop.close()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the local server did not start within 30 s")
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


def load_answers(path: str | Path, problem_field: str, answer_field: str) -> dict[str, str]:
    from distilled_plugins.core.io import load_rows, require_columns

    rows = load_rows(path)
    require_columns(rows, [problem_field, answer_field], path)
    return {row[problem_field]: row[answer_field] for row in rows if row.get(answer_field)}


def replay_answer(answers: dict[str, str], fallback: str | None = None) -> Callable[[str], str]:
    """An ``answer`` function over stored texts; unknown problems get ``fallback`` (or a reply without answer)."""

    def answer(problem: str) -> str:
        found = answers.get(problem)
        if found is not None:
            return found
        return fallback if fallback is not None else "I could not find this problem, so I give no answer."

    return answer


def judge_prompt_fields(content: str) -> dict[str, str] | None:
    """The problem, gold and answer a judge prompt (``distilled_plugins.reject_sampling.judge.JUDGE_PROMPT``) shows, or None.

    >>> from distilled_plugins.reject_sampling.judge import judge_messages
    >>> judge_prompt_fields(judge_messages("2+2?", "4", "so four")[0]["content"])
    {'problem': '2+2?', 'gold': '4', 'answer': 'so four'}
    """
    from distilled_plugins.reject_sampling.judge import JUDGE_PROMPT

    pattern = re.escape(JUDGE_PROMPT)
    for name in ("problem", "gold", "answer"):
        pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>.*?)", 1)
    found = re.fullmatch(pattern, content, re.DOTALL)
    return found.groupdict() if found else None


def judge_answer(verdicts: dict, default: str = "no") -> Callable[[str], str]:
    """A judge's reply function for :class:`ReplayTeacher`: ``verdicts`` maps a problem, or (problem, answer part),
    to ``"yes"``/``"no"`` (replied with a ``Verdict:`` line) or to any other text (replied as it is: a malformed
    reply); others get ``default``."""

    def answer(content: str) -> str:
        fields = judge_prompt_fields(content)
        if fields is None:
            return "This is not a question I was asked to judge."
        verdict = verdicts.get((fields["problem"], fields["answer"]), verdicts.get(fields["problem"], default))
        if verdict in ("yes", "no"):
            return f"Comparing the final answer with the reference answer.\nVerdict: {verdict}"
        return verdict

    return answer


def load_judge_verdicts(path: str | Path) -> dict:
    """``{(problem, answer part): verdict}`` from a JSONL of ``problem``, ``generation`` and ``verdict``, or
    ``{problem: verdict}`` for lines without ``generation``."""
    from distilled_plugins.core.io import iter_jsonl
    from distilled_plugins.reject_sampling.judge import answer_part

    verdicts = {}
    for _, row in iter_jsonl(path):
        key = (row["problem"], answer_part(row["generation"])) if "generation" in row else row["problem"]
        verdicts[key] = row["verdict"]
    return verdicts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m distilled_plugins.devtools.teacher_server", description=__doc__.split("\n")[0]
    )
    p.add_argument("--answers", help="file with problems and the texts to replay")
    p.add_argument(
        "--judge-verdicts",
        help="act as rejection sampling's judge instead: JSONL of problem, generation (optional) and verdict",
    )
    p.add_argument("--problem-field", default="problem")
    p.add_argument("--answer-field", default="solution")
    p.add_argument("--prompt-template", default=DEFAULT_PROMPT_TEMPLATE)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=39876)
    p.add_argument("--fault-rate", type=float, default=0.0, help="share of requests answered 429 or 500")
    p.add_argument("--retry-after", default=None, help="Retry-After header sent with 429 replies")
    p.add_argument("--delay", type=float, default=0.0, help="seconds to wait before each reply")
    p.add_argument("--rate-limit-rpm", type=float, default=None, help="requests per minute allowed (then 429)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if bool(args.answers) == bool(args.judge_verdicts):
        p.error("give --answers (a teacher) or --judge-verdicts (a judge)")
    if args.judge_verdicts:
        answers = load_judge_verdicts(args.judge_verdicts)
        reply = judge_answer(answers)
    else:
        answers = load_answers(args.answers, args.problem_field, args.answer_field)
        reply = replay_answer(answers)
    teacher = ReplayTeacher(
        reply,
        prompt_template=args.prompt_template,
        fault_rate=args.fault_rate,
        delay=args.delay,
        retry_after=args.retry_after,
        rate_limit_rpm=args.rate_limit_rpm,
    )
    logger.info("replaying %d stored answers on http://%s:%d/v1/chat/completions", len(answers), args.host, args.port)
    web.run_app(teacher.app(), host=args.host, port=args.port, access_log=None, print=None)
    return 0


def wait_for_port(port: int, timeout: float = 60.0) -> None:
    """Wait until a server started in another process accepts connections on 127.0.0.1:``port``."""
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"no server answered on 127.0.0.1:{port} within {timeout:g} s")


if __name__ == "__main__":
    raise SystemExit(main())
