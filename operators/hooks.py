"""Hooks: where the operators' I/O with the outside world lives."""

from __future__ import annotations

from airflow.sdk import BaseHook


class TeacherEndpointHook(BaseHook):
    """An OpenAI-compatible endpoint from an Airflow Connection.

    The connection's host and port give the address, its schema the protocol (``http`` unless ``https``), and its
    password the API key. Airflow masks connection passwords in task logs; the key never leaves this hook except
    inside the request header.
    """

    conn_name_attr = "teacher_conn_id"
    default_conn_name = "teacher_default"
    conn_type = "http"
    hook_name = "OpenAI-compatible teacher endpoint"

    def __init__(self, teacher_conn_id: str = default_conn_name, **kwargs):
        super().__init__(**kwargs)
        self.teacher_conn_id = teacher_conn_id

    def get_endpoint(self) -> tuple[str, str | None]:
        """``(base_url, api_key)`` of the connection."""
        conn = self.get_connection(self.teacher_conn_id)
        if not conn.host:
            raise ValueError(f"connection {self.teacher_conn_id!r} has no host; set host (and port) of the endpoint")
        host = conn.host if "://" in conn.host else f"{conn.schema or 'http'}://{conn.host}"
        return (f"{host}:{conn.port}" if conn.port else host), (conn.password or None)
