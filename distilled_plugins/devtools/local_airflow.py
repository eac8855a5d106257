"""A private Airflow 3 on this machine (SQLite, LocalExecutor): the demo's and the end-to-end tests' Airflow.

Starts ``api-server``, ``scheduler``, ``dag-processor`` and ``triggerer`` as processes of the project's
environment, with their own ``AIRFLOW_HOME`` and logs, and drives Airflow through its REST API (v2).
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
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
SERVICES = ("api-server", "scheduler", "dag-processor", "triggerer")
FINAL_STATES = ("success", "failed")
TASK_FINISHED_STATES = ("success", "failed", "skipped", "upstream_failed", "removed")


class AirflowError(RuntimeError):
    pass


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


def ti_name(ti: dict) -> str:
    """A task instance of the REST API as the UI names it: ``task_id``, or ``task_id[map_index]`` when mapped."""
    return ti["task_id"] + (f"[{ti['map_index']}]" if ti["map_index"] >= 0 else "")


def worker_hostname() -> str:
    """``[core] hostname_callable`` of the workers ``start_worker`` starts: the hostname it was given, as each
    worker would report its own host's name on its own machine."""
    import socket

    return os.environ.get("DISTILL_WORKER_HOSTNAME") or socket.getfqdn()


def login_settings(users: str, passwords_file: Path) -> dict:
    """The auth manager settings of docker/docker-compose.yml: the Simple auth manager, its users, the file its
    generated passwords go to (created by the API server on its first start), no login-free admin."""
    return {
        "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": users,
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords_file),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
    }


def celery_settings(database_url: str, broker_url: str) -> dict:
    """Airflow configuration (as environment) shared by every service and worker of a Celery deployment."""
    from cryptography.fernet import Fernet

    return {
        "AIRFLOW__CELERY__BROKER_URL": broker_url,
        "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + database_url,
        "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
        "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
    }


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


class LocalAirflow:
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
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
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
        done = subprocess.run(
            [str(Path(sys.executable).parent / "airflow"), *args], env=self.env, capture_output=True, text=True
        )
        if check and done.returncode:
            raise AirflowError(f"airflow {' '.join(args)} failed:\n{done.stderr[-2000:]}")
        return done

    def start(self, timeout: float = 180) -> LocalAirflow:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "logs").mkdir(exist_ok=True)
        self.passwords_file.parent.mkdir(mode=0o700, exist_ok=True)
        self.airflow("db", "migrate")
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

    def health(self) -> dict:
        """``/api/v2/monitor/health``: each component's ``status`` (``healthy``/``unhealthy``) and last heartbeat."""
        return self.api("GET", "/api/v2/monitor/health")

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
        group (a task process in a session of its own) so nothing of this Airflow is left running."""
        import psutil

        self._stopping.set()
        if self._watchdog:
            self._watchdog.join()
        descendants = []
        for proc in self.processes.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                descendants += psutil.Process(proc.pid).children(recursive=True)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.processes.values():
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

    def __enter__(self) -> LocalAirflow:
        try:
            return self.start()
        except BaseException:  # interrupted or failed while starting: the services already started stop too
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- REST API ----
    def password(self, user: str) -> str:
        """The password the Simple auth manager generated for ``user`` (``users`` given)."""
        return json.loads(self.passwords_file.read_text())[user]

    def login(self, user: str, password: str | None = None) -> str:
        """Log in (``POST /auth/token``, as docker/README.md shows) and send the token with every later call."""
        body = {"username": user, "password": password if password is not None else self.password(user)}
        self.token = self.api("POST", "/auth/token", body, token="")["access_token"]  # the login goes anonymously
        return self.token

    def api(self, method: str, path: str, body: dict | None = None, token: str | None = None):
        """One REST call with this instance's token (``token=""``: anonymously); HTTP errors raise AirflowError
        with the status code in the message (``HTTP 401: ...``)."""
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"}
        token = self.token if token is None else token
        if token:
            headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        for attempt in range(1, 4):
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    text = response.read().decode()
                break
            except urllib.error.HTTPError as e:
                raise AirflowError(f"{method} {path}: HTTP {e.code}: {e.read().decode()[:2000]}") from None
            except (TimeoutError, urllib.error.URLError):
                # a loaded machine (training on every core) can stall the API server for a while; reads are safe
                # to repeat, writes are not
                if method != "GET" or attempt == 3:
                    raise
                logger.info("GET %s timed out; asking again", path)
        return json.loads(text) if text else None

    def wait_for_dag(self, dag_id: str, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                dag = self.api("GET", f"/api/v2/dags/{dag_id}")
                if dag.get("is_paused"):
                    self.api("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})
                return dag
            except AirflowError:
                if time.monotonic() > deadline:
                    raise AirflowError(
                        f"DAG {dag_id} did not appear within {timeout:g} s; see {self.home}/logs/dag-processor.log"
                    ) from None
                time.sleep(2)

    def _writing(self, what: str, method: str, path: str, body: dict) -> dict:
        """A REST call that writes, asked again when SQLite was locked for a moment by the scheduler on a loaded
        machine (HTTP 500 "Database error"): the transaction was rolled back, so asking again writes once."""
        for attempt in range(1, 4):
            try:
                return self.api(method, path, body)
            except AirflowError as e:
                if "HTTP 500" not in str(e) or "Database error" not in str(e) or attempt == 3:
                    raise
                logger.info("%s hit a locked database; asking again", what)
                time.sleep(2 * attempt)
        raise AssertionError("unreachable")

    def trigger(self, dag_id: str, conf: dict) -> str:
        path = f"/api/v2/dags/{dag_id}/dagRuns"
        return self._writing(f"triggering {dag_id}", "POST", path, {"logical_date": None, "conf": conf})["dag_run_id"]

    def set_run_state(self, dag_id: str, run_id: str, state: str) -> dict:
        """Mark a run ``failed`` or ``success`` (the UI's "Mark as")."""
        path = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}"
        return self._writing(f"marking {run_id} {state}", "PATCH", path, {"state": state})

    def set_task_state(self, dag_id: str, run_id: str, task_id: str, state: str) -> dict:
        """Mark a task instance ``failed`` or ``success`` (the UI's "Mark as" on a task)."""
        path = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}"
        return self._writing(f"marking {task_id} {state}", "PATCH", path, {"new_state": state})

    def clear(self, dag_id: str, run_id: str, task_ids: list, downstream: bool = False) -> list[dict]:
        """Clear task instances of a run as the UI's *Clear* does (a mapped task's every index, or ``[task_id,
        map_index]``; ``downstream``: with its downstream tasks); returns the task instances cleared."""
        body = {
            "dry_run": False,
            "dag_run_id": run_id,
            "task_ids": task_ids,
            "include_downstream": downstream,
            "only_failed": False,
            "reset_dag_runs": True,
        }
        path = f"/api/v2/dags/{dag_id}/clearTaskInstances"
        return self._writing(f"clearing {task_ids} of {run_id}", "POST", path, body)["task_instances"]

    def runs(self, dag_id: str) -> list[dict]:
        return self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns?order_by=-start_date")["dag_runs"]

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        return self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 900, progress: bool = True) -> str:
        started, shown = time.monotonic(), {}
        deadline = started + timeout
        while True:
            run = self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")
            if progress:
                tis = self.task_instances(dag_id, run_id)
                finished = sum(t["state"] in TASK_FINISHED_STATES for t in tis)
                for ti in tis:
                    if ti["state"] and shown.get(name := ti_name(ti)) != ti["state"]:
                        shown[name] = ti["state"]
                        seconds = time.monotonic() - started
                        logger.info(
                            "%-22s %-10s (%d/%d tasks finished, %.0f s)", name, ti["state"], finished, len(tis), seconds
                        )
            if run["state"] in FINAL_STATES:
                return run["state"]
            if time.monotonic() > deadline:
                raise AirflowError(f"run {run_id} of {dag_id} did not finish within {timeout:g} s")
            time.sleep(2)

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value", map_index: int = -1):
        path = (
            f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}"
            f"?map_index={map_index}&deserialize=true"
        )
        return self.api("GET", path)["value"]
