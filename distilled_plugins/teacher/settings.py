"""How a stage talks to a teacher (or judge) endpoint: the API key's environment variable, retries and timeouts
(:class:`RetryPolicy`), and rate limits, streaming, prices and budget (:class:`RequestSettings`). Light (no HTTP
library): the DAG, the form and the operators read these fields without loading the client."""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass, fields

from distilled_plugins.core.settings import TEACHER, add_arguments, from_args, setting
from distilled_plugins.teacher.endpoints import Endpoint

API_KEY_ENV = "OPENAI_API_KEY"
# how the teacher is sampled and the student evaluated, open-r1's values (generate, evaluate and mf_generate)
TEMPERATURE, TOP_P = 0.6, 0.95


@dataclass(kw_only=True)
class EndpointSettings:
    """Where a stage's requests go: the same fields (flags, operator arguments) in generation and evaluation. A
    stage that needs another default says so with ``settings.redefault``."""

    api_addr: str | None = setting(
        None, help="host:port or http(s):// base URL; several separated by commas share the requests"
    )
    model: str | None = setting(None, help="model name sent to the endpoint")
    api_key: str | None = setting(None, help="the endpoints' API key (CLI: from --api-key-env)", cli=False, repr=False)
    endpoints: list[Endpoint] | None = setting(
        None, help="instead of api_addr: endpoints with their own keys, weights and limits", cli=False
    )
    max_concurrent: int = setting(64, help="requests in flight at once", minimum=1)


@dataclass(kw_only=True)
class Sampling:
    """How a model is sampled, in generation (the teacher) and evaluation (the student): the same fields."""

    temperature: float = setting(TEMPERATURE, help="sampling temperature (0: greedy)", minimum=0)
    top_p: float = setting(TOP_P, help="nucleus sampling top_p", minimum=0, maximum=1)


@dataclass
class RetryPolicy:
    """How failed requests are repeated. Delays grow exponentially with jitter, never below ``Retry-After``."""

    max_attempts: int = setting(
        12, help="attempts per request", minimum=1, title="Attempts per request", section=TEACHER
    )
    backoff_base: float = setting(0.1, help="first retry delay (s)", minimum=0)
    backoff_max: float = setting(
        60.0, help="longest retry delay, and longest cool-down of a failing endpoint (s)", minimum=0
    )
    connect_timeout: float = setting(10.0, help="seconds to open a connection", minimum=0.001)
    request_timeout: float = setting(
        1800.0,
        help="seconds for one whole request, reply included",
        minimum=1,
        title="Request timeout (s)",
        section=TEACHER,
    )

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


@dataclass
class RequestSettings(RetryPolicy):
    """Everything about sending requests, shared by generation and evaluation: retries and timeouts (from
    :class:`RetryPolicy`), rate limits, streaming, prices and budget. :meth:`add_arguments` makes the CLI flags
    of both stages from these fields, so a flag, its default and its help are written once."""

    max_rpm: float | None = setting(
        None,
        help="requests per minute allowed per endpoint",
        minimum=0,
        title="Requests per minute per endpoint",
        section=TEACHER,
    )
    max_tpm: float | None = setting(
        None,
        help="tokens per minute allowed per endpoint, prompt + max_tokens until the reply's usage",
        minimum=0,
        title="Tokens per minute per endpoint",
        section=TEACHER,
    )
    stream: bool = setting(
        False,
        help="stream replies (server-sent events): keeps minutes-long replies alive through proxies; a cut "
        "stream is retried",
        title="Stream replies",
        section=TEACHER,
    )
    price_per_mtok_in: float = setting(
        0.0, help="price per million prompt tokens", minimum=0, title="Price per million prompt tokens", section=TEACHER
    )
    price_per_mtok_out: float = setting(
        0.0,
        help="price per million completion tokens",
        minimum=0,
        title="Price per million completion tokens",
        section=TEACHER,
    )
    max_cost: float | None = setting(
        None,
        help="stop this run cleanly (resumable) once its estimated cost reaches this",
        minimum=0,
        title="Budget per run",
        section=TEACHER,
    )

    def __post_init__(self):
        super().__post_init__()
        for name in ("max_rpm", "max_tpm", "max_cost"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.price_per_mtok_in < 0 or self.price_per_mtok_out < 0:
            raise ValueError("prices must not be negative")
        if self.max_cost is not None and not self.priced:
            raise ValueError(
                f"max_cost {self.max_cost:g} needs a price to estimate the cost; give price_per_mtok_in and/or "
                "price_per_mtok_out (CLI: --price-per-mtok-in/--price-per-mtok-out)"
            )

    @classmethod
    def of(cls, policy: RetryPolicy | None) -> RequestSettings:
        """``policy`` itself if it already is a :class:`RequestSettings`, else one with its retry fields."""
        if isinstance(policy, cls):
            return policy
        return cls(**{f.name: getattr(policy, f.name) for f in fields(RetryPolicy)}) if policy else cls()

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add ``--max-attempts``, ``--request-timeout``, ``--max-rpm``, ``--stream``, ... to ``parser``."""
        add_arguments(parser.add_argument_group("teacher requests"), cls)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RequestSettings:
        return from_args(cls, args)

    @property
    def priced(self) -> bool:
        return bool(self.price_per_mtok_in or self.price_per_mtok_out)

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.price_per_mtok_in + completion_tokens * self.price_per_mtok_out) / 1e6
