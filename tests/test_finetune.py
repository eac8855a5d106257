"""Stage 5 with real msrun and mindformers on CPU, the tiny profile, 8 packed rows of 256 tokens."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from distilled_plugins.core import configs
from distilled_plugins.core.errors import DataError, FinetuneFailed
from distilled_plugins.devtools.local_airflow import free_port
from distilled_plugins.finetune import FinetuneConfig, stage
from distilled_plugins.finetune import job as jobs
from distilled_plugins.finetune.checkpoints import ResumePoint, checkpoint_step, latest_step_checkpoint, resume_point
from distilled_plugins.finetune.metrics import global_step, latest_progress, parse_steps
from tests.support import INTERRUPTIBLE_EPOCHS, TINY_ROWS, cli_command, cli_env, job_processes, wait_until

TINY = str(configs.CONFIG_DIR / "finetune_tiny_cpu.yaml")


def tiny(tiny_packed, out: Path, **overrides) -> FinetuneConfig:
    settings = {
        "config": TINY,
        "dataset_path": str(tiny_packed),
        "output_dir": str(out),
        "master_port": free_port(),
        "poll_interval": 0.5,
        "overrides": {"callbacks.1.save_checkpoint_steps": 2},
    }
    settings.update(overrides)
    return FinetuneConfig(**settings)


wait_for = functools.partial(wait_until, interval=0.5)  # polls every 0.5 s


def job_dir_of(cfg: FinetuneConfig) -> Path:
    return Path(stage.find_job(cfg).job_dir)


@pytest.mark.slow
def test_one_worker_stop_resume_and_finished_retry(tiny_packed, tmp_path):
    cfg = tiny(tiny_packed, tmp_path / "out", epochs=INTERRUPTIBLE_EPOCHS)
    launched = stage.launch(cfg)
    job = Path(launched.job_dir)
    assert job.parent == tmp_path / "out" and job.name == "job-" + stage.find_job(cfg).fingerprint[:12]
    wait_for(lambda: latest_step_checkpoint(job / "checkpoint") >= 4, 240, "a checkpoint at step 4")
    outcome = jobs.stop(job, "test stop")  # what on_kill does: stop.json, and SIGTERM as the host is this one
    # stopped by the supervisor on the request, or (a loaded machine: workers slow to leave) killed after 30 s
    assert outcome[0] == "stopped" or outcome[0].startswith("killed"), outcome
    assert job_processes(tmp_path) == []
    status = json.loads((job / "node-0.status.json").read_text())
    assert status["stopped"] == "test stop" and jobs.node_state(job, 0, 60) == "finished"

    result = stage.run(cfg)  # a retry: resumes from the newest checkpoint, not from step 0
    steps = json.loads(Path(result.metrics_file).read_text())["steps"]
    assert result.resumed_from_step >= 4
    assert global_step(steps[0]) == result.resumed_from_step + 1
    assert global_step(steps[-1]) == result.steps == TINY_ROWS * INTERRUPTIBLE_EPOCHS
    assert all(s["loss"] >= 0 for s in steps)  # 0 where a split piece holds prompt tokens only
    assert Path(result.loss_curve).read_bytes()[:4] == b"\x89PNG"
    assert Path(result.checkpoint_dir) == job / "checkpoint" and (job / "checkpoint" / "rank_0").is_dir()
    run_config = configs.load_yaml(job / "run_config.yaml")
    assert run_config["load_checkpoint"] == str(job / "checkpoint")  # the checkpoint resumed, named for every rank
    assert checkpoint_step(job / "checkpoint" / "rank_0" / run_config["resume_training"]) == result.resumed_from_step
    assert "CPU accommodations" in (job / "msrun_log" / "worker_0.log").read_text()

    worker_log = job / "msrun_log" / "worker_0.log"
    before = worker_log.stat().st_mtime
    again = stage.run(cfg)  # a retry of a finished job returns its checkpoint without training
    assert again == result and worker_log.stat().st_mtime == before


@pytest.mark.slow
def test_two_workers_train_data_parallel(tiny_packed, tmp_path):
    cfg = tiny(tiny_packed, tmp_path / "out", worker_num=2)
    result = stage.run(cfg)
    job = Path(result.checkpoint_dir).parent
    metrics = json.loads(Path(result.metrics_file).read_text())
    assert metrics["workers"] == 2 and len(metrics["steps"]) == TINY_ROWS // 2  # rows shared by 2 workers
    assert metrics["tokens_per_s"] == pytest.approx(2 * metrics["tokens_per_s_per_worker"], abs=0.11)  # both rounded
    norms = [
        [
            line.split("global_norm: ")[1][:12]
            for line in (job / "msrun_log" / f"worker_{r}.log").read_text().splitlines()
            if "global_norm: " in line
        ]
        for r in (0, 1)
    ]
    assert norms[0] == norms[1]  # gradients were all-reduced: the same norm on both workers
    # the steps come from the StepMetricsWriter callback; they agree with mindformers' own step lines
    logged = parse_steps(job / "msrun_log" / "worker_0.log")
    assert [s["step"] for s in metrics["steps"]] == [s["step"] for s in logged] == list(range(1, TINY_ROWS // 2 + 1))
    assert [s["loss"] for s in metrics["steps"]] == pytest.approx([s["loss"] for s in logged], abs=1e-5)
    assert (job / "checkpoint" / "rank_1").is_dir()


def workers_of(job: Path) -> dict[str, psutil.Process]:
    """The training workers of a job by their log's name (a worker's stdout is its log; msrun's scheduler, also
    a train.py process, writes scheduler.log)."""
    found = {}
    for proc in job_processes(job):
        with contextlib.suppress(OSError):
            log = os.readlink(f"/proc/{proc.pid}/fd/1")
            if log.startswith(str(job / "msrun_log" / "worker_")):
                found[Path(log).name] = proc
    return found


@pytest.mark.slow
def test_a_dead_worker_fails_the_cli_at_once_and_a_rerun_after_a_dead_supervisor_resumes(tiny_packed, tmp_path):
    """Two workers on one node, through the CLI. A worker SIGKILLed (as the OOM killer would) fails the node within
    60 s with that worker's log tail, although msrun itself would wait for its scheduler (MS_NODE_TIMEOUT, 600 s).
    Then the CLI and its supervisor killed together, and a rerun at once: the dead supervisor is known at once on
    this host (no re-attaching), what it left is stopped, and the rerun resumes from the newest checkpoint."""
    out = tmp_path / "out"
    args = (
        f"--config={TINY}",
        f"--dataset-path={tiny_packed}",
        f"--output-dir={out}",
        "--worker-num=2",
        f"--master-port={free_port()}",
        "--poll-interval=0.5",
        f"--epochs={INTERRUPTIBLE_EPOCHS}",
        "--set",
        "callbacks.1.save_checkpoint_steps=2",  # a checkpoint at step 2, then time to kill a worker
    )

    clis = []

    def start(name: str) -> subprocess.Popen:
        clis.append(
            subprocess.Popen(
                cli_command("finetune", *args),
                stdout=open(tmp_path / name, "w"),
                stderr=subprocess.STDOUT,
                env=cli_env(),
            )
        )
        return clis[-1]

    try:
        _kill_a_worker_then_the_supervisor(out, tmp_path, start)
    finally:  # a failed check leaves nothing training
        for proc in [*clis, *job_processes(out)]:
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                proc.kill()


def _kill_a_worker_then_the_supervisor(out: Path, tmp_path: Path, start) -> None:
    first = start("first.log")
    job = wait_for(lambda: next(out.glob("job-*"), None), 120, "the job folder")
    wait_for(lambda: latest_step_checkpoint(job / "checkpoint") >= 2, 300, "a checkpoint at step 2")
    name, worker = sorted(workers_of(job).items())[1]
    worker.kill()
    killed = time.monotonic()
    assert first.wait(timeout=60) == 1, (tmp_path / "first.log").read_text()[-3000:]
    assert time.monotonic() - killed < 60
    said = (tmp_path / "first.log").read_text()
    assert f"training worker process {worker.pid} died (exit code -9, killed by signal 9)" in said
    tail = said.split(f"last lines of {job / 'msrun_log' / name}:\n")[1]  # the dead worker's log, not another's
    assert len(tail.splitlines()) > 10 and "Epoch:[" in (job / "msrun_log" / name).read_text()
    wait_for(lambda: job_processes(job) == [], 30, "no process of the failed node left")

    second = start("second.log")
    wait_for(lambda: "resumed from step " in (tmp_path / "second.log").read_text(), 120, "the retry to resume")
    # a step of the retry first: a retry killed while mindformers sets up its resume leaves no resume record
    wait_for(lambda: _progress_unless_ended(job, second, tmp_path / "second.log"), 300, "a step of the retry")
    supervisor = psutil.Process(json.loads((job / "node-0.json").read_text())["pid"])
    second.kill()  # the task and its supervisor die together (a host's OOM killer, a killed container)
    supervisor.kill()
    second.wait()
    assert len(workers_of(job)) == 2, "msrun and its workers outlive the supervisor"

    third = start("third.log")
    assert third.wait(timeout=600) == 0, (tmp_path / "third.log").read_text()[-3000:]
    said = (tmp_path / "third.log").read_text()
    assert "the supervisor recorded on this host is dead" in said and "re-attaching" not in said
    metrics = json.loads((job / "metrics.json").read_text())
    assert (
        metrics["resumed_from_step"] >= 2 and global_step(metrics["steps"][-1]) == TINY_ROWS // 2 * INTERRUPTIBLE_EPOCHS
    )
    assert job_processes(job) == []


def _progress_unless_ended(job: Path, cli: subprocess.Popen, log: Path) -> str | None:
    if cli.poll() is not None:
        raise AssertionError(f"the retry ended (exit code {cli.returncode}):\n{log.read_text()[-3000:]}")
    return latest_progress(job)


@pytest.mark.slow
def test_killed_supervisor_is_dead_and_its_leftovers_are_stopped(tiny_packed, tmp_path):
    # training outlasts the ~7 s until the dead supervisor counts as dead: leftovers that collect must stop
    cfg = tiny(tiny_packed, tmp_path / "out", dead_after=6.0, epochs=INTERRUPTIBLE_EPOCHS)
    launched = stage.launch(cfg)
    job = Path(launched.job_dir)
    log = job / "msrun_log" / "worker_0.log"
    wait_for(lambda: log.exists() and "step:[    1/" in log.read_text(), 240, "step 1")
    psutil.Process(launched.pid).kill()  # msrun and its worker live on, orphaned
    started = time.monotonic()
    state = stage.wait(launched, 0.5, dead_after=cfg.dead_after)
    assert state == "dead" and time.monotonic() - started < 60
    with pytest.raises(FinetuneFailed, match="training node 0 of .* dead .no heartbeat") as info:
        stage.collect(cfg, launched, state, "no heartbeat")
    assert "last lines of " + str(log) in str(info.value) and "node-0.launcher.log" in str(info.value)
    assert job_processes(tmp_path) == []  # collect stopped what the dead supervisor left behind
    assert json.loads((job / "stop.json").read_text())["reason"].startswith("node 0 dead")


class TestPreflight:
    def test_seq_length_mismatch(self, tiny_packed, tmp_path):
        cfg = tiny(
            tiny_packed, tmp_path / "job", config=str(configs.FINETUNE_7B), worker_num=8, load_checkpoint=str(tmp_path)
        )
        with pytest.raises(DataError, match="hold 256 tokens but the model's seq_length is 32768"):
            stage.launch(cfg)

    def test_missing_key(self, tiny_packed, tmp_path):
        broken = configs.load_yaml(TINY)
        del broken["model"]["model_config"]["seq_length"]
        path = tmp_path / "broken.yaml"
        import yaml

        path.write_text(yaml.safe_dump(broken))
        with pytest.raises(ValueError, match="required key 'model.model_config.seq_length' is missing"):
            stage.launch(tiny(tiny_packed, tmp_path / "job", config=str(path)))

    def test_missing_checkpoint(self, tiny_packed, tmp_path):
        with pytest.raises(DataError, match="load_checkpoint /nope/Qwen does not exist"):
            stage.launch(tiny(tiny_packed, tmp_path / "job", load_checkpoint="/nope/Qwen"))

    def test_ascend_needs_enough_npus(self, tiny_packed, tmp_path):
        cfg = tiny(tiny_packed, tmp_path / "job", worker_num=8, overrides={"context.device_target": "Ascend"})
        with pytest.raises(ValueError, match="8 workers per node need as many NPUs; this node has 0"):
            stage.launch(cfg)

    def test_parallel_layout_must_match_workers(self, tiny_packed, tmp_path):
        cfg = tiny(tiny_packed, tmp_path / "job", worker_num=2, overrides={"parallel_config.model_parallel": 4})
        with pytest.raises(ValueError, match="uses 4 workers but worker_num is 2"):
            stage.launch(cfg)
        assert not list((tmp_path / "job").glob("job-*/node-0.json"))  # nothing was launched


class TestRunSettings:
    def test_epochs_and_learning_rate_replace_the_profiles_and_left_empty_keep_them(self, tiny_packed, tmp_path):
        from distilled_plugins.finetune.run_config import resolved_config

        profile = configs.load_yaml(TINY)
        kept = resolved_config(tiny(tiny_packed, tmp_path))
        assert kept["runner_config"]["epochs"] == profile["runner_config"]["epochs"]
        assert kept["lr_schedule"]["learning_rate"] == profile["lr_schedule"]["learning_rate"]
        changed = resolved_config(tiny(tiny_packed, tmp_path, epochs=3, learning_rate=0.02))
        assert changed["runner_config"]["epochs"] == 3 and changed["lr_schedule"]["learning_rate"] == 0.02
        # a different run: a different job folder (the fingerprint covers the resolved YAML)
        assert job_dir_of(tiny(tiny_packed, tmp_path, epochs=3)) != job_dir_of(tiny(tiny_packed, tmp_path))

    def test_packed_again_with_the_same_rows_is_the_same_job_and_other_rows_another(self, tiny_packed, tmp_path):
        """Clearing pack (and its downstream tasks) writes the same rows to new files: fine-tuning reuses its job."""
        packed = Path(shutil.copytree(tiny_packed, tmp_path / "packed"))
        first = job_dir_of(tiny(packed, tmp_path))
        for path in packed.iterdir():  # the same rows, new files (mtimes), as pack writes them again
            if path.is_file():
                content = path.read_bytes()
                path.unlink()
                time.sleep(0.01)
                path.write_bytes(content)
        stats = json.loads((packed / "stats.json").read_text())
        (packed / "stats.json").write_text(json.dumps({**stats, "seconds": 123.4}))  # another run's timings
        assert job_dir_of(tiny(packed, tmp_path)) == first
        arrow = next(packed.glob("*.arrow"))
        arrow.write_bytes(arrow.read_bytes() + b"\0")  # other rows
        assert job_dir_of(tiny(packed, tmp_path)) != first

    def test_the_cli_takes_them_and_dst_names_the_output(self):
        from distilled_plugins.finetune.__main__ import build_parser

        args = build_parser().parse_args(
            ["--dataset-path", "p", "--dst", "o", "--epochs", "2", "--learning-rate", "1e-4"]
        )
        assert (args.output_dir, args.epochs, args.learning_rate, args.master_addr) == ("o", 2, 1e-4, "auto")


def start_node(cfg: FinetuneConfig, rank: int, hostname: str, log: Path) -> subprocess.Popen:
    """One "node": the stage's CLI in its own UTS namespace, so it sees its own hostname (root only)."""
    cli = [
        sys.executable,
        "-m",
        "distilled_plugins.finetune",
        f"--config={cfg.config}",
        f"--dataset-path={cfg.dataset_path}",
        f"--output-dir={cfg.output_dir}",
        "--worker-num=2",
        "--local-worker-num=1",
        f"--node-rank={rank}",
        "--master-addr=auto",  # node 0 publishes its address, node 1 reads it
        f"--master-port={cfg.master_port}",
    ]
    script = f"hostname {hostname} && exec {shlex.join(cli)}"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen(
        ["unshare", "--uts", "sh", "-c", script], stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env
    )


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare (UTS namespaces)")
def test_two_nodes_on_two_hosts_train_to_the_end(tiny_packed, tmp_path):
    cfg = tiny(tiny_packed, tmp_path / "out", overrides={})
    nodes = [start_node(cfg, rank, f"node{rank}", tmp_path / f"node{rank}.log") for rank in (0, 1)]
    for rank, node in enumerate(nodes):
        assert node.wait(timeout=600) == 0, (tmp_path / f"node{rank}.log").read_text()[-3000:]
    (job,) = (tmp_path / "out").glob("job-*")
    records = [json.loads((job / f"node-{r}.json").read_text()) for r in (0, 1)]
    assert [r["host"] for r in records] == ["node0", "node1"]
    assert records[0]["master_addr"] == records[1]["master_addr"] != "auto"
    for rank in (0, 1):
        assert list((job / "checkpoint" / f"rank_{rank}").glob("*.safetensors")), f"rank {rank} saved nothing"
        assert json.loads((job / f"node-{rank}.status.json").read_text())["returncode"] == 0
    metrics = json.loads((job / "metrics.json").read_text())
    assert (
        metrics["workers"] == 2 and metrics["steps"][-1]["step"] == TINY_ROWS // 2
    )  # rows over 2 data-parallel workers
    assert "node 1 of 2" in (tmp_path / "node1.log").read_text()


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare (UTS namespaces)")
def test_a_failing_node_fails_every_node_with_its_log_tail(tiny_packed, tmp_path):
    cfg = tiny(tiny_packed, tmp_path / "out", epochs=INTERRUPTIBLE_EPOCHS)
    nodes = [start_node(cfg, rank, f"node{rank}", tmp_path / f"node{rank}.log") for rank in (0, 1)]
    log = tmp_path / "out"
    wait_for(lambda: any("step:[" in p.read_text() for p in log.glob("job-*/msrun_log/worker_1.log")), 300, "a step")
    (job,) = log.glob("job-*")
    msrun1 = next(p for p in job_processes(tmp_path) if "--node_rank=1" in p.cmdline())
    worker1 = next(p for p in msrun1.children() if any(part.endswith("train.py") for part in p.cmdline()))
    worker1.kill()
    assert [node.wait(timeout=300) for node in nodes] == [1, 1]
    stop = json.loads((job / "stop.json").read_text())
    # the worker named when the supervisor saw msrun report it, else msrun's exit code (msrun ended first)
    assert stop["reason"].startswith("node 1 failed (")
    assert stop["host"] == "node1"
    node0 = (tmp_path / "node0.log").read_text()
    assert (
        "stopped: node 1 failed" in node0
        and "node 1's last lines of " + str(job / "msrun_log" / "worker_1.log") in node0
    )
    wait_for(lambda: job_processes(tmp_path) == [], 60, "no process of either node left")


def _save_checkpoint(path: Path, step: int, bytes_written: int | None = None) -> None:
    """A safetensors file holding mindformers' ``step_num`` (``bytes_written``: cut short, as by a kill mid-save)."""
    header = json.dumps({"step_num": {"dtype": "I64", "shape": [], "data_offsets": [0, 8]}}).encode()
    data = len(header).to_bytes(8, "little") + header + step.to_bytes(8, "little")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[:bytes_written])


class TestResumePoint:
    def test_the_newest_checkpoint_every_rank_finished_by_the_step_it_holds(self, tmp_path):
        for rank in (0, 1):
            _save_checkpoint(tmp_path / f"rank_{rank}/tiny_rank_{rank}-1_2.safetensors", 2)
            _save_checkpoint(tmp_path / f"rank_{rank}/tiny_rank_{rank}_1-1_2.safetensors", 4)  # named after a resume
            (tmp_path / f"rank_{rank}/meta.json").write_text(
                json.dumps({"last_ckpt_file": f"tiny_rank_{rank}_1-1_2.safetensors"})
            )
        assert resume_point(tmp_path) == ResumePoint(4, "tiny_rank_0_1-1_2.safetensors")
        # rank 1 killed while saving step 6: its file is there, cut short, and its meta.json still names step 4
        _save_checkpoint(tmp_path / "rank_0/tiny_rank_0_1-1_3.safetensors", 6)
        (tmp_path / "rank_0/meta.json").write_text(json.dumps({"last_ckpt_file": "tiny_rank_0_1-1_3.safetensors"}))
        _save_checkpoint(tmp_path / "rank_1/tiny_rank_1_1-1_3.safetensors", 6, bytes_written=20)
        assert resume_point(tmp_path).step == latest_step_checkpoint(tmp_path) == 4

    def test_a_step_whose_files_the_ranks_named_apart_is_passed_over(self, tmp_path):
        # mindformers gives every rank rank 0's name, with its id put in: a file named otherwise is not found
        for rank in (0, 1):
            _save_checkpoint(tmp_path / f"rank_{rank}/tiny_rank_{rank}-1_2.safetensors", 4)
        _save_checkpoint(tmp_path / "rank_0/tiny_rank_0_1-1_3.safetensors", 6)
        _save_checkpoint(tmp_path / "rank_1/tiny_rank_1-1_3.safetensors", 6)  # a suffix of its own
        for rank, last in ((0, "tiny_rank_0_1-1_3"), (1, "tiny_rank_1-1_3")):
            (tmp_path / f"rank_{rank}/meta.json").write_text(json.dumps({"last_ckpt_file": f"{last}.safetensors"}))
        assert resume_point(tmp_path) == ResumePoint(4, "tiny_rank_0-1_2.safetensors")

    def test_a_checkpoint_of_the_last_step_resumes_from_the_one_before(self, tmp_path):
        # stopped after its final save: mindspore cannot resume at the end of the last epoch
        for step in (6, 8, 10):
            _save_checkpoint(tmp_path / f"rank_0/tiny_rank_0-1_{step // 2}.safetensors", step)
        (tmp_path / "rank_0/meta.json").write_text(json.dumps({"last_ckpt_file": "tiny_rank_0-1_5.safetensors"}))
        assert resume_point(tmp_path).step == 10
        assert resume_point(tmp_path, below=10) == ResumePoint(8, "tiny_rank_0-1_4.safetensors")
        assert resume_point(tmp_path, below=6) is None  # no earlier one kept: from the beginning

    def test_none_until_every_rank_finished_one(self, tmp_path):
        assert resume_point(tmp_path) is None and latest_step_checkpoint(tmp_path) == 0
        _save_checkpoint(tmp_path / "rank_0/tiny_rank_0-1_2.safetensors", 2)
        (tmp_path / "rank_0/meta.json").write_text(json.dumps({"last_ckpt_file": "tiny_rank_0-1_2.safetensors"}))
        _save_checkpoint(tmp_path / "rank_1/tiny_rank_1-1_2.safetensors", 2, bytes_written=20)  # no meta.json yet
        assert resume_point(tmp_path) is None
