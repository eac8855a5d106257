"""Stage 5 with real msrun and mindformers on CPU, the tiny profile, 8 packed rows of 256 tokens."""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import pytest

from distilled_plugins import configs, finetune
from distilled_plugins.finetune import FinetuneConfig, FinetuneFailed
from distilled_plugins.io import DataError
from tests.conftest import free_port

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


def job_processes(run_dir: Path) -> list[psutil.Process]:
    """Processes of a job: the supervisor, msrun and workers all carry the run folder in their command line."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(str(run_dir) in part for part in proc.info["cmdline"] or []):
                found.append(proc)
        except psutil.NoSuchProcess:
            pass
    return found


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.mark.slow
def test_one_worker_stop_resume_and_finished_retry(tiny_packed, tmp_path):
    cfg = tiny(tiny_packed, tmp_path / "job")
    launched = finetune.launch(cfg)
    wait_for(lambda: finetune.latest_step_checkpoint(cfg.run_dir / "checkpoint") >= 4, 240, "a checkpoint at step 4")
    finetune.stop(cfg.run_dir)  # what on_kill does: the whole process group goes
    assert job_processes(cfg.run_dir) == []
    assert finetune.job_status(cfg.run_dir, launched.pid) == "finished"

    result = finetune.run(cfg)  # a retry: resumes from the newest checkpoint, not from step 0
    steps = json.loads(Path(result.metrics_file).read_text())["steps"]
    assert result.resumed_from_step >= 4
    assert steps[0]["step"] == result.resumed_from_step + 1 and steps[-1]["step"] == 8
    assert all(s["loss"] >= 0 for s in steps)  # 0 where a split piece holds prompt tokens only
    assert Path(result.loss_curve).read_bytes()[:4] == b"\x89PNG"
    assert (Path(result.checkpoint_dir) / "rank_0").is_dir()
    run_config = configs.load_yaml(cfg.run_dir / "run_config.yaml")
    assert run_config["resume_training"] is True and run_config["load_checkpoint"] == str(cfg.run_dir / "checkpoint")
    assert "CPU accommodations" in (cfg.run_dir / "msrun_log" / "worker_0.log").read_text()

    worker_log = cfg.run_dir / "msrun_log" / "worker_0.log"
    before = worker_log.stat().st_mtime
    again = finetune.run(cfg)  # a retry of a finished job returns its checkpoint without training
    assert again == result and worker_log.stat().st_mtime == before


@pytest.mark.slow
def test_two_workers_train_data_parallel(tiny_packed, tmp_path):
    cfg = tiny(tiny_packed, tmp_path / "job", worker_num=2)
    result = finetune.run(cfg)
    metrics = json.loads(Path(result.metrics_file).read_text())
    assert metrics["workers"] == 2 and len(metrics["steps"]) == 4  # 8 rows shared by 2 workers
    assert metrics["tokens_per_s"] == pytest.approx(2 * metrics["tokens_per_s_per_worker"], rel=1e-3)  # both rounded
    norms = [
        [
            line.split("global_norm: ")[1][:12]
            for line in (cfg.run_dir / "msrun_log" / f"worker_{r}.log").read_text().splitlines()
            if "global_norm: " in line
        ]
        for r in (0, 1)
    ]
    assert norms[0] == norms[1]  # gradients were all-reduced: the same norm on both workers
    assert (cfg.run_dir / "checkpoint" / "rank_1").is_dir()


@pytest.mark.slow
def test_killed_worker_fails_with_its_log_tail(tiny_packed, tmp_path):
    cfg = tiny(tiny_packed, tmp_path / "job")
    launched = finetune.launch(cfg)
    log = cfg.run_dir / "msrun_log" / "worker_0.log"
    wait_for(lambda: log.exists() and "step:[    2/" in log.read_text(), 240, "step 2")
    # the worker is "python .../train.py --config ..."; the supervisor and msrun only pass train.py along
    worker = next(p for p in job_processes(cfg.run_dir) if p.cmdline()[1:2] and p.cmdline()[1].endswith("train.py"))
    worker.kill()
    state = finetune.wait(launched, 0.5)
    with pytest.raises(FinetuneFailed, match="msrun exited with code") as info:
        finetune.collect(cfg, state)
    message = str(info.value)
    assert "last lines of " + str(cfg.run_dir / "msrun_log" / "worker_0.log") in message
    assert "(last progress: epoch 1/1 step " in message and len(message.splitlines()) > 10
    wait_for(lambda: job_processes(cfg.run_dir) == [], 30, "no orphan processes")


class TestPreflight:
    def test_seq_length_mismatch(self, tiny_packed, tmp_path):
        cfg = tiny(
            tiny_packed, tmp_path / "job", config=str(configs.FINETUNE_7B), worker_num=8, load_checkpoint=str(tmp_path)
        )
        with pytest.raises(DataError, match="hold 256 tokens but the model's seq_length is 32768"):
            finetune.launch(cfg)

    def test_missing_key(self, tiny_packed, tmp_path):
        broken = configs.load_yaml(TINY)
        del broken["model"]["model_config"]["seq_length"]
        path = tmp_path / "broken.yaml"
        import yaml

        path.write_text(yaml.safe_dump(broken))
        with pytest.raises(ValueError, match="required key 'model.model_config.seq_length' is missing"):
            finetune.launch(tiny(tiny_packed, tmp_path / "job", config=str(path)))

    def test_missing_checkpoint(self, tiny_packed, tmp_path):
        with pytest.raises(DataError, match="load_checkpoint /nope/Qwen does not exist"):
            finetune.launch(tiny(tiny_packed, tmp_path / "job", load_checkpoint="/nope/Qwen"))

    def test_ascend_needs_enough_npus(self, tiny_packed, tmp_path):
        cfg = tiny(tiny_packed, tmp_path / "job", worker_num=8, overrides={"context.device_target": "Ascend"})
        with pytest.raises(ValueError, match="8 workers per node need as many NPUs; this node has 0"):
            finetune.launch(cfg)

    def test_parallel_layout_must_match_workers(self, tiny_packed, tmp_path):
        cfg = tiny(tiny_packed, tmp_path / "job", worker_num=2, overrides={"parallel_config.model_parallel": 4})
        with pytest.raises(ValueError, match="uses 4 workers but worker_num is 2"):
            finetune.launch(cfg)
        assert not (tmp_path / "job" / "supervisor.pid").exists()  # nothing was launched
