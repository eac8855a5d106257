"""What a job's logs say: progress lines, the failing worker's tail, and the metrics and loss curve of a finished
job.

Steps come from the JSON lines the training entry's ``StepMetricsWriter`` callback (registered with mindformers,
named in the run's YAML) appends per step and worker, ``msrun_log/steps_<rank>.jsonl``; the log text is only
read for the tail shown when something fails. ``parse_steps`` reads mindformers' ``MFLossMonitor`` step lines, for
comparing the two.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from distilled_plugins.core import configs
from distilled_plugins.core.errors import FinetuneFailed
from distilled_plugins.core.io import write_json
from distilled_plugins.finetune.job import JobPaths
from distilled_plugins.finetune.run_config import value_at

_STEP_LINE = re.compile(
    r"Epoch:\[\s*(\d+)/\s*(\d+)\], step:\[\s*(\d+)/\s*(\d+)\], loss:\[\s*([-\d.eE+naif]+)/"
    r"\s*([-\d.eE+naif]+)\], per_step_time: (\d+)ms"
)


@dataclass
class FinetuneResult:
    checkpoint_dir: str
    metrics_file: str
    loss_curve: str
    steps: int
    resumed_from_step: int


def log_size(job_dir: str | Path) -> int:
    return sum(f.stat().st_size for f in JobPaths(job_dir).log_dir.glob("worker_*.log"))


def steps_file(job_dir: str | Path, rank: int) -> Path:
    return JobPaths(job_dir).log_dir / f"steps_{rank}.jsonl"


def read_steps(job_dir: str | Path, rank: int = 0) -> list[dict]:
    """The steps worker ``rank`` recorded (a line cut short by a kill is skipped)."""
    path = steps_file(job_dir, rank)
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            steps.append(json.loads(line))
    return steps


def latest_progress(job_dir: str | Path) -> str | None:
    """The last step recorded by the lowest-ranked worker, for progress logs (reads the file's end only)."""
    files = sorted(JobPaths(job_dir).log_dir.glob("steps_*.jsonl"), key=_rank_of)
    if not files:
        return None
    with open(files[0], "rb") as f:
        f.seek(max(0, files[0].stat().st_size - 4096))
        lines = f.read().decode("utf-8", "replace").splitlines()
    for line in reversed(lines):
        try:
            s = json.loads(line)
        except ValueError:
            continue
        return (
            f"epoch {s['epoch']}/{s.get('epochs', '?')} step {s['step']}/{s['steps_per_epoch']} loss {s['loss']:.6f} "
            f"({s['step_time_ms']} ms/step)"
        )
    return None


def log_tail(path: Path, lines: int = 25) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join(text[-lines:])


def _rank_of(log: Path) -> int:
    return int(re.sub(r"\D", "", log.stem) or 0)


def failing_worker(job_dir: Path, ranks: range | None = None) -> Path | None:
    """The worker log to show: one with a Python traceback, else the one that stopped logging first (among
    ``ranks``, the global ranks of one node, when given)."""
    logs = sorted(JobPaths(job_dir).log_dir.glob("worker_*.log"), key=_rank_of)
    if ranks is not None:
        logs = [log for log in logs if _rank_of(log) in ranks]
    for log in logs:
        if "Traceback (most recent call last)" in log.read_text(encoding="utf-8", errors="replace"):
            return log
    return min(logs, key=lambda p: p.stat().st_mtime) if logs else None


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


def global_step(step: dict) -> int:
    """A step record's number over the whole run (records count steps within their epoch).

    >>> global_step({"epoch": 2, "steps_per_epoch": 10, "step": 3})
    13
    """
    return (step["epoch"] - 1) * step["steps_per_epoch"] + step["step"]


def _loss_curve(steps: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [global_step(s) for s in steps]
    ax.plot(xs, [s["loss"] for s in steps], marker=".", color="#4c72b0")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (worker 0)")
    ax.set_title("Fine-tuning loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_metrics(job_dir: Path, worker_num: int, resume_step: int) -> FinetuneResult:
    """metrics.json, loss.png and result.json of a job whose every node exited 0."""
    paths = JobPaths(job_dir)
    steps = read_steps(job_dir, 0)
    if not steps:
        worker0 = paths.log_dir / "worker_0.log"
        raise FinetuneFailed(
            f"training ended without a single recorded step ({steps_file(job_dir, 0)}); last lines of "
            f"{worker0}:\n{log_tail(worker0)}"
        )
    if resume_step < 0:
        resume_step = global_step(steps[0]) - 1
    run_config = configs.load_yaml(paths.run_config)
    seq_length = int(value_at(run_config, "model.model_config.seq_length"))
    batch = int(value_at(run_config, "runner_config.batch_size"))
    times = [s["step_time_ms"] for s in steps[1:]] or [steps[0]["step_time_ms"]]  # step 1 includes compiling
    step_ms = sorted(times)[len(times) // 2]
    metrics = {
        "steps": steps,
        "final_loss": steps[-1]["loss"],
        "first_loss": steps[0]["loss"],
        "median_step_time_ms": step_ms,
        "seq_length": seq_length,
        "workers": worker_num,
        "tokens_per_s_per_worker": round(seq_length * batch * 1000 / step_ms, 1),
        "tokens_per_s": round(seq_length * batch * worker_num * 1000 / step_ms, 1),
        "resumed_from_step": resume_step,
    }
    write_json(paths.metrics, metrics)
    _loss_curve(steps, paths.loss)
    result = FinetuneResult(
        str(paths.checkpoint), str(paths.metrics), str(paths.loss), global_step(steps[-1]), resume_step
    )
    write_json(paths.result, asdict(result))
    return result


def finished_result(job_dir: str | Path) -> FinetuneResult | None:
    """The result of a job that already finished in ``job_dir`` (a retry must not train again)."""
    result = JobPaths(job_dir).result
    if result.exists():
        return FinetuneResult(**json.loads(result.read_text()))
    return None
