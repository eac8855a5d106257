"""A private Airflow 3 on this machine (SQLite, LocalExecutor): the demo's and the end-to-end tests' Airflow.

Starts ``api-server``, ``scheduler``, ``dag-processor`` and ``triggerer`` as processes of the project's
environment, with their own ``AIRFLOW_HOME`` and logs, and drives Airflow through its REST API (v2: the methods of
:class:`~distilled_plugins.devtools.airflow_rest.AirflowRest`). Its configuration and a new database come from
:mod:`distilled_plugins.devtools.airflow_setup`.
The Celery variant (``database_url`` of a PostgreSQL, ``broker_url`` of a Redis: see
:mod:`distilled_plugins.devtools.cluster_services`) runs CeleryExecutor and Celery workers started with
:meth:`LocalAirflow.start_worker`, each under its own hostname and queues.
``variables`` are stored in the metadata database before any service starts (the deployment's configuration,
the Variable ``distill_deployment``: see ``operators/dag_helpers/deployment.py``), never in the services' environment.
``users`` (``"admin:admin"``) turns on real logins as ``docker/docker-compose.yml`` configures them: the Simple
auth manager generates each user's password into ``auth/passwords.json`` on the API server's first start, and
every REST call here sends the token of a login with it.
Nothing here imports Airflow: it talks to it the way a user's scripts do.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from distilled_plugins.devtools.airflow_rest import AirflowRest
from distilled_plugins.devtools.airflow_setup import (
    AirflowError,
    airflow_cli,
    celery_settings,
    login_settings,
    migrated_sqlite,
    write_config,
)

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
SERVICES = ("api-server", "scheduler", "dag-processor", "triggerer")


def port_is_free(port: int) -> bool:
    """Whether nothing listens on (or holds) ``port`` on 127.0.0.1 now."""
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A free port for a server started later (seconds later, after a database migration: Airflow's API server).

    Chosen below the kernel's ephemeral range: a port the kernel hands out (``bind(0)``) is also the local port of
    outgoing connections, which the services starting meanwhile open by the hundred, and one of them can take it
    before the server binds it ("address already in use"). Outside that range only another server can.
    """
    import random
    import socket

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        port = random.randint(10000, low - 1) if low > 10001 else random.randint(low, 65535)
        if port_is_free(port):
            return port
    with socket.socket() as s:  # no luck below the range: let the kernel choose
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_hostname() -> str:
    """``[core] hostname_callable`` of the workers ``start_worker`` starts: the hostname it was given, as each
    worker would report its own host's name on its own machine."""
    import socket

    return os.environ.get("DISTILL_WORKER_HOSTNAME") or socket.getfqdn()


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``'s process group and every descendant, also one in a session of its own (a task process)."""
    import psutil

    descendants = []
    with contextlib.suppress(psutil.NoSuchProcess):
        descendants = psutil.Process(proc.pid).children(recursive=True)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    for child in descendants:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    proc.wait()
    psutil.wait_procs(descendants, timeout=10)


class LocalAirflow(AirflowRest):
    def __init__(
        self,
        home: str | Path,
        port: int = 8080,
        dags_folder: str | Path = REPO / "dags",
        env: dict | None = None,
        database_url: str | None = None,
        broker_url: str | None = None,
        variables: dict | None = None,
        users: str | None = None,
        restart_exited: bool = False,
    ):
        """``broker_url`` given: CeleryExecutor with that broker, the database (``database_url``, which must then
        be PostgreSQL or MySQL) as Celery's result backend, a generated fernet key and JWT secret. ``variables``:
        Airflow Variables (values: JSON-able) written to the database before the services start. ``users``:
        ``name:role,...`` with generated passwords (the Simple auth manager, as in docker/), instead of no login.
        ``restart_exited``: a service or worker that exits by itself is started again (each in ``restarts``), as
        docker-compose.yml's ``restart: always`` does; one stopped by :meth:`kill_service` stays down until
        :meth:`start_service`."""
        self.home, self.port = Path(home).resolve(), port
        self.variables = dict(variables or {})
        self.users = users
        self.passwords_file = self.home / "auth" / "passwords.json"
        self.token: str | None = None
        self.url = f"http://127.0.0.1:{port}"
        database_url = database_url or f"sqlite:///{self.home}/airflow.db"
        if broker_url and database_url.startswith("sqlite"):
            raise AirflowError("CeleryExecutor needs a PostgreSQL or MySQL database_url, not SQLite")
        self.env = {
            **os.environ,
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": database_url,
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor" if broker_url else "LocalExecutor",
            **(celery_settings(database_url, broker_url) if broker_url else {}),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(Path(dags_folder).resolve()),
            **(
                login_settings(users, self.passwords_file)
                if users
                else {"AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True"}
            ),
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",  # new DAG files appear within seconds
            # parsed again within seconds: the seed watcher (an AssetWatcher's trigger) starts on a parse after the first
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
            "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.2",
            "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "1",
            # the workers' and triggerer's log servers (8793/8794 by default) get free ports too
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
            **(env or {}),
        }
        self.processes: dict[str, subprocess.Popen] = {}
        self.commands: dict[str, tuple[list[str], dict, Path]] = {}  # how to start each process again
        self.restart_exited = restart_exited
        self.restarts: list[dict] = []  # {"process", "exit_code", "at"} of each restart of one that exited
        self.killed_on_purpose: set[str] = set()  # by kill_service: down until start_service
        self._started: dict[str, float] = {}  # when each process was last started (monotonic)
        self._quick_exits: collections.Counter = collections.Counter()  # exits in a row soon after starting
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._watchdog: threading.Thread | None = None

    # ---- lifecycle ----
    def airflow(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return airflow_cli(self.env, *args, check=check)

    def _create_database(self) -> None:
        """Migrate the metadata database. A new SQLite one is a copy of one this process migrated before instead: a
        migration takes seconds, and the tests start over a dozen Airflows."""
        url = self.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
        path = Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None
        if path is None or path.exists():
            self.airflow("db", "migrate")
        else:
            shutil.copyfile(migrated_sqlite(self.env), path)

    def start(self, timeout: float = 180) -> LocalAirflow:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "logs").mkdir(exist_ok=True)
        self.passwords_file.parent.mkdir(mode=0o700, exist_ok=True)
        write_config(self.home)  # before any command or service reads it
        self._create_database()
        for key, value in self.variables.items():  # in the database, read alike by every service and worker
            self.airflow("variables", "set", key, value if isinstance(value, str) else json.dumps(value))
        for service in SERVICES:
            self.start_service(service)
        deadline = time.monotonic() + timeout
        while True:
            try:
                health = self.health()
                if health["scheduler"]["status"] == "healthy" and health["triggerer"]["status"] == "healthy":
                    if self.users:
                        self.login(self.users.split(":")[0])
                    if self.restart_exited:  # once up: a service failing to start at all is an error above
                        self._stopping.clear()
                        self._watchdog = threading.Thread(target=self._watch, daemon=True, name="airflow-restarts")
                        self._watchdog.start()
                    return self
            except (AirflowError, OSError, KeyError):
                pass
            for service, proc in self.processes.items():
                if proc.poll() is not None:
                    raise AirflowError(
                        f"airflow {service} exited ({proc.returncode}); see {self.home / 'logs' / (service + '.log')}"
                    )
            if time.monotonic() > deadline:
                raise AirflowError(f"Airflow did not become healthy within {timeout:g} s; logs in {self.home}/logs")
            time.sleep(1)

    def start_service(self, service: str) -> subprocess.Popen:
        """Start one of ``SERVICES`` (again, after :meth:`kill_service`), its output appended to its log."""
        with self._lock:
            if self.processes.get(service) and self.processes[service].poll() is None:
                raise AirflowError(f"airflow {service} is already running (pid {self.processes[service].pid})")
            self.killed_on_purpose.discard(service)
            cmd = [str(Path(sys.executable).parent / "airflow"), service]
            return self._spawn(service, cmd, self.env, self.home / "logs" / f"{service}.log")

    def _spawn(self, name: str, cmd: list[str], env: dict, log_path: Path) -> subprocess.Popen:
        with open(log_path, "ab") as log:  # the child keeps its own copy
            self.processes[name] = subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        self.commands[name] = (cmd, env, log_path)
        self._started[name] = time.monotonic()
        return self.processes[name]

    def kill_service(self, service: str) -> None:
        """SIGKILL a service and everything it started, as a lost host or an out-of-memory kill ends it: no clean
        shutdown, nothing it holds released. It stays down until :meth:`start_service`."""
        with self._lock:
            self.killed_on_purpose.add(service)
            _kill_tree(self.processes[service])

    def _watch(self) -> None:
        """Start again each process that exited by itself, as docker's ``restart: always`` does: at once, then, while
        it keeps exiting within a minute of its start, after a delay doubling each time (at most 60 s)."""
        due: dict[str, float] = {}  # exited process -> when to start it again
        while not self._stopping.wait(1):
            with self._lock:
                for name, proc in list(self.processes.items()):
                    if proc.poll() is None or name in self.killed_on_purpose or self._stopping.is_set():
                        continue
                    if name not in due:
                        logger.warning("%s exited (%s); starting it again (restart: always)", name, proc.returncode)
                        quick = time.monotonic() - self._started[name] < 60
                        self._quick_exits[name] = self._quick_exits[name] + 1 if quick else 0
                        due[name] = time.monotonic() + min(60, 2 ** self._quick_exits[name] - 1)
                    if time.monotonic() >= due[name]:
                        del due[name]
                        self._spawn(name, *self.commands[name])  # first: whoever sees it listed sees the new one
                        self.restarts.append({"process": name, "exit_code": proc.returncode, "at": time.time()})

    def start_worker(
        self,
        hostname: str,
        queues: list[str] | tuple[str, ...],
        concurrency: int = 2,
        timeout: float = 180,
        env: dict | None = None,
    ) -> subprocess.Popen:
        """Start a Celery worker (``airflow celery worker``) under ``hostname`` serving ``queues``; return once
        Celery says it is ready. Its log is ``logs/worker-<hostname>.log``. ``env`` adds to (or, with ``None``
        values, removes from) its environment: a host set up differently."""
        if self.env["AIRFLOW__CORE__EXECUTOR"] != "CeleryExecutor":
            raise AirflowError("start_worker needs the Celery variant (LocalAirflow(..., broker_url=...))")
        name = f"worker-{hostname}"
        log_path = self.home / "logs" / f"{name}.log"
        log_path.touch()
        offset = log_path.stat().st_size
        cmd = [str(Path(sys.executable).parent / "airflow"), "celery", "worker", "--queues", ",".join(queues)]
        cmd += ["--celery-hostname", hostname, "--concurrency", str(concurrency)]
        # each worker serves its task logs on its own port, as on its own host
        worker_env = {
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "distilled_plugins.devtools.local_airflow.worker_hostname",
            "DISTILL_WORKER_HOSTNAME": hostname,
            **(env or {}),
        }
        with self._lock:
            worker_env = {key: value for key, value in {**self.env, **worker_env}.items() if value is not None}
            proc = self._spawn(name, cmd, worker_env, log_path)
        deadline = time.monotonic() + timeout
        while True:
            with open(log_path, "rb") as f:
                f.seek(offset)
                if b" ready." in f.read():
                    return proc
            failure = None
            if proc.poll() is not None:
                failure = f"celery worker {hostname} exited ({proc.returncode}); see {log_path}"
            elif time.monotonic() > deadline:
                failure = f"celery worker {hostname} not ready within {timeout:g} s; see {log_path}"
            if failure:  # removed, so that nothing starts it again
                self.kill_worker(hostname)
                raise AirflowError(failure)
            time.sleep(1)

    def kill_worker(self, hostname: str) -> None:
        """Kill a worker and its running tasks as a lost host would: SIGKILL, no clean shutdown."""
        with self._lock:
            self.commands.pop(f"worker-{hostname}")
            _kill_tree(self.processes.pop(f"worker-{hostname}"))

    def stop(self) -> None:
        """SIGTERM each service's process group, SIGKILL it after 30 s, then kill any descendant that left the
        group (a task process in a session of its own) so nothing of this Airflow is left running.

        The triggerer's trigger runner is stopped first, and the triggerer then ends by itself: a SIGTERM that
        reaches the triggerer while its runner is exiting has it wait out a 10 s escalation delay for a runner
        already gone (Airflow 3.3), seconds lost on every stop after a seed watcher ran."""
        import psutil

        self._stopping.set()
        if self._watchdog:
            self._watchdog.join()
        descendants = []
        for proc in self.processes.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                descendants += psutil.Process(proc.pid).children(recursive=True)
        runner_stopped = self._stop_trigger_runner()
        for name, proc in self.processes.items():
            if proc.poll() is None and not (name == "triggerer" and runner_stopped):
                os.killpg(proc.pid, signal.SIGTERM)
        for name, proc in self.processes.items():
            if name == "triggerer" and runner_stopped:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
                if proc.poll() is None:  # it did not end by itself
                    os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for child in descendants:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        psutil.wait_procs(descendants, timeout=10)
        self.processes.clear()

    def _stop_trigger_runner(self) -> bool:
        """SIGTERM the triggerer's trigger runner (its child running the same command); whether there was one."""
        import psutil

        triggerer = self.processes.get("triggerer")
        if triggerer is None or triggerer.poll() is not None:
            return False
        try:
            main = psutil.Process(triggerer.pid)
            runners = [child for child in main.children() if child.cmdline() == main.cmdline()]
            for runner in runners:
                runner.terminate()
        except psutil.Error:
            return False
        return bool(runners)

    def __enter__(self) -> LocalAirflow:
        try:
            return self.start()
        except BaseException:  # interrupted or failed while starting: the services already started stop too
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
