"""Hooks: where the operators' I/O with the outside world lives."""

from __future__ import annotations

from typing import NamedTuple

from airflow.sdk import BaseHook

from distilled_plugins.core.settings import coerce
from distilled_plugins.teacher.batch_api import BatchAPI, BatchState
from distilled_plugins.teacher.endpoints import Endpoint, parse_endpoints
from distilled_plugins.teacher.settings import RequestSettings

# request settings (RequestSettings' fields) a connection's extra may give for all its endpoints; the operator's
# own values win where given, and the built-in defaults apply where neither gives one
# name -> what the DAG's form says an empty field means (each is a field of the form and an operator argument)
CONNECTION_SETTINGS: dict[str, str] = {
    "max_rpm": "from the connection, else learnt from the server",
    "max_tpm": "from the connection, else learnt from the server",
    "stream": "from the connection, else {default}",
    "request_timeout": "from the connection, else {default}",
    "price_per_mtok_in": "from the connection, else no estimate",
    "price_per_mtok_out": "from the connection, else no estimate",
    "max_cost": "from the connection, else no budget",
}


class TeacherFleet(NamedTuple):
    endpoints: list[Endpoint]
    settings: dict  # subset of CONNECTION_SETTINGS found in the connection's extra


class TeacherEndpointHook(BaseHook):
    """One or several OpenAI-compatible endpoints from an Airflow Connection.

    The connection's host and port give the address, its schema the protocol (``http`` unless ``https``), and its
    password the API key. Its ``extra`` may add endpoints and settings (API keys in ``extra`` are masked in logs
    like the password, Airflow treating ``api_key`` as a sensitive name)::

        {"endpoints": [{"addr": "10.0.0.2:8000", "weight": 2},
                       {"addr": "https://api.provider.example/v1", "api_key": "sk-...", "max_rpm": 1200}],
         "max_rpm": 600, "max_tpm": 2000000, "price_per_mtok_in": 0.55, "price_per_mtok_out": 2.19,
         "request_timeout": 3600, "stream": true}

    An endpoint without its own key uses the password; ``max_rpm``/``max_tpm`` at the top are every endpoint's
    default limits.
    """

    conn_name_attr = "teacher_conn_id"
    default_conn_name = "teacher_default"
    conn_type = "http"
    hook_name = "OpenAI-compatible teacher endpoint"

    def __init__(self, teacher_conn_id: str = default_conn_name, **kwargs):
        super().__init__(**kwargs)
        self.teacher_conn_id = teacher_conn_id

    def get_endpoint(self) -> tuple[str, str | None]:
        """``(base_url, api_key)`` of the connection's host."""
        conn = self.get_connection(self.teacher_conn_id)
        if not conn.host:
            raise ValueError(f"connection {self.teacher_conn_id!r} has no host; set host (and port) of the endpoint")
        host = conn.host if "://" in conn.host else f"{conn.schema or 'http'}://{conn.host}"
        return (f"{host}:{conn.port}" if conn.port else host), (conn.password or None)

    def get_fleet(self) -> TeacherFleet:
        """The connection's endpoints (its host first, if set, then ``extra["endpoints"]``) and settings."""
        conn = self.get_connection(self.teacher_conn_id)
        extra = conn.extra_dejson or {}
        listed = extra.get("endpoints") or []
        if not conn.host and not listed:
            raise ValueError(
                f"connection {self.teacher_conn_id!r} has no host and no extra 'endpoints'; set the endpoint's host "
                '(and port), or list endpoints in extra as {"endpoints": [{"addr": "host:port"}, ...]}'
            )
        if not isinstance(listed, list):
            raise ValueError(f"connection {self.teacher_conn_id!r}: extra 'endpoints' must be a list of objects")
        api_addr = self.get_endpoint()[0] if conn.host else None
        try:
            endpoints = parse_endpoints(api_addr, conn.password or None, listed)
        except ValueError as e:
            raise ValueError(f"connection {self.teacher_conn_id!r}: {e}") from None
        settings = {}
        for name in CONNECTION_SETTINGS:
            if extra.get(name) is None:
                continue
            value = extra[name]
            try:
                settings[name] = coerce(RequestSettings, name, value if isinstance(value, str) else str(value))
            except ValueError as e:
                raise ValueError(f"connection {self.teacher_conn_id!r}: extra {e}") from None
        return TeacherFleet(endpoints, settings)

    def get_batch_api(self, batch_folder: str) -> BatchAPI:
        """The Batch API client of the endpoint a shard's batches went to (recorded in ``batch_folder``), with that
        endpoint's key from the connection (the first endpoint's where the record names none yet)."""
        endpoints = self.get_fleet().endpoints
        url = BatchState.load(batch_folder).data.get("url") or endpoints[0].url
        key = next((e.api_key for e in endpoints if e.url == url), endpoints[0].api_key)
        return BatchAPI(url, key)


class JudgeEndpointHook(TeacherEndpointHook):
    """Rejection sampling's LLM judge: one or several OpenAI-compatible endpoints from an Airflow Connection, read
    as the teacher's (host, port, schema, password = API key; ``extra``: more endpoints, rate limits, prices)."""

    conn_name_attr = "judge_conn_id"
    default_conn_name = "judge_default"
    hook_name = "OpenAI-compatible judge endpoint (rejection sampling)"

    def __init__(self, judge_conn_id: str = default_conn_name, **kwargs):
        super().__init__(judge_conn_id, **kwargs)
