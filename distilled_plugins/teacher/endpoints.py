"""The teacher fleet: several OpenAI-compatible endpoints behind one client, with health, rate limits and stats.

:class:`Fleet` hands each request an endpoint (:meth:`Fleet.acquire`) and hears how it went
(:meth:`Fleet.succeeded`, :meth:`Fleet.failed`, :meth:`Fleet.released`):

- choice: among the endpoints that may send now, the one with the fewest requests in flight per unit of weight;
- health: an endpoint that cannot be connected to, or fails ``FAIL_STREAK`` times in a row (5xx, timeouts, cut
  connections), is taken out for a cool-down that doubles at each trip; after it, one probe request at a time
  goes there until one succeeds;
- rate limits: per endpoint, a request bucket (``max_rpm``) and a token bucket (``max_tpm``; a request costs its
  prompt estimate plus ``max_tokens`` until the reply's ``usage`` corrects it), both learnt from the server's
  ``x-ratelimit-limit-*`` headers when not given, and lowered to the server's ``x-ratelimit-remaining-*``;
  without a bucket, ``remaining = 0`` pauses the whole endpoint until ``x-ratelimit-reset-*`` (1 s if absent),
  and a 429 with ``Retry-After`` pauses it that long.

>>> parse_endpoints("a:1, https://b/v1", "k", None)[1].url
'https://b'
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email.utils
import re
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field

from yarl import URL

FAIL_STREAK = 5  # consecutive failures (5xx, timeouts, cut connections) that take an endpoint out; at 5% random
# failures a streak of 5 comes by chance once in 3 million requests, so only a sick endpoint is taken out
# Until an endpoint without a configured rate limit first answers, it gets one request at a time for up to this
# long: its first reply's x-ratelimit-* headers tell the limit before a burst of max_concurrent requests hits it.
FIRST_CONTACT_SECONDS = 2.0
# Many providers count requests per wall-clock second (20 a second for 1,200 a minute). A token bucket of a second's
# worth can put its burst and a second's refill into one such second (up to twice the limit; 2-5% of the requests
# refused at 1,200 RPM), and a bucket small enough never to do so loses every late wake-up for good. So requests are
# counted in a sliding window (RequestWindow): a second's worth in any (1 + REQUEST_MARGIN) seconds, 5% below the
# limit; a request sent late is made up at once, and arrivals would need 50 ms of jitter to crowd one second.
REQUEST_MARGIN = 0.05
_HEALTH_FAILURES = ("connect_failed", "connection", "timeout", "stream_cut", "truncated_body")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_DURATIONS = re.compile(rf"(?:{_DURATION.pattern})+")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass
class Endpoint:
    """One replica or provider key: address, its own key, weight and optional per-endpoint rate limits."""

    addr: str
    api_key: str | None = field(default=None, repr=False)
    weight: float = 1.0
    max_rpm: float | None = None
    max_tpm: float | None = None

    def __post_init__(self):
        self.url = base_url(self.addr)
        if self.weight <= 0:
            raise ValueError(f"endpoint {self.url}: weight must be positive, got {self.weight}")
        for name in ("max_rpm", "max_tpm"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"endpoint {self.url}: {name} must be positive, got {value}")


def parse_endpoints(api_addr: str | None, api_key: str | None, extra: list[dict] | None) -> list[Endpoint]:
    """Endpoints from a comma-separated ``api_addr`` (all with ``api_key``) and/or a list of dicts.

    Each dict has ``addr`` (or ``url``), and optionally ``api_key``, ``weight``, ``max_rpm``, ``max_tpm``;
    a dict without its own key uses ``api_key``.
    """
    endpoints = [Endpoint(a.strip(), api_key) for a in (api_addr or "").split(",") if a.strip()]
    for i, item in enumerate(extra or []):
        if isinstance(item, str):
            item = {"addr": item}
        if not isinstance(item, dict) or not (item.get("addr") or item.get("url")):
            raise ValueError(f"endpoint #{i + 1} {item!r} needs an 'addr' (host:port or http(s):// URL)")
        unknown = set(item) - {"addr", "url", "api_key", "weight", "max_rpm", "max_tpm"}
        if unknown:
            raise ValueError(
                f"endpoint #{i + 1}: unknown field(s) {', '.join(sorted(unknown))}; "
                "known: addr, api_key, weight, max_rpm, max_tpm"
            )
        endpoints.append(
            Endpoint(
                item.get("addr") or item["url"],
                item.get("api_key") or api_key,
                float(item.get("weight", 1.0)),
                float(item["max_rpm"]) if item.get("max_rpm") else None,
                float(item["max_tpm"]) if item.get("max_tpm") else None,
            )
        )
    if not endpoints:
        raise ValueError("no teacher endpoint given; pass --api-addr host:port[,host:port...]")
    urls = [e.url for e in endpoints]
    if len(set(urls)) != len(urls):
        raise ValueError(f"an endpoint is listed twice: {', '.join(urls)}")
    return endpoints


def base_url(api_addr: str) -> str:
    """``host:port`` or a full ``http(s)://`` URL (with or without ``/v1``) as a base URL without ``/v1``.

    >>> base_url("localhost:8000"), base_url("https://api.example.com/v1/")
    ('http://localhost:8000', 'https://api.example.com')
    """
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


def parse_duration(value: str | None) -> float | None:
    """Seconds in a ``Retry-After`` or rate-limit reset header: ``"1.5"``, ``"20ms"``, ``"6m0s"``, an HTTP date.

    >>> parse_duration("6m0s"), parse_duration("20ms"), parse_duration("1.5"), parse_duration("x")
    (360.0, 0.02, 1.5, None)
    >>> parse_duration("Wed, 21 Oct 2015 07:28:00 GMT")  # a date in the past: no wait
    0.0
    """
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    if _DURATIONS.fullmatch(value):
        return sum(float(n) * _UNITS[u] for n, u in _DURATION.findall(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class TokenBucket:
    """Refills at ``rate`` per second up to ``capacity``; may go into debt so that one cost above capacity passes."""

    def __init__(self, per_minute: float, burst_seconds: float = 1.0):
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * burst_seconds)
        self.level = self.capacity
        self.stamp = time.monotonic()

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_time(self, cost: float, now: float) -> float:
        """Seconds until ``cost`` may be taken (0: now)."""
        self.refill(now)
        need = min(cost, self.capacity)
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def take(self, cost: float, now: float) -> None:
        self.refill(now)
        self.level -= cost

    def limit_to(self, remaining: float, now: float) -> None:
        """The server says only ``remaining`` is left: hold no more than that."""
        self.refill(now)
        self.level = min(self.level, remaining)

    def give_back(self, amount: float) -> None:
        self.level = min(self.capacity, self.level + amount)

    def drain(self, now: float) -> None:
        self.refill(now)
        self.level = min(self.level, 0.0)


class RequestWindow:
    """At most ``capacity`` requests in any ``period`` seconds: a second's worth of ``per_minute`` (at least one)
    in ``(1 + REQUEST_MARGIN)`` seconds' time (see ``REQUEST_MARGIN``). Keeps the last ``capacity`` send times.

    >>> window = RequestWindow(1200)
    >>> window.capacity, window.period
    (20, 1.05)
    >>> for i in range(20):
    ...     window.take(1, 10.0 + i / 100)
    >>> round(window.wait_time(1, 10.5), 3), round(window.wait_time(1, 11.05), 3)
    (0.55, 0.0)
    """

    def __init__(self, per_minute: float):
        self.rate = per_minute / 60.0
        self.capacity = max(1, int(self.rate))
        self.period = round((1 + REQUEST_MARGIN) * self.capacity / self.rate, 6)
        self.sent: collections.deque[float] = collections.deque(maxlen=self.capacity)

    def wait_time(self, cost: float, now: float) -> float:
        """Seconds until one more request may go (0: now)."""
        if len(self.sent) < self.capacity:
            return 0.0
        return max(0.0, self.sent[0] + self.period - now)

    def take(self, cost: float, now: float) -> None:
        self.sent.append(now)

    def limit_to(self, remaining: float, now: float) -> None:
        """The server says only ``remaining`` requests are left: count the difference as sent now."""
        free = sum(1 for t in self.sent if t <= now - self.period) + self.capacity - len(self.sent)
        for _ in range(int(free - max(0.0, remaining))):
            self.sent.append(now)

    def drain(self, now: float) -> None:
        self.limit_to(0, now)


class EndpointState:
    """What the fleet knows of one endpoint: load, health, limits and stats."""

    def __init__(self, endpoint: Endpoint):
        self.endpoint = endpoint
        self.in_flight = 0
        self.requests = 0
        self.ok = 0
        self.failures: Counter = Counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.latencies = array("d")  # seconds per successful request (8 bytes each)
        self.streak = 0  # consecutive failures
        self.trips = 0  # times taken out since the last success
        self.times_out = 0  # times taken out in all
        self.out_until = 0.0  # cool-down end
        self.probing = False  # after a cool-down: one request at a time until one succeeds
        self.paused_until = 0.0  # rate-limit pause (429, remaining 0)
        self.heard = False  # an outcome (a reply's headers) has come back
        self.first_sent: float | None = None
        self.requests_bucket = RequestWindow(endpoint.max_rpm) if endpoint.max_rpm else None
        self.tokens_bucket = TokenBucket(endpoint.max_tpm) if endpoint.max_tpm else None

    @property
    def url(self) -> str:
        return self.endpoint.url

    def wait_time(self, cost: float, now: float) -> float:
        """Seconds until this endpoint may take a request of ``cost`` tokens (0: now)."""
        if self.probing and self.in_flight:
            return float("inf")  # the probe's outcome decides; released() wakes the waiters
        wait = max(0.0, self.out_until - now, self.paused_until - now)
        if not self.heard and self.in_flight and not self.requests_bucket and not self.tokens_bucket:
            wait = max(wait, self.first_sent + FIRST_CONTACT_SECONDS - now)
        if self.requests_bucket:
            wait = max(wait, self.requests_bucket.wait_time(1, now))
        if self.tokens_bucket:
            wait = max(wait, self.tokens_bucket.wait_time(cost, now))
        return wait

    def stats(self) -> dict:
        ordered = sorted(self.latencies)

        def pct(q: float) -> float | None:
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3) if ordered else None

        return {
            "requests": self.requests,
            "ok": self.ok,
            "failures": dict(self.failures),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "latency_p50_s": pct(0.50),
            "latency_p95_s": pct(0.95),
            "times_taken_out": self.times_out,
        }


class Fleet:
    """Chooses an endpoint for each request and keeps each endpoint's health, rate limits and stats."""

    def __init__(self, endpoints: list[Endpoint], cooldown_base: float = 1.0, cooldown_max: float = 60.0):
        self.states = [EndpointState(e) for e in endpoints]
        self.cooldown_base, self.cooldown_max = cooldown_base, cooldown_max
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self.rate_limit_pauses = 0

    async def acquire(self, cost: float) -> EndpointState:
        """Wait for an endpoint that may send a request of ``cost`` tokens now; count it in flight there.

        Waiters queue on one lock (first come, first served), so only the head of the queue sleeps on the
        rate limits and a thousand waiting requests cost no CPU.
        """
        async with self._lock:
            while True:
                now = time.monotonic()
                best, best_score, soonest = None, None, float("inf")
                for state in self.states:
                    wait = state.wait_time(cost, now)
                    if wait > 0:
                        soonest = min(soonest, wait)
                        continue
                    score = (state.in_flight / state.endpoint.weight, -state.endpoint.weight)
                    if best is None or score < best_score:
                        best, best_score = state, score
                if best is not None:
                    best.in_flight += 1
                    best.requests += 1
                    if best.first_sent is None:
                        best.first_sent = now
                    if best.requests_bucket:
                        best.requests_bucket.take(1, now)
                    if best.tokens_bucket:
                        best.tokens_bucket.take(cost, now)
                    return best
                self._changed.clear()
                with contextlib.suppress(TimeoutError):  # woken by a release, or when the soonest wait is over
                    await asyncio.wait_for(self._changed.wait(), timeout=min(soonest, 5.0))

    def _release(self, state: EndpointState) -> None:
        state.in_flight -= 1
        state.heard = True
        self._changed.set()

    def released(self, state: EndpointState) -> None:
        """The request ended without an outcome to learn from (cancelled, or refused for a reason of its own)."""
        self._release(state)

    def succeeded(self, state: EndpointState, latency: float, usage: dict, cost: float, headers) -> None:
        state.ok += 1
        state.streak = state.trips = 0
        state.probing = False
        state.latencies.append(latency)
        prompt, completion = usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0
        state.prompt_tokens += prompt
        state.completion_tokens += completion
        if state.tokens_bucket and (prompt or completion):
            state.tokens_bucket.give_back(cost - (usage.get("total_tokens") or prompt + completion))
        self._learn_limits(state, headers)
        self._release(state)

    def failed(self, state: EndpointState, cause: str, headers=None, retry_after: float | None = None) -> None:
        """A failed attempt: 429 pauses the endpoint; connection refusals, 5xx streaks and timeouts take it out."""
        state.failures[cause] += 1
        now = time.monotonic()
        if cause == "http_429":
            # a refusal that says how long (Retry-After, or nothing remaining until the reset) pauses the whole
            # endpoint; a bare 429 (an overloaded server, not a quota) only delays its own request
            if retry_after is not None:
                self._pause(state, now, retry_after)
            self._learn_limits(state, headers)
        elif cause in _HEALTH_FAILURES or cause.startswith("http_5"):
            state.streak += 1
            if cause == "connect_failed" or state.probing or state.streak >= FAIL_STREAK:
                self._take_out(state, now)
        self._release(state)

    def _take_out(self, state: EndpointState, now: float) -> None:
        if now < state.out_until:
            return  # a request sent before it was taken out: no new evidence
        state.trips += 1
        state.times_out += 1
        cooldown = min(self.cooldown_max, self.cooldown_base * 2 ** (state.trips - 1))
        state.out_until = max(state.out_until, now + cooldown)
        state.probing = True
        state.streak = 0

    def _pause(self, state: EndpointState, now: float, seconds: float) -> None:
        if now + seconds > state.paused_until:
            state.paused_until = now + seconds
            self.rate_limit_pauses += 1
        if state.requests_bucket:
            state.requests_bucket.drain(now)

    def _learn_limits(self, state: EndpointState, headers) -> None:
        """Adopt the limits the server announces and pause when it says nothing is left."""
        if headers is None:
            return
        now = time.monotonic()
        for kind, attr in (("requests", "requests_bucket"), ("tokens", "tokens_bucket")):
            limit = _number(headers.get(f"x-ratelimit-limit-{kind}"))
            remaining = _number(headers.get(f"x-ratelimit-remaining-{kind}"))
            bucket = getattr(state, attr)
            if limit and bucket is None:
                bucket = RequestWindow(limit) if kind == "requests" else TokenBucket(limit)
                setattr(state, attr, bucket)
            if remaining is None:
                continue
            if bucket is not None:  # the server's count wins where it is lower (it saw requests this one did not)
                bucket.limit_to(remaining, now)
            elif remaining <= 0:
                reset = parse_duration(headers.get(f"x-ratelimit-reset-{kind}"))
                self._pause(state, now, reset if reset is not None else 1.0)

    def unreachable(self, min_trips: int) -> bool:
        """No endpoint has ever answered and each was taken out ``min_trips`` times: the addresses are wrong."""
        return all(s.ok == 0 and s.trips >= min_trips for s in self.states)

    def stats(self) -> dict:
        return {s.url: s.stats() for s in self.states}


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None
