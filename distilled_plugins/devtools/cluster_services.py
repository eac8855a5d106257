"""The servers a Celery deployment of Airflow needs, started privately on this machine: PostgreSQL (metadata
database and Celery result backend) and Redis (Celery broker).

Each runs from Debian's packages (``apt-get install -y postgresql redis-server``) on a free port of 127.0.0.1,
with its data in a fresh temporary folder and a generated password, and is removed on ``stop()``. PostgreSQL
refuses to run as root: as root, its commands run as the ``postgres`` system user (``runuser``).
Used by the cluster test (tests/cluster/) together with :class:`distilled_plugins.devtools.local_airflow.LocalAirflow`.
"""

from __future__ import annotations

import glob
import logging
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from distilled_plugins.devtools.local_airflow import free_port

logger = logging.getLogger(__name__)
# the private Celery cluster's routing (the Variable distill_deployment's queues and pools), as docker/ routes
DEPLOYMENT = {"cpu_queue": "cpu", "npu_queue": "npu", "teacher_pool": "teacher", "training_pool": "npu_training"}


class ServerUnavailable(RuntimeError):
    """A server's program is not installed on this machine."""


class ServerError(RuntimeError):
    pass


def _find(program: str, package: str, patterns: tuple[str, ...] = ()) -> str:
    for pattern in patterns:
        found = sorted(glob.glob(pattern))
        if found:
            return found[-1]
    path = shutil.which(program)
    if not path:
        raise ServerUnavailable(f"{program} not found: install it with `apt-get install -y {package}`")
    return path


class _Server:
    name = "server"

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.password = secrets.token_urlsafe(18)
        self.dir = Path(tempfile.mkdtemp(prefix=f"distill-{self.name}-"))
        self.process: subprocess.Popen | None = None
        self.log_path = self.dir / f"{self.name}.log"

    def _popen(self, cmd: list[str]) -> None:
        with open(self.log_path, "ab") as log:  # the child keeps its own copy
            self.process = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )

    def _wait(self, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise ServerError(f"{self.name} exited ({self.process.returncode}): {self._log_tail()}")
            try:
                ready()
                return
            except Exception as e:  # not listening yet
                if time.monotonic() > deadline:
                    raise ServerError(f"{self.name} not ready within {timeout:g} s ({e}): {self._log_tail()}") from None
            time.sleep(0.5)

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-1500:]
        except OSError:
            return ""

    stop_signal = signal.SIGTERM

    def _end_process(self, sig: int) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def _run(self, timeout: float) -> None:
        """Start the server's process on its existing data and configuration; return once it answers."""
        raise NotImplementedError

    def restart(self, down_seconds: float = 0.0, timeout: float = 120) -> None:
        """Stop the server as its orchestrator restarts it (the usual shutdown signal; clients' connections are
        cut), keep it down ``down_seconds``, start it again on the same port and data."""
        self._end_process(self.stop_signal)
        time.sleep(down_seconds)
        self._run(timeout)

    def stop(self) -> None:
        self._end_process(self.stop_signal)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        try:
            return self.start()
        except BaseException:  # a server that failed to become ready is not left running, nor its folder
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


class PostgresServer(_Server):
    """A private PostgreSQL cluster (``initdb`` + ``postgres``) with one database, ``airflow``, owned by ``airflow``."""

    name = "postgres"
    user = database = "airflow"

    def __init__(self, port: int | None = None):
        self.bin = Path(_find("initdb", "postgresql", ("/usr/lib/postgresql/*/bin/initdb",))).parent
        super().__init__(port)
        self.data = self.dir / "data"

    def _as_owner(self, cmd: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd

    def start(self, timeout: float = 120) -> PostgresServer:
        pwfile = self.dir / "pwfile"
        pwfile.write_text(self.password + "\n")
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
            shutil.chown(pwfile, "postgres", "postgres")
        init = subprocess.run(
            self._as_owner(
                [
                    str(self.bin / "initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    self.user,
                    f"--pwfile={pwfile}",
                    "--auth=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--no-sync",
                ]
            ),
            capture_output=True,
            text=True,
        )
        pwfile.unlink()
        if init.returncode:
            raise ServerError(f"initdb failed: {init.stderr[-1500:]}")
        self._run(timeout)
        logger.info("PostgreSQL on 127.0.0.1:%d (data in %s)", self.port, self.data)
        return self

    def _run(self, timeout: float) -> None:
        self._popen(
            self._as_owner(
                [
                    str(self.bin / "postgres"),
                    "-D",
                    str(self.data),
                    "-p",
                    str(self.port),
                    "-h",
                    "127.0.0.1",
                    "-k",
                    str(self.dir),
                    "-c",
                    "fsync=off",
                    "-c",
                    "max_connections=200",
                ]
            )
        )
        self._wait(self._create_database, timeout)

    def _connect(self, database: str):
        import psycopg2

        return psycopg2.connect(
            host="127.0.0.1", port=self.port, user=self.user, password=self.password, dbname=database, connect_timeout=5
        )

    def _create_database(self) -> None:
        conn = self._connect("postgres")
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,))
                if not cur.fetchone():
                    cur.execute(f"CREATE DATABASE {self.database}")
        finally:
            conn.close()

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the ``airflow`` database."""
        return f"postgresql+psycopg2://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    stop_signal = signal.SIGINT  # fast shutdown: open transactions are rolled back (SIGTERM waits for clients)


class RedisServer(_Server):
    """A private Redis (no persistence) with a generated password, given in a mode-0600 config file (never on the
    command line): the Celery broker."""

    name = "redis"

    def __init__(self, port: int | None = None):
        self.program = _find("redis-server", "redis-server")
        super().__init__(port)

    def start(self, timeout: float = 60) -> RedisServer:
        # the password goes through a config file only its owner reads: on the command line every user of the
        # machine would see it in `ps`
        config = self.dir / "redis.conf"
        config.touch(mode=0o600)
        config.write_text(
            "".join(
                f"{key} {value}\n"
                for key, value in (
                    ("port", self.port),
                    ("bind", "127.0.0.1"),
                    ("dir", self.dir),
                    ("save", '""'),
                    ("appendonly", "no"),
                    ("daemonize", "no"),
                    ("requirepass", self.password),
                )
            )
        )
        self._run(timeout)
        logger.info("Redis on 127.0.0.1:%d", self.port)
        return self

    def _run(self, timeout: float) -> None:
        # no persistence: a restart empties it, messages not yet delivered to a worker included
        self._popen([self.program, str(self.dir / "redis.conf")])
        self._wait(self._ping, timeout)

    def _ping(self) -> None:
        import redis

        redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=5).ping()

    @property
    def url(self) -> str:
        """Celery broker URL."""
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"
