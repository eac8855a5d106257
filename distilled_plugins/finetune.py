"""Stage 5: fine-tune with mindformers, launched through ``msrun``; resumable, with metrics and a loss curve.

Usage:
    python -m distilled_plugins.finetune --config configs/finetune_tiny_cpu.yaml --dataset-path packed/ \\
        --output-dir finetune/ --worker-num 1
    # production: --config configs/finetune_qwen_2_5_7b.yaml --load-checkpoint /models/Qwen2.5-Math-7B-Instruct
    #             --worker-num 8 (per node: --local-worker-num 8 --node-rank N --master-addr HOST)

Everything of one job lives in ``--output-dir``: ``run_config.yaml`` (the YAML with dataset, checkpoint, output
folder and seq_length filled in), ``launcher.log`` (msrun's own output), ``msrun_log/worker_N.log``,
``status.json`` (msrun's exit code, written when it ends), ``checkpoint/rank_N/``, and on success
``metrics.json``, ``loss.png`` and ``result.json``. msrun runs under a small supervisor process in its own
session, so the job outlives the process that started it and the whole group can be killed at once.

A second run on the same ``--output-dir`` resumes from the newest checkpoint (``resume_training``), and one
whose job already finished returns its result without training again.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from distilled_plugins import cli, configs
from distilled_plugins.io import DataError, write_json

logger = logging.getLogger(__name__)

TRAIN_ENTRY = Path(__file__).resolve().parent / "train.py"
REQUIRED_KEYS = (
    "run_mode",
    "trainer.type",
    "runner_config.epochs",
    "runner_config.batch_size",
    "optimizer.type",
    "lr_schedule.type",
    "train_dataset.data_loader.type",
    "context.device_target",
    "model.model_config.seq_length",
    "model.arch.type",
)
ASCEND_ENV = {"ACLNN_CACHE_LIMIT": "10", "MS_DEV_RUNTIME_CONF": "aclnn_cache_queue_length:128"}
_STEP_LINE = re.compile(
    r"Epoch:\[\s*(\d+)/\s*(\d+)\], step:\[\s*(\d+)/\s*(\d+)\], loss:\[\s*([-\d.eE+naif]+)/"
    r"\s*([-\d.eE+naif]+)\], per_step_time: (\d+)ms"
)


class FinetuneFailed(RuntimeError):
    """The training job ended badly; the message carries the failing worker's last log lines."""


@dataclass
class FinetuneConfig:
    config: str  # base YAML: finetune_qwen_2_5_7b.yaml or finetune_tiny_cpu.yaml
    dataset_path: str  # packed data (stage 4)
    output_dir: str
    load_checkpoint: str | None = None  # None: keep the YAML's value
    seq_length: int | None = None  # None: the YAML's model.model_config.seq_length
    worker_num: int = 1
    local_worker_num: int | None = None  # None: worker_num (one node)
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 8118
    overrides: dict = field(default_factory=dict)  # dotted keys, e.g. {"runner_config.epochs": 1}
    poll_interval: float = 5.0

    def __post_init__(self):
        self.config = str(configs.resolve(self.config))
        self.local_worker_num = self.local_worker_num or self.worker_num
        if self.worker_num < 1 or not 1 <= self.local_worker_num <= self.worker_num:
            raise ValueError(f"need 1 <= local_worker_num ({self.local_worker_num}) <= worker_num ({self.worker_num})")
        if self.worker_num % self.local_worker_num:
            raise ValueError(
                f"worker_num {self.worker_num} must be a multiple of local_worker_num "
                f"{self.local_worker_num} (the same number of workers on every node)"
            )

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir)


@dataclass
class FinetuneResult:
    checkpoint_dir: str
    metrics_file: str
    loss_curve: str
    steps: int
    resumed_from_step: int


# ---- files of a job -------------------------------------------------------------------------------------------


def _paths(run_dir: Path) -> dict[str, Path]:
    return {
        "run_config": run_dir / "run_config.yaml",
        "launcher_log": run_dir / "launcher.log",
        "log_dir": run_dir / "msrun_log",
        "status": run_dir / "status.json",
        "pid": run_dir / "supervisor.pid",
        "checkpoint": run_dir / "checkpoint",
        "metrics": run_dir / "metrics.json",
        "loss": run_dir / "loss.png",
        "result": run_dir / "result.json",
    }


def _get(tree: dict, dotted: str):
    """``tree["a"]["b"][0]`` for ``"a.b.0"`` (numbers index lists); KeyError when absent."""
    node = tree
    for part in dotted.split("."):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise KeyError(dotted)
    return node


def _set(tree: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = tree
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def latest_step_checkpoint(checkpoint_dir: Path) -> int:
    """The newest step saved for every rank (0 when none): resuming needs all ranks at the same step."""
    steps = []
    for rank_dir in sorted(checkpoint_dir.glob("rank_*")):
        found = [
            int(m.group(1)) for f in rank_dir.glob("*.safetensors") if (m := re.search(r"_(\d+)\.safetensors$", f.name))
        ]
        steps.append(max(found) if found else 0)
    return min(steps) if steps else 0


def _fit_parallelism(run_config: dict, worker_num: int, source: str) -> None:
    """Check that the parallel layout uses exactly ``worker_num`` workers; a pure data-parallel layout is
    scaled to them (so one CPU profile serves 1 or 2 workers)."""
    layout = run_config.get("parallel_config") or {}
    sizes = {
        k: int(layout.get(k, 1) or 1) for k in ("data_parallel", "model_parallel", "context_parallel", "pipeline_stage")
    }
    product = sizes["data_parallel"] * sizes["model_parallel"] * sizes["context_parallel"] * sizes["pipeline_stage"]
    if product == worker_num or not run_config.get("use_parallel"):
        return
    if sizes["model_parallel"] == sizes["context_parallel"] == sizes["pipeline_stage"] == 1:
        run_config.setdefault("parallel_config", {})["data_parallel"] = worker_num
        return
    raise ValueError(f"{source}: parallel_config {sizes} uses {product} workers but worker_num is {worker_num}")


# ---- preflight and the run's YAML -----------------------------------------------------------------------------


def packed_row_length(dataset_path: str | Path) -> int:
    path = Path(dataset_path)
    stats = path / "stats.json"
    if stats.exists():
        return int(json.loads(stats.read_text())["seq_length"])
    import datasets

    return len(datasets.load_from_disk(str(path))[0]["input_ids"])


def npu_count() -> int:
    return len(list(Path("/dev").glob("davinci[0-9]*")))


def build_run_config(cfg: FinetuneConfig) -> tuple[dict, int]:
    """The base YAML with the run's values filled in; returns it and the step it resumes from (0: fresh)."""
    run_config = configs.load_yaml(cfg.config)
    for key in REQUIRED_KEYS:
        try:
            _get(run_config, key)
        except KeyError:
            raise ValueError(f"{cfg.config}: required key {key!r} is missing") from None
    paths = _paths(cfg.run_dir)
    _set(run_config, "output_dir", str(cfg.run_dir))
    _set(run_config, "train_dataset.data_loader.dataset_path", str(Path(cfg.dataset_path).resolve()))
    if cfg.seq_length:
        _set(run_config, "model.model_config.seq_length", int(cfg.seq_length))
    if cfg.load_checkpoint is not None:
        _set(run_config, "load_checkpoint", cfg.load_checkpoint)
    for key, value in cfg.overrides.items():
        _set(run_config, key, value)
    _fit_parallelism(run_config, cfg.worker_num, cfg.config)
    resume_step = latest_step_checkpoint(paths["checkpoint"])
    if resume_step:
        # the folder of rank_N folders: mindformers takes each rank's newest checkpoint (meta.json)
        run_config["load_checkpoint"] = str(paths["checkpoint"])
        run_config["resume_training"] = True
        run_config["auto_trans_ckpt"] = False
    return run_config, resume_step


def preflight(cfg: FinetuneConfig, run_config: dict, resuming: bool) -> None:
    """Clear errors before anything is launched."""
    dataset = Path(cfg.dataset_path)
    if not dataset.is_dir():
        raise DataError(f"packed dataset {dataset} not found")
    seq_length = int(_get(run_config, "model.model_config.seq_length"))
    rows = packed_row_length(dataset)
    if rows != seq_length:
        raise DataError(
            f"packed rows of {dataset} hold {rows} tokens but the model's seq_length is {seq_length} "
            f"(the tutorial packed at 8,192 for a 32,768 model): pack again with --seq-length {seq_length}"
            f" or set model.model_config.seq_length to {rows}"
        )
    checkpoint = run_config.get("load_checkpoint")
    if checkpoint and not resuming and not Path(str(checkpoint)).exists():
        raise DataError(
            f"load_checkpoint {checkpoint} does not exist; give the base model's folder "
            "(e.g. Qwen2.5-Math-7B-Instruct safetensors)"
        )
    device = str(_get(run_config, "context.device_target"))
    if device.lower() == "ascend" and npu_count() < cfg.local_worker_num:
        raise ValueError(f"{cfg.local_worker_num} workers per node need as many NPUs; this node has {npu_count()}")


def msrun_command(cfg: FinetuneConfig) -> list[str]:
    paths = _paths(cfg.run_dir)
    return [
        "msrun",
        f"--worker_num={cfg.worker_num}",
        f"--local_worker_num={cfg.local_worker_num}",
        f"--master_addr={cfg.master_addr}",
        f"--master_port={cfg.master_port}",
        f"--node_rank={cfg.node_rank}",
        f"--log_dir={paths['log_dir']}",
        "--join=True",
        str(TRAIN_ENTRY),
        "--config",
        str(paths["run_config"]),
        "--run_mode",
        "finetune",
    ]


def _job_env(run_config: dict) -> dict:
    env = dict(os.environ)
    # msrun starts "python" from PATH: make it this environment's interpreter
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TRAIN_ENTRY.parents[1]), env.get("PYTHONPATH")]))
    env.setdefault("LOG_MF_PATH", str(Path(run_config["output_dir"]) / "log"))
    if str(_get(run_config, "context.device_target")).lower() == "ascend":
        for key, value in ASCEND_ENV.items():
            env.setdefault(key, value)
    return env


# ---- launch, watch, stop --------------------------------------------------------------------------------------


@dataclass
class Launch:
    run_dir: str
    pid: int
    hostname: str
    resume_step: int


def launch(cfg: FinetuneConfig) -> Launch:
    """Preflight, write the run's YAML and start msrun under a detached supervisor; returns at once."""
    import yaml

    run_config, resume_step = build_run_config(cfg)
    preflight(cfg, run_config, resuming=bool(resume_step))
    paths = _paths(cfg.run_dir)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    paths["status"].unlink(missing_ok=True)
    with open(paths["run_config"], "w") as f:
        yaml.safe_dump(run_config, f, sort_keys=False)
    with open(paths["launcher_log"], "ab") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "distilled_plugins.finetune",
                "--supervise",
                str(cfg.run_dir),
                "--",
                *msrun_command(cfg),
            ],
            cwd=cfg.run_dir,
            env=_job_env(run_config),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    paths["pid"].write_text(str(process.pid))
    logger.info(
        "%s msrun with %d worker(s) (%d on this node); logs in %s",
        f"resumed from step {resume_step}:" if resume_step else "started",
        cfg.worker_num,
        cfg.local_worker_num,
        paths["log_dir"],
    )
    return Launch(str(cfg.run_dir), process.pid, socket.gethostname(), resume_step)


def supervise(run_dir: Path, command: list[str]) -> int:
    """Run msrun to its end and record its exit code in status.json (the job's result for any watcher)."""
    paths = _paths(run_dir)
    child = subprocess.Popen(command)

    def forward(signum, frame):  # a stop request reaches msrun, which stops its workers
        child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    returncode = child.wait()
    write_json(paths["status"], {"returncode": returncode, "finished_at": time.time()})
    return returncode


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


def log_size(run_dir: str | Path) -> int:
    return sum(f.stat().st_size for f in _paths(Path(run_dir))["log_dir"].glob("worker_*.log"))


def job_status(run_dir: str | Path, pid: int | None = None) -> str:
    """``finished`` (status.json written), ``running``, or ``vanished`` (the supervisor died without a status)."""
    paths = _paths(Path(run_dir))
    if paths["status"].exists():
        return "finished"
    if pid is not None and not process_alive(pid):
        return "finished" if paths["status"].exists() else "vanished"
    return "running"


def stop(run_dir: str | Path, grace: float = 10.0) -> None:
    """Kill the whole job: the supervisor's session holds msrun and every worker it started."""
    import psutil

    pid_file = _paths(Path(run_dir))["pid"]
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text())
    try:
        root = psutil.Process(pid)
        members = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in members:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(sig)
        _gone, alive = psutil.wait_procs(members, timeout=grace)
        if not alive:
            break
        members = alive
    logger.info(
        "stopped the training job of %s (supervisor pid %d and %d other process(es))", run_dir, pid, len(members) - 1
    )


def running_job(run_dir: str | Path) -> Launch | None:
    """The job still running in ``run_dir`` on this host (an earlier try's), to re-attach to instead of starting
    a second one."""
    paths = _paths(Path(run_dir))
    if not paths["pid"].exists() or paths["status"].exists():
        return None
    pid = int(paths["pid"].read_text())
    if not process_alive(pid):
        return None
    return Launch(str(run_dir), pid, socket.gethostname(), latest_step_checkpoint(paths["checkpoint"]))


def latest_progress(run_dir: str | Path) -> str | None:
    """The last step line of worker 0, for progress logs."""
    log = _paths(Path(run_dir))["log_dir"] / "worker_0.log"
    if not log.exists():
        return None
    with open(log, "rb") as f:
        f.seek(max(0, log.stat().st_size - 65536))
        tail = f.read().decode("utf-8", "replace")
    matches = list(_STEP_LINE.finditer(tail))
    if not matches:
        return None
    m = matches[-1]
    return f"epoch {m.group(1)}/{m.group(2)} step {m.group(3)}/{m.group(4)} loss {m.group(5)} ({m.group(7)} ms/step)"


def wait(launched: Launch, poll_interval: float = 5.0) -> str:
    """Block until the job ends, logging its progress; returns the final job status."""
    last = None
    while (state := job_status(launched.run_dir, launched.pid)) == "running":
        progress = latest_progress(launched.run_dir)
        if progress and progress != last:
            logger.info("training: %s", progress)
            last = progress
        time.sleep(poll_interval)
    return state


# ---- results --------------------------------------------------------------------------------------------------


def _log_tail(path: Path, lines: int = 25) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join(text[-lines:])


def failing_worker(run_dir: Path) -> Path:
    """The worker log to show: one with a Python traceback, else the one that stopped logging first."""
    logs = sorted(_paths(run_dir)["log_dir"].glob("worker_*.log"), key=lambda p: int(re.sub(r"\D", "", p.stem)))
    for log in logs:
        if "Traceback (most recent call last)" in log.read_text(encoding="utf-8", errors="replace"):
            return log
    return min(logs, key=lambda p: p.stat().st_mtime) if logs else _paths(run_dir)["launcher_log"]


def parse_steps(log: Path) -> list[dict]:
    steps = []
    for m in _STEP_LINE.finditer(log.read_text(encoding="utf-8", errors="replace")):
        steps.append(
            {
                "epoch": int(m.group(1)),
                "step": int(m.group(3)),
                "steps_per_epoch": int(m.group(4)),
                "loss": float(m.group(5)),
                "step_time_ms": int(m.group(7)),
            }
        )
    return steps


def _loss_curve(steps: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [(s["epoch"] - 1) * s["steps_per_epoch"] + s["step"] for s in steps]
    ax.plot(xs, [s["loss"] for s in steps], marker=".", color="#4c72b0")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (worker 0)")
    ax.set_title("Fine-tuning loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def collect(cfg: FinetuneConfig, state: str, resume_step: int = 0) -> FinetuneResult:
    """Turn an ended job into a result (metrics, curve, result.json) or a FinetuneFailed with the log tail."""
    run_dir = cfg.run_dir
    paths = _paths(run_dir)
    status = json.loads(paths["status"].read_text()) if paths["status"].exists() else None
    if state == "vanished" or status is None:
        raise FinetuneFailed(
            f"the training job of {run_dir} vanished without an exit status (killed?); last lines "
            f"of {paths['launcher_log']}:\n{_log_tail(paths['launcher_log'])}"
        )
    if status["returncode"] != 0:
        worker = failing_worker(run_dir)
        raise FinetuneFailed(
            f"msrun exited with code {status['returncode']} (last progress: "
            f"{latest_progress(run_dir) or 'no step logged'}); last lines of {worker}:\n"
            f"{_log_tail(worker)}"
        )
    worker0 = paths["log_dir"] / "worker_0.log"
    steps = parse_steps(worker0) if worker0.exists() else []
    if not steps:
        raise FinetuneFailed(
            f"training ended without a single logged step; last lines of {worker0}:\n{_log_tail(worker0)}"
        )
    run_config = configs.load_yaml(paths["run_config"])
    seq_length = int(_get(run_config, "model.model_config.seq_length"))
    batch = int(_get(run_config, "runner_config.batch_size"))
    times = [s["step_time_ms"] for s in steps[1:]] or [steps[0]["step_time_ms"]]  # step 1 includes compiling
    step_ms = sorted(times)[len(times) // 2]
    metrics = {
        "steps": steps,
        "final_loss": steps[-1]["loss"],
        "first_loss": steps[0]["loss"],
        "median_step_time_ms": step_ms,
        "seq_length": seq_length,
        "workers": cfg.worker_num,
        "tokens_per_s_per_worker": round(seq_length * batch * 1000 / step_ms, 1),
        "tokens_per_s": round(seq_length * batch * cfg.worker_num * 1000 / step_ms, 1),
        "resumed_from_step": resume_step,
    }
    write_json(paths["metrics"], metrics)
    _loss_curve(steps, paths["loss"])
    result = FinetuneResult(
        str(paths["checkpoint"]), str(paths["metrics"]), str(paths["loss"]), steps[-1]["step"], resume_step
    )
    write_json(paths["result"], asdict(result))
    return result


def finished_result(run_dir: str | Path) -> FinetuneResult | None:
    """The result of a job that already finished in ``run_dir`` (a retry must not train again)."""
    result = _paths(Path(run_dir))["result"]
    if result.exists():
        return FinetuneResult(**json.loads(result.read_text()))
    return None


def run(cfg: FinetuneConfig) -> FinetuneResult:
    """Fine-tune to the end in the foreground (the CLI, and the operator without deferral)."""
    done = finished_result(cfg.run_dir)
    if done:
        logger.info(
            "%s already holds a finished job (checkpoints in %s): not training again", cfg.run_dir, done.checkpoint_dir
        )
        return done
    launched = running_job(cfg.run_dir) or launch(cfg)
    try:
        state = wait(launched, cfg.poll_interval)
    except BaseException:
        stop(cfg.run_dir)
        raise
    return collect(cfg, state, launched.resume_step)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--supervise"]:  # internal: the detached supervisor of one msrun job
        return supervise(Path(argv[1]), argv[3:])
    p = argparse.ArgumentParser(
        prog="python -m distilled_plugins.finetune",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", default=str(configs.FINETUNE_7B), help="base fine-tune YAML")
    p.add_argument("--dataset-path", required=True, help="packed data folder (stage 4)")
    p.add_argument("--output-dir", required=True, help="the job's folder: logs, checkpoints, metrics")
    p.add_argument("--load-checkpoint", default=None, help="base model weights (default: the YAML's)")
    p.add_argument("--seq-length", type=int, default=None, help="default: the YAML's model seq_length")
    p.add_argument("--worker-num", type=int, default=1, help="workers over all nodes")
    p.add_argument("--local-worker-num", type=int, default=None, help="workers on this node")
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--master-addr", default="127.0.0.1")
    p.add_argument("--master-port", type=int, default=8118)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="YAML overrides (dotted keys)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import yaml

    overrides = {k: yaml.safe_load(v) for k, _, v in (item.partition("=") for item in args.set)}
    try:
        result = run(
            FinetuneConfig(
                config=args.config,
                dataset_path=args.dataset_path,
                output_dir=args.output_dir,
                load_checkpoint=args.load_checkpoint,
                seq_length=args.seq_length,
                worker_num=args.worker_num,
                local_worker_num=args.local_worker_num,
                node_rank=args.node_rank,
                master_addr=args.master_addr,
                master_port=args.master_port,
                overrides=overrides,
            )
        )
    except (ValueError, FileNotFoundError, FinetuneFailed) as e:
        return cli.fail(e)
    logger.info(
        "checkpoints in %s; metrics %s; loss curve %s", result.checkpoint_dir, result.metrics_file, result.loss_curve
    )
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
