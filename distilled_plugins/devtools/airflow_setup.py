"""What a :class:`~distilled_plugins.devtools.local_airflow.LocalAirflow` is made of before its services start:
its configuration as environment (real logins as docker/docker-compose.yml configures them, a Celery deployment's
shared settings), a new home's ``airflow.cfg`` and its metadata database (a new SQLite one copied from one migrated
once per process)."""

from __future__ import annotations

import atexit
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


class AirflowError(RuntimeError):
    pass


def login_settings(users: str, passwords_file: Path) -> dict:
    """The auth manager settings of docker/docker-compose.yml: the Simple auth manager, its users, the file its
    generated passwords go to (created by the API server on its first start), no login-free admin."""
    return {
        "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": users,
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords_file),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
    }


def shared_secrets() -> dict:
    """New secrets every process of one Airflow must share, as environment: the fernet key, the JWT secret the API
    server checks tasks' tokens with, the API's secret key."""
    from cryptography.fernet import Fernet

    return {
        "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
        "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
    }


def celery_settings(database_url: str, broker_url: str) -> dict:
    """Airflow configuration (as environment) shared by every service and worker of a Celery deployment."""
    return {
        "AIRFLOW__CELERY__BROKER_URL": broker_url,
        "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + database_url,
        **shared_secrets(),
    }


def write_config(home: Path) -> None:
    """Give a new Airflow home an ``airflow.cfg`` holding :func:`shared_secrets`. Without one, the services starting
    at once would each write their own with their own generated secrets, and a task's token be refused ("Invalid
    auth token"). A home that has one (the demo's, started again) keeps it."""
    path = home / "airflow.cfg"
    if path.exists():
        return
    sections = []
    for name, value in shared_secrets().items():  # AIRFLOW__<SECTION>__<KEY>
        _, section, key = name.lower().split("__")
        sections.append(f"[{section}]\n{key} = {value}\n")
    header = "# written by distilled_plugins.devtools.airflow_setup; the rest of the configuration is environment\n"
    path.write_text(header + "\n".join(sections))
    path.chmod(0o600)


def airflow_cli(env: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(Path(sys.executable).parent / "airflow"), *args], env=env, capture_output=True, text=True
    )
    if check and done.returncode:
        raise AirflowError(f"airflow {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return done


_MIGRATED: list[Path] = []  # the database migrated_sqlite made in this process


def migrated_sqlite(env: dict) -> Path:
    """A new SQLite metadata database after ``airflow db migrate`` (``env``: a LocalAirflow's, for the rest of the
    configuration), made once per process: each new SQLite Airflow starts from a copy."""
    if not _MIGRATED:
        folder = Path(tempfile.mkdtemp(prefix="distill-airflow-db-"))
        atexit.register(shutil.rmtree, folder, True)
        database = folder / "airflow.db"
        url = f"sqlite:///{database}"
        airflow_cli({**env, "AIRFLOW_HOME": str(folder), "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": url}, "db", "migrate")
        _MIGRATED.append(database)
    return _MIGRATED[0]
