"""What can be checked of the deployment without a Docker engine."""

from __future__ import annotations

import re

import yaml

from tests.conftest import REPO

DOCKER = REPO / "docker"


def test_compose_file_describes_a_celery_deployment():
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {
        "postgres",
        "redis",
        "airflow-init",
        "api-server",
        "scheduler",
        "dag-processor",
        "triggerer",
        "worker",
    } <= set(services)
    for name in ("api-server", "scheduler", "dag-processor", "triggerer", "worker"):
        service = services[name]
        assert service["image"] == "distilled-r1:latest"
        assert service["environment"]["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
        assert service["environment"]["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://")
        assert service["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully"
        assert any(v.startswith("../dags:") for v in service["volumes"])
    assert services["worker"]["command"] == ["airflow", "celery", "worker"]


def test_dockerfile_copies_what_exists():
    dockerfile = (DOCKER / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (.+) \S+$", dockerfile, flags=re.M):
        for path in source.split():
            assert (REPO / path).exists(), path
    for line in (DOCKER / "requirements-deploy.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            assert re.fullmatch(r"[\w.-]+==[\w.]+", line), line
