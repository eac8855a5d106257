"""The demo stops with everything it started on SIGTERM, SIGHUP and SIGINT alike, also when it was started in the
background (its shell left SIGINT ignored): no Airflow process left, its port no longer served."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import psutil
import pytest

from distilled_plugins.devtools.local_airflow import free_port
from tests.support import cli_env, wait_until


@pytest.fixture(scope="module")
def demo_workdir(tmp_path_factory):
    """One workdir for the three signals: the second and third starts find Airflow's database migrated."""
    return tmp_path_factory.mktemp("demo")


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def processes_of(home: str) -> list[psutil.Process]:
    """Live processes whose environment names this Airflow home (every service and task of the demo's Airflow)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("AIRFLOW_HOME") == home and alive(proc):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def serving(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.airflow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_the_demo_stops_everything_it_started(sig, demo_workdir, tmp_path):
    port = free_port()
    log = tmp_path / "demo.log"
    command = [sys.executable, "-m", "distilled_plugins.devtools.demo", "--port", str(port), "--no-learnability"]
    demo = subprocess.Popen(
        [*command, "--problems", "4", "--workdir", str(demo_workdir)],
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        env=cli_env(),
        start_new_session=True,
        # as a shell starts a background job: SIGINT ignored (Ctrl-C must still stop a demo that `kill -INT` reaches)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        wait_until(lambda: "Airflow UI:" in log.read_text() or demo.poll() is not None, 300, "Airflow up", 1)
        assert demo.poll() is None, log.read_text()[-3000:]
        home = str(demo_workdir / "airflow")
        started = [*psutil.Process(demo.pid).children(recursive=True), *processes_of(home)]
        assert len(processes_of(home)) >= 4 and serving(port)  # api-server, scheduler, dag-processor, triggerer
        demo.send_signal(sig)
        assert demo.wait(timeout=120) == 130, log.read_text()[-3000:]
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
    assert f"demo stopped ({sig.name})" in log.read_text()
    assert [p.pid for p in started if alive(p)] == []
    assert processes_of(home) == []
    session = [p.pid for p in psutil.process_iter() if alive(p) and _sid(p.pid) == demo.pid]
    assert session == [] and not serving(port)


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None
