"""OpenAI-compatible chat-completions client with retries; generation and evaluation both use it.

One request is one :meth:`ChatClient.attempt`; it either returns a :class:`Completion` or raises
:class:`RetryableError` (with the cause and the server's ``Retry-After``) or :class:`FatalRequestError`.
Callers that can keep working while a request waits (generation) schedule the retry themselves with
:meth:`RetryPolicy.delay`; simple callers use :meth:`ChatClient.complete`, which sleeps between attempts.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import aiohttp
from yarl import URL

API_KEY_ENV = "OPENAI_API_KEY"
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

    def __init__(self, cause: str, detail: str, retry_after: float | None = None):
        super().__init__(f"{cause}: {detail}")
        self.cause = cause
        self.retry_after = retry_after


class FatalRequestError(Exception):
    """A request that will fail however often it is repeated (bad key, wrong model, unreachable endpoint)."""


@dataclass
class RetryPolicy:
    """How failed requests are repeated. Delays grow exponentially with jitter, never below ``Retry-After``."""

    max_attempts: int = 12
    backoff_base: float = 0.1
    backoff_max: float = 60.0
    connect_timeout: float = 10.0
    request_timeout: float = 1800.0

    def __post_init__(self):
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.backoff_base < 0 or self.backoff_max < 0:
            raise ValueError("backoff_base and backoff_max must not be negative")
        if self.connect_timeout <= 0 or self.request_timeout <= 0:
            raise ValueError("connect_timeout and request_timeout must be positive")

    def delay(self, failed_attempts: int, retry_after: float | None = None) -> float:
        """Seconds to wait after ``failed_attempts`` failures, at least the server's ``retry_after``.

        'Full jitter' (uniform up to an exponentially growing ceiling): clients that failed together spread
        out, and a sporadic fault costs little wall time. With the defaults the ceilings are 0.1, 0.2, 0.4, ...
        60 s: about two minutes of patience on average before a request is given up.
        """
        ceiling = min(self.backoff_max, self.backoff_base * 2 ** (failed_attempts - 1))
        return max(random.uniform(0, ceiling), retry_after or 0.0)


def base_url(api_addr: str) -> str:
    """``host:port`` or a full ``http(s)://`` URL (with or without ``/v1``) as a base URL without ``/v1``."""
    addr = api_addr.strip()
    if not addr:
        raise ValueError("the API address is empty; give host:port or an http(s):// URL")
    if "://" not in addr:
        addr = f"http://{addr}"
    url = URL(addr)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"invalid API address {api_addr!r}; give host:port or an http(s):// URL")
    text = str(url).rstrip("/")
    return text[: -len("/v1")] if text.endswith("/v1") else text


def completion_text(message: dict) -> str:
    """The generation text; DeepSeek-R1 style ``reasoning_content`` becomes a ``<think>`` block."""
    content = message.get("content") or ""
    reasoning = message.get("reasoning_content")
    if reasoning:
        return f"<think>\n{reasoning}</think>\n{content}"
    return content


def _retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass
class ChatClient:
    """Async client for ``{base_url}/v1/chat/completions``; use as ``async with ChatClient(...) as client``."""

    api_addr: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    max_connections: int = 100
    key_env: str = API_KEY_ENV
    retries: Counter = field(default_factory=Counter)
    requests_sent: int = 0

    def __post_init__(self):
        self.url = f"{base_url(self.api_addr)}/v1/chat/completions"
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ChatClient:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.max_connections, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(
                total=None, connect=self.policy.connect_timeout, sock_connect=self.policy.connect_timeout
            ),
            headers=headers,
        )
        return self

    async def __aexit__(self, *exc) -> None:
        await self._session.close()

    def redact(self, text: str) -> str:
        """Text with the API key replaced, for anything that may reach a log or an error."""
        return text.replace(self.api_key, "***") if self.api_key else text

    async def attempt(self, messages: list[dict], **sampling) -> Completion:
        """Send one request; raise :class:`RetryableError` or :class:`FatalRequestError` on failure."""
        payload = json.dumps({"model": self.model, "messages": messages, **sampling})
        self.requests_sent += 1
        try:
            async with asyncio.timeout(self.policy.request_timeout):
                async with self._session.post(self.url, data=payload) as resp:
                    body = await resp.read()
                    status = resp.status
                    retry_after = resp.headers.get("Retry-After")
        except TimeoutError:
            raise RetryableError("timeout", f"no complete reply within {self.policy.request_timeout:g} s") from None
        except aiohttp.ClientPayloadError as e:
            raise RetryableError("truncated_body", self.redact(str(e))) from None
        except aiohttp.ClientConnectionError as e:
            raise RetryableError("connection", self.redact(str(e) or type(e).__name__)) from None
        if status != 200:
            detail = self.redact(body[:500].decode("utf-8", "replace").strip())
            if status in (408, 409, 425, 429) or status >= 500:
                raise RetryableError(f"http_{status}", detail, _retry_after_seconds(retry_after))
            hint = _FATAL_HINTS.get(status, "the server refused the request").format(key_env=self.key_env)
            raise FatalRequestError(
                f"HTTP {status} from {self.url} (model {self.model!r}): {hint}. Server said: {detail}"
            )
        try:
            reply = json.loads(body)
            choice = reply["choices"][0]
            text = completion_text(choice["message"])
        except (ValueError, KeyError, IndexError, TypeError) as e:
            snippet = self.redact(body[:200].decode("utf-8", "replace"))
            raise RetryableError("bad_json", f"{type(e).__name__} in reply {snippet!r}") from None
        return Completion(text, choice.get("finish_reason"), reply.get("usage") or {})

    async def complete(self, messages: list[dict], **sampling) -> Completion:
        """One completion with retries, sleeping between attempts; raises the last error when they run out."""
        for failed in range(1, self.policy.max_attempts + 1):
            try:
                return await self.attempt(messages, **sampling)
            except RetryableError as e:
                if failed == self.policy.max_attempts:
                    raise
                self.retries[e.cause] += 1
                await asyncio.sleep(self.policy.delay(failed, e.retry_after))
        raise AssertionError("unreachable")
