"""What can be checked of the deployment without a Docker engine: the compose file's structure, that it configures
what the cluster test (tests/cluster/test_celery_cluster.py) runs, and the secret scripts, run for real."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml
from cryptography.fernet import Fernet

from distilled_plugins.devtools.cluster_services import DEPLOYMENT
from operators.dag_helpers.deployment import ROUTING_KEYS, parse
from tests.support import REPO, cli_env

DOCKER = REPO / "docker"
AIRFLOW_SERVICES = ("api-server", "scheduler", "dag-processor", "triggerer", "worker-cpu", "worker-npu")
SECRETS = ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "AIRFLOW_FERNET_KEY", "AIRFLOW_JWT_SECRET", "AIRFLOW_SECRET_KEY")


def compose() -> dict:
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())


def test_compose_file_describes_a_celery_deployment_with_a_cpu_and_an_npu_worker(tmp_path):
    services = compose()["services"]
    assert {"postgres", "redis", "airflow-init", *AIRFLOW_SERVICES} <= set(services)
    for name in (*AIRFLOW_SERVICES, "airflow-init"):
        service, env = services[name], services[name]["environment"]
        assert service["image"] == "distilled-r1:latest"
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://")
        assert env["AIRFLOW__CORE__AUTH_MANAGER"].endswith("SimpleAuthManager")
        assert "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS" not in env  # real logins
        assert any(v.startswith("../dags:") for v in service["volumes"])
        assert "distill-shared:/distill" in service["volumes"]  # artifacts on the one shared volume
        # run settings are not the services' environment: the Variable in the database (docker/deployment.json)
        assert not [
            k for k in env if k.startswith("AIRFLOW_VAR_") or (k.startswith("DISTILL_") and k != "DISTILL_DATA")
        ]
        if name != "airflow-init":
            assert service["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully"
    # the deployment's settings: docker/deployment.json, which airflow-init (only) mounts and stores as the
    # Variable; its routing is the cluster test's, and each queue it names has its own worker service
    deployment = parse((DOCKER / "deployment.json").read_text())
    assert {k: v for k, v in deployment.items() if k in ROUTING_KEYS} == DEPLOYMENT
    assert deployment["defaults"]["output_root"] == "/distill"
    assert [
        name for name, service in services.items() if "./deployment.json:" in " ".join(service.get("volumes", []))
    ] == ["airflow-init"]
    assert "airflow variables set distill_deployment" in (DOCKER / "init.sh").read_text()
    queues = {}
    for name in ("worker-cpu", "worker-npu"):
        command = services[name]["command"]
        assert command[:3] == ["airflow", "celery", "worker"]
        queues[name] = command[command.index("--queues") + 1]
        hostname = command[command.index("--celery-hostname") + 1]
        assert hostname in " ".join(services[name]["healthcheck"]["test"])
    assert queues == {"worker-cpu": deployment["cpu_queue"], "worker-npu": deployment["npu_queue"]}
    # the pools the Variable names are created by airflow-init, the training pool counting deferred tasks
    init = (DOCKER / "init.sh").read_text()
    named = next(line for line in init.splitlines() if line.startswith("named() {"))
    for key in ("teacher_pool", "training_pool"):  # init.sh's own reading of the file, run here
        script = f"deployment={DOCKER / 'deployment.json'}; {named}; named {key}"
        path = os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])  # "python" as in the image
        done = subprocess.run(
            ["bash", "-c", script], capture_output=True, text=True, env=cli_env(PATH=path), check=True
        )
        assert done.stdout.strip() == deployment[key]
        assert f'pools set "${key}"' in init
    assert re.search(r'pools set "\$training_pool" [^\n]*\\\n\s*--include-deferred', init)
    # its check of the file, run here as the image runs it: a module it imports that moved would stop the deployment
    check = init[init.index("python -c 'import sys") : init.index('"$deployment"\nairflow db migrate')]
    for content, fails in ((DOCKER / "deployment.json").read_text(), False), ('{"cpu_queue": 3}', True):
        (tmp_path / "deployment.json").write_text(content)
        script = f'deployment={tmp_path / "deployment.json"}; {check} "$deployment"'
        path = os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])
        done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=cli_env(PATH=path), cwd=REPO)
        assert (done.returncode != 0) == fails and "Traceback" not in done.stderr, done.stderr


def test_every_service_but_the_one_shot_init_is_restarted_when_it_exits():
    # the scheduler exits when the database goes away under it (bench/chaos.py): the deployment must start it again
    policies = {name: service.get("restart") for name, service in compose()["services"].items()}
    assert policies.pop("airflow-init") == "no"
    assert set(policies.values()) == {"always"}, policies


def test_every_long_running_service_has_a_healthcheck():
    for name, service in compose()["services"].items():
        if service.get("restart") != "no":
            assert service.get("healthcheck", {}).get("test"), name


def test_no_default_passwords_and_the_teacher_key_only_in_a_connection():
    text = (DOCKER / "docker-compose.yml").read_text()
    for name in SECRETS:
        assert re.findall(rf"\${{{name}(\W)", text) and set(re.findall(rf"\${{{name}(\W)", text)) == {":"}, name
        assert f"${{{name}:?" in text, name  # compose refuses to start without it
    services = compose()["services"]
    for name, service in services.items():
        env = json.dumps(service.get("environment", {})).upper()
        assert "TEACHER_CONN" not in env and "API_KEY" not in env and "AIRFLOW_CONN_" not in env, name
        assert (service.get("secrets") == ["teacher_api_key"]) == (name == "airflow-init"), name
    assert "teacher_api_key" in (DOCKER / "init.sh").read_text()
    example = dict(
        line.split("=", 1) for line in (DOCKER / ".env.example").read_text().splitlines() if re.match(r"^\w+=", line)
    )
    assert set(SECRETS) <= set(example) and all(example[name] == "change-me" for name in SECRETS)


def run_check(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(DOCKER / "check-env.sh")],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def as_service_env(dotenv: dict) -> dict:
    """What airflow-init sees of docker/.env through the compose file."""
    return {
        "POSTGRES_PASSWORD": dotenv["POSTGRES_PASSWORD"],
        "REDIS_PASSWORD": dotenv["REDIS_PASSWORD"],
        "AIRFLOW__CORE__FERNET_KEY": dotenv["AIRFLOW_FERNET_KEY"],
        "AIRFLOW__API_AUTH__JWT_SECRET": dotenv["AIRFLOW_JWT_SECRET"],
        "AIRFLOW__API__SECRET_KEY": dotenv["AIRFLOW_SECRET_KEY"],
    }


@pytest.mark.skipif(not shutil.which("openssl"), reason="generate-env.sh needs openssl")
def test_generated_secrets_pass_the_check_and_placeholders_do_not(tmp_path):
    (tmp_path / "docker").mkdir()
    for script in ("generate-env.sh", "check-env.sh"):
        shutil.copy(DOCKER / script, tmp_path / "docker" / script)
    done = subprocess.run(["bash", str(tmp_path / "docker" / "generate-env.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    env_file = tmp_path / "docker" / ".env"
    assert env_file.stat().st_mode & 0o077 == 0
    generated = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
    Fernet(generated["AIRFLOW_FERNET_KEY"].encode())  # a valid Fernet key
    assert len({generated[name] for name in SECRETS}) == len(SECRETS)
    assert run_check(as_service_env(generated)).returncode == 0
    # never overwrites secrets already in use
    again = subprocess.run(["bash", str(tmp_path / "docker" / "generate-env.sh")], capture_output=True, text=True)
    assert again.returncode == 1 and generated == dict(line.split("=", 1) for line in env_file.read_text().splitlines())

    example = dict(
        line.split("=", 1) for line in (DOCKER / ".env.example").read_text().splitlines() if re.match(r"^\w+=", line)
    )
    refused = run_check(as_service_env(example))
    assert refused.returncode == 1 and refused.stderr.count("placeholder") == len(SECRETS)
    assert "AIRFLOW__CORE__FERNET_KEY is still the placeholder" in refused.stderr
    bad_key = run_check(as_service_env({**generated, "AIRFLOW_FERNET_KEY": "not-a-key"}))
    assert bad_key.returncode == 1 and "not a Fernet key" in bad_key.stderr
    empty = run_check(as_service_env({**generated, "REDIS_PASSWORD": ""}))
    assert empty.returncode == 1 and "REDIS_PASSWORD is empty" in empty.stderr


def compose_command() -> list[str] | None:
    """``docker compose`` (the v2 plugin) or Debian's ``docker-compose``; neither needs a Docker engine for
    ``config``."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


@pytest.mark.skipif(compose_command() is None, reason="neither docker compose nor docker-compose is installed")
def test_docker_compose_config_accepts_the_file_and_refuses_missing_secrets(tmp_path):
    secret = tmp_path / "teacher_api_key"
    secret.write_text("")
    env = {**os.environ, **dict.fromkeys(SECRETS, "x"), "AIRFLOW_USERS": "admin:admin"}
    env["TEACHER_API_KEY_FILE"] = str(secret)

    def config(env: dict) -> subprocess.CompletedProcess:
        empty = tmp_path / "empty.env"  # not a developer's docker/.env
        empty.write_text("")
        command = [
            *compose_command(),
            "--env-file",
            str(empty),
            "-f",
            str(DOCKER / "docker-compose.yml"),
            "config",
            "-q",
        ]
        return subprocess.run(command, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=120)

    done = config(env)
    assert done.returncode == 0, done.stderr
    for name in SECRETS:
        refused = config({k: v for k, v in env.items() if k != name})
        assert refused.returncode != 0 and f"set {name} in docker/.env" in refused.stderr, name


def test_dockerfile_copies_what_exists():
    dockerfile = (DOCKER / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (.+) \S+$", dockerfile, flags=re.M):
        for path in source.split():
            assert (REPO / path).exists(), path
    assert "COPY docker/init.sh docker/check-env.sh docker/teacher-connection.sh" in dockerfile


def test_the_teacher_connection_is_stored_with_its_key_off_every_command_line(airflow_db, tmp_path):
    """docker/teacher-connection.sh (airflow-init's step) against a real metadata database: the Connection holds
    the key, read back through Airflow, while the key was on no command line (it goes through a private file)."""
    key = "sk-teacher-5f0c2a9e"
    key_file = tmp_path / "teacher_api_key"
    key_file.write_text(key + "\n")
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])  # "python", "airflow" as in the image
    env = cli_env(PATH=path, TEACHER_HOST="teacher.internal", TEACHER_PORT="8443")
    script = DOCKER / "teacher-connection.sh"
    assert key not in script.read_text() and "--conn-password" not in (DOCKER / "init.sh").read_text()
    done = subprocess.run(["bash", str(script), str(key_file)], capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert key not in done.stdout + done.stderr
    shown = subprocess.run(
        [
            os.path.join(os.path.dirname(sys.executable), "airflow"),
            "connections",
            "get",
            "teacher_default",
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    conn = json.loads(shown.stdout)[0]
    assert (conn["host"], int(conn["port"]), conn["schema"], conn["password"]) == (
        "teacher.internal",
        8443,
        "https",
        key,
    )
    # a second run (airflow-init starts again) replaces it
    key_file.write_text("sk-rotated\n")
    assert (
        subprocess.run(["bash", str(script), str(key_file)], capture_output=True, env=env, timeout=180).returncode == 0
    )
