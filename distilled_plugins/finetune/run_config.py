"""The run's YAML: the base profile with the job's inputs filled in and placed in its folder, the time limits it
implies, the environment msrun runs in, and the preflight checks made before anything is launched."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from distilled_plugins.core import configs
from distilled_plugins.core.artifacts import require_artifact
from distilled_plugins.core.errors import CheckpointMissing, DataError, SeqLengthMismatch
from distilled_plugins.core.schema import STATS_FILE, STATS_PAD_TOKEN_ID, STATS_SEQ_LENGTH
from distilled_plugins.finetune.checkpoints import resume_point
from distilled_plugins.finetune.config import FinetuneConfig

TRAIN_ENTRY = Path(__file__).resolve().parents[1] / "in_mindformers" / "train.py"
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
# seconds without any worker log line before a job counts as stalled, and the most one step may take, by device:
# a 7B step at 32k tokens takes tens of seconds on Ascend, and saving its checkpoint some minutes
STALL_TIMEOUT = {"ascend": 1800.0, "cpu": 600.0}
MAX_STEP_SECONDS = {"ascend": 300.0, "cpu": 60.0}


def value_at(tree: dict, dotted: str):
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
    """Set a dotted key of the YAML; a value of another type than the YAML's (a number given as text) is refused."""
    *parents, last = dotted.split(".")
    node = tree
    try:
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        key = int(last) if isinstance(node, list) else last
        old = node[key] if isinstance(node, list) or key in node else None
    except (ValueError, IndexError, TypeError, AttributeError):
        raise ValueError(f"--set {dotted}: no such key in the fine-tune YAML") from None
    numeric = (int, float)
    if (
        old is not None
        and value is not None
        and isinstance(old, (bool, *numeric)) != isinstance(value, (bool, *numeric))
    ):
        raise ValueError(
            f"--set {dotted}={value!r}: the YAML holds a {type(old).__name__} there ({old!r}); give a value of that type"
        )
    node[key] = value


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


def resolved_config(cfg: FinetuneConfig) -> dict:
    """The base YAML with the run's inputs filled in (no job folder yet): what the fingerprint covers."""
    run_config = configs.load_yaml(cfg.config)
    for key in REQUIRED_KEYS:
        try:
            value_at(run_config, key)
        except KeyError:
            raise ValueError(f"{cfg.config}: required key {key!r} is missing") from None
    require_artifact(cfg.dataset_path, "packed", option="--dataset-path")  # not a handled folder, say
    _set(run_config, "train_dataset.data_loader.dataset_path", str(Path(cfg.dataset_path).resolve()))
    if cfg.seq_length:
        _set(run_config, "model.model_config.seq_length", int(cfg.seq_length))
    if cfg.load_checkpoint is not None:
        _set(run_config, "load_checkpoint", cfg.load_checkpoint)
    for key, value in (("runner_config.epochs", cfg.epochs), ("lr_schedule.learning_rate", cfg.learning_rate)):
        if value is not None:
            _set(run_config, key, value)
    for key, value in cfg.overrides.items():  # the expert's escape hatch: any key, applied last
        _set(run_config, key, value)
    _fit_parallelism(run_config, cfg.worker_num, cfg.config)
    return run_config


def job_config(run_config: dict, job_dir: Path, job_steps: int | None) -> tuple[dict, int]:
    """The resolved YAML placed in ``job_dir``; returns it and the step it resumes from (0: fresh), before the job's
    last step (``job_steps``: :func:`total_steps`)."""
    run_config = json.loads(json.dumps(run_config))
    run_config["output_dir"] = str(job_dir)
    # every worker writes its steps as JSON lines next to its log (distilled_plugins/in_mindformers/train.py: StepMetricsWriter)
    point = resume_point(job_dir / "checkpoint", below=job_steps)
    resume_step = point.step if point else 0
    callbacks = [c for c in run_config.get("callbacks") or [] if c.get("type") != "StepMetricsWriter"]
    writer = {"type": "StepMetricsWriter", "folder": str(job_dir / "msrun_log"), "initial_step": resume_step}
    run_config["callbacks"] = [*callbacks, writer]  # mindformers gives only its own callbacks the initial step
    if point:
        # the folder of rank_N folders and the file, named: left to choose (meta.json), rank 0 would tell the others
        # through a file behind a barrier, which CPU workers skip (a rank could read the last attempt's choice)
        run_config["load_checkpoint"] = str(job_dir / "checkpoint")
        run_config["resume_training"] = point.file_name
        run_config["auto_trans_ckpt"] = False
    return run_config, resume_step


def device(run_config: dict) -> str:
    return str(value_at(run_config, "context.device_target")).lower()


def stall_timeout(cfg: FinetuneConfig, run_config: dict) -> float:
    return float(cfg.stall_timeout or STALL_TIMEOUT.get(device(run_config), STALL_TIMEOUT["ascend"]))


def packed_stats(dataset_path: str | Path) -> dict:
    """The stats pack wrote beside its rows ({} for a folder without them)."""
    stats = Path(dataset_path) / STATS_FILE
    return json.loads(stats.read_text()) if stats.exists() else {}


def total_steps(cfg: FinetuneConfig, run_config: dict) -> int | None:
    """Training steps of the whole job: each data-parallel worker's share of the packed rows in batches, times the
    epochs, rounded down where rows or batches do not divide evenly (a lower bound: where a retry resumes must lie
    before the job's end). None: the packed data has no stats.json to count its rows."""
    stats = packed_stats(cfg.dataset_path)
    rows = int(stats["packs"]) if stats else 0
    if not rows:
        return None
    layout = run_config.get("parallel_config") or {}
    data_parallel = int(layout.get("data_parallel", 1) or 1) if run_config.get("use_parallel") else 1
    batch = int(value_at(run_config, "runner_config.batch_size"))
    epochs = int(value_at(run_config, "runner_config.epochs"))
    return max(1, rows // (batch * data_parallel) * epochs)


def deferral_timeout(cfg: FinetuneConfig, run_config: dict) -> float:
    """How long the whole job may take before its task gives up: every step at its device's worst step time,
    plus twice the stall timeout for start-up (cluster forming, compiling, loading) and the last save."""
    per_step = MAX_STEP_SECONDS.get(device(run_config), MAX_STEP_SECONDS["ascend"])
    steps = total_steps(cfg, run_config) or 1000  # rows unknown: a guess
    return steps * per_step + 2 * stall_timeout(cfg, run_config)


def job_env(run_config: dict) -> dict:
    env = configs.child_env()
    # msrun starts "python" from PATH: make it this environment's interpreter
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TRAIN_ENTRY.parents[2]), env.get("PYTHONPATH")]))
    env.setdefault("LOG_MF_PATH", str(Path(run_config["output_dir"]) / "log"))
    if device(run_config) == "ascend":
        for key, value in ASCEND_ENV.items():
            env.setdefault(key, value)
    else:  # CPU workers share cores with everything else: a busy machine must not read as a dead worker
        env.setdefault("MS_NODE_TIMEOUT", "600")
    return env


# ---- preflight ------------------------------------------------------------------------------------------------


def packed_row_length(dataset_path: str | Path, stats: dict) -> int:
    """Tokens in a packed row: as pack's ``stats`` record it, else as the first row holds them."""
    if stats:
        return int(stats[STATS_SEQ_LENGTH])
    import datasets

    return len(datasets.load_from_disk(str(dataset_path))[0]["input_ids"])


def npu_count() -> int:
    return len(list(Path("/dev").glob("davinci[0-9]*")))


def preflight(cfg: FinetuneConfig, run_config: dict, resuming: bool) -> None:
    """Clear errors before anything is launched."""
    dataset = Path(cfg.dataset_path)
    if not dataset.is_dir():
        raise DataError(f"packed dataset {dataset} not found")
    seq_length = int(value_at(run_config, "model.model_config.seq_length"))
    stats = packed_stats(dataset)
    rows = packed_row_length(dataset, stats)
    if rows != seq_length:
        raise SeqLengthMismatch(
            f"packed rows of {dataset} hold {rows} tokens but the model's seq_length is {seq_length} "
            f"(the tutorial packed at 8,192 for a 32,768 model): pack again with --seq-length {seq_length}"
            f" or set model.model_config.seq_length to {rows}"
        )
    mismatch = configs.packed_pad_mismatch(
        stats.get(STATS_PAD_TOKEN_ID), cfg.config, run_config["model"]["model_config"]
    )
    if mismatch:
        raise DataError(f"{dataset}: {mismatch}")
    checkpoint = run_config.get("load_checkpoint")
    if checkpoint and not resuming and not Path(str(checkpoint)).exists():
        raise CheckpointMissing(
            f"load_checkpoint {checkpoint} does not exist; give the base model's folder "
            "(e.g. Qwen2.5-Math-7B-Instruct safetensors)"
        )
    if device(run_config) == "ascend" and npu_count() < cfg.local_worker_num:
        raise ValueError(f"{cfg.local_worker_num} workers per node need as many NPUs; this node has {npu_count()}")
