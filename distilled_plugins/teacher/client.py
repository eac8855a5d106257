"""OpenAI-compatible chat-completions client with retries; generation and evaluation both use it.

One request is one :meth:`ChatClient.attempt`; it either returns a :class:`Completion` or raises
:class:`RetryableError` (with the cause and the server's ``Retry-After``) or :class:`FatalRequestError`.
Callers that can keep working while a request waits (generation) schedule the retry themselves with
:meth:`RetryPolicy.delay`; simple callers use :meth:`ChatClient.complete`, which sleeps between attempts.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import aiohttp

from distilled_plugins.core.errors import FatalRequestError
from distilled_plugins.teacher.endpoints import Endpoint, EndpointState, Fleet, parse_duration, parse_endpoints
from distilled_plugins.teacher.settings import API_KEY_ENV, RequestSettings, RetryPolicy

_FATAL_HINTS = {
    400: "the server rejected the request; check the model name, max tokens, temperature and top_p",
    401: "the API key was refused; set a valid key (CLI: environment variable {key_env}; Airflow: the connection's password)",
    403: "the API key is not allowed to use this model or endpoint; check the key and the model name",
    404: "no such endpoint or model; the address must serve /v1/chat/completions and the model name must exist",
    422: "the server could not process the request; check the model name and sampling settings",
}


class Completion(NamedTuple):
    text: str
    finish_reason: str | None
    usage: dict


class RetryableError(Exception):
    """A failed attempt worth repeating: ``cause`` names it for the stats (``http_429``, ``timeout``, ...)."""

    def __init__(self, cause: str, detail: str, retry_after: float | None = None, headers=None):
        super().__init__(f"{cause}: {detail}")
        self.cause = cause
        self.retry_after = retry_after
        self.headers = headers  # the reply's headers, for the rate-limit adaptation


class BudgetExhausted(Exception):
    """The run's estimated cost reached ``max_cost``: no new request is sent."""


def completion_text(message: dict) -> str:
    """The generation text; DeepSeek-R1 style ``reasoning_content`` becomes a ``<think>`` block."""
    content = message.get("content") or ""
    reasoning = message.get("reasoning_content")
    if reasoning:
        return f"<think>\n{reasoning}</think>\n{content}"
    return content


def completion_of(reply: dict) -> Completion:
    """The :class:`Completion` of a decoded chat-completions reply (online, or a Batch API result's body);
    :class:`RetryableError` when it has no choice or no content."""
    choices = reply.get("choices") if isinstance(reply, dict) else None
    if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
        raise RetryableError("no_choices", f"reply without choices: {json.dumps(reply)[:200]!r}")
    choice = choices[0]
    message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    if message.get("content") is None:
        raise RetryableError(
            "null_content", f"reply with null or missing content (finish_reason {choice.get('finish_reason')!r})"
        )
    return Completion(completion_text(message), choice.get("finish_reason"), reply.get("usage") or {})


def _estimate_prompt_tokens(messages: list[dict]) -> int:
    """About four characters a token: the rate-limit charge until the reply's usage says the truth."""
    return sum(len(m.get("content") or "") for m in messages) // 4 + 8


@dataclass
class ChatClient:
    """Async client for ``{base_url}/v1/chat/completions`` on one or several endpoints (a :class:`Fleet`).

    ``api_addr`` may list several addresses separated by commas; ``endpoints`` gives them with their own keys,
    weights and limits instead. ``policy`` is a :class:`RetryPolicy` or a full :class:`RequestSettings`.
    Use as ``async with ChatClient(...) as client``.
    """

    api_addr: str | None
    model: str
    api_key: str | None = field(default=None, repr=False)
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    max_connections: int = 100
    key_env: str = API_KEY_ENV
    retries: Counter = field(default_factory=Counter)
    requests_sent: int = 0
    endpoints: list[Endpoint] | None = None

    def __post_init__(self):
        self.settings = RequestSettings.of(self.policy)
        self.endpoints = self.endpoints or parse_endpoints(self.api_addr, self.api_key, None)
        for endpoint in self.endpoints:  # the flags are every endpoint's default limits
            endpoint.max_rpm = endpoint.max_rpm or self.settings.max_rpm
            endpoint.max_tpm = endpoint.max_tpm or self.settings.max_tpm
        self.url = ", ".join(f"{e.url}/v1/chat/completions" for e in self.endpoints)
        self.fleet: Fleet | None = None
        self.prompt_tokens = self.completion_tokens = 0
        self._session: aiohttp.ClientSession | None = None

    @property
    def cost(self) -> float:
        """Estimated spend of this client's successful requests, from the reply usage and the prices."""
        return self.settings.cost(self.prompt_tokens, self.completion_tokens)

    @property
    def budget_exhausted(self) -> bool:
        return self.settings.max_cost is not None and self.cost >= self.settings.max_cost

    def _check_budget(self) -> None:
        if self.budget_exhausted:
            raise BudgetExhausted(f"estimated cost {self.cost:.4f} reached max_cost {self.settings.max_cost:g}")

    async def __aenter__(self) -> ChatClient:
        # an endpoint's cool-down grows like the retry backoff: 10 x backoff_base, doubling, at most backoff_max
        cooldown = min(self.settings.backoff_max, max(0.01, 10 * self.settings.backoff_base))
        self.fleet = Fleet(self.endpoints, cooldown, max(cooldown, self.settings.backoff_max))
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.max_connections, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(
                total=None, connect=self.settings.connect_timeout, sock_connect=self.settings.connect_timeout
            ),
            headers={"Content-Type": "application/json"},
        )
        return self

    async def __aexit__(self, *exc) -> None:
        await self._session.close()

    def redact(self, text: str) -> str:
        """Text with the API keys replaced, for anything that may reach a log or an error."""
        for key in {e.api_key for e in self.endpoints if e.api_key}:
            text = text.replace(key, "***")
        return text

    async def attempt(self, messages: list[dict], **sampling) -> Completion:
        """Send one request to the fleet's choice of endpoint; raise :class:`RetryableError` or
        :class:`FatalRequestError` on failure. Waits (holding no connection) while every endpoint is rate
        limited or cooling down."""
        body = {"model": self.model, "messages": messages, **sampling}
        if self.settings.stream:
            body.update(stream=True, stream_options={"include_usage": True})
        payload = json.dumps(body)
        cost = _estimate_prompt_tokens(messages) + (sampling.get("max_tokens") or 0)
        self._check_budget()
        state = await self.fleet.acquire(cost)
        try:
            self._check_budget()  # it may have been reached while this request waited for an endpoint
        except BudgetExhausted:
            state.requests -= 1  # not sent after all
            self.fleet.released(state)
            raise
        self.requests_sent += 1
        started = time.monotonic()
        try:
            completion, headers = await self._send(state, payload)
        except RetryableError as e:
            self.fleet.failed(state, e.cause, e.headers, e.retry_after)
            raise
        except BaseException:
            self.fleet.released(state)
            raise
        self.fleet.succeeded(state, time.monotonic() - started, completion.usage, cost, headers)
        self.prompt_tokens += completion.usage.get("prompt_tokens") or 0
        self.completion_tokens += completion.usage.get("completion_tokens") or 0
        return completion

    async def _send(self, state: EndpointState, payload: str) -> tuple[Completion, object]:
        url = f"{state.url}/v1/chat/completions"
        key = state.endpoint.api_key
        headers = {"Authorization": f"Bearer {key}"} if key else None
        stream = self.settings.stream
        try:
            async with asyncio.timeout(self.settings.request_timeout):
                async with self._session.post(url, data=payload, headers=headers) as resp:
                    if resp.status != 200:
                        self._refuse(url, resp.status, await resp.read(), resp.headers)
                    if stream:
                        return await self._read_stream(resp), resp.headers
                    return self._parse(await resp.read()), resp.headers
        except TimeoutError:
            raise RetryableError(
                "timeout", f"{url}: no complete reply within {self.settings.request_timeout:g} s"
            ) from None
        except aiohttp.ClientConnectorError as e:
            raise RetryableError("connect_failed", f"{url}: {self.redact(str(e) or type(e).__name__)}") from None
        except aiohttp.ClientPayloadError as e:
            raise RetryableError("stream_cut" if stream else "truncated_body", self.redact(str(e))) from None
        except aiohttp.ClientConnectionError as e:
            cause = "stream_cut" if stream else "connection"
            raise RetryableError(cause, f"{url}: {self.redact(str(e) or type(e).__name__)}") from None

    def _refuse(self, url: str, status: int, body: bytes, headers) -> None:
        detail = self.redact(body[:500].decode("utf-8", "replace").strip())
        if status in (408, 409, 425, 429) or status >= 500:
            raise RetryableError(f"http_{status}", detail, parse_duration(headers.get("Retry-After")), headers)
        hint = _FATAL_HINTS.get(status, "the server refused the request").format(key_env=self.key_env)
        raise FatalRequestError(f"HTTP {status} from {url} (model {self.model!r}): {hint}. Server said: {detail}")

    def _parse(self, body: bytes) -> Completion:
        try:
            reply = json.loads(body)
            choices = reply.get("choices")
        except (ValueError, AttributeError) as e:
            snippet = self.redact(body[:200].decode("utf-8", "replace"))
            raise RetryableError("bad_json", f"{type(e).__name__} in reply {snippet!r}") from None
        if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
            raise RetryableError(
                "no_choices", f"reply without choices: {self.redact(body[:200].decode('utf-8', 'replace'))!r}"
            )
        return completion_of(reply)

    async def _read_stream(self, resp: aiohttp.ClientResponse) -> Completion:
        """Merge a server-sent-event stream's deltas; a stream that ends before its last chunk is ``stream_cut``."""
        reasoning, content = [], []
        finish, usage, done, saw_content = None, {}, False, False
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue  # blank separators, comments (": keep-alive"), event: lines
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                break
            try:
                chunk = json.loads(data)
            except ValueError:
                raise RetryableError(
                    "bad_json", f"undecodable stream chunk {self.redact(data[:200].decode('utf-8', 'replace'))!r}"
                ) from None
            if not isinstance(chunk, dict):
                continue
            if chunk.get("error"):
                raise RetryableError("stream_error", self.redact(json.dumps(chunk["error"])[:300]))
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                if delta.get("reasoning_content"):
                    reasoning.append(delta["reasoning_content"])
                if delta.get("content") is not None:
                    saw_content = True
                    content.append(delta["content"])
                finish = choice.get("finish_reason") or finish
        if not done and finish is None:
            raise RetryableError("stream_cut", "the stream ended before its last chunk; its partial text is dropped")
        if not saw_content:
            raise RetryableError("null_content", f"stream without content (finish_reason {finish!r})")
        message = {"content": "".join(content), "reasoning_content": "".join(reasoning)}
        return Completion(completion_text(message), finish, usage)

    async def complete(self, messages: list[dict], **sampling) -> Completion:
        """One completion with retries, sleeping between attempts; raises the last error when they run out."""
        for failed in range(1, self.settings.max_attempts + 1):
            try:
                return await self.attempt(messages, **sampling)
            except RetryableError as e:
                if failed == self.settings.max_attempts:
                    raise
                self.retries[e.cause] += 1
                await asyncio.sleep(self.settings.delay(failed, e.retry_after))
        raise AssertionError("unreachable")
