"""A fine-tune job's settings, the run's YAML, the preflight checks and the fingerprint of the job's inputs."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from distilled_plugins.core import configs
from distilled_plugins.core.errors import CheckpointMissing, DataError, SeqLengthMismatch
from distilled_plugins.core.io import files_state, require_artifact, write_json
from distilled_plugins.core.schema import STATS_FILE
from distilled_plugins.core.settings import FINETUNE, MULTINODE, setting

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


@dataclass
class FinetuneConfig:
    """Settings of one node's part of a fine-tune job (one msrun launcher)."""

    dataset_path: str = setting(help="packed data folder (stage 4)", required=True)
    output_dir: str = setting(
        help="the task's folder on shared storage: one job-<id>/ per job",
        required=True,
        flag="--dst",
        aliases=("--output-dir",),
    )
    config: str = setting(
        configs.FINETUNE_7B.name,
        help="base fine-tune YAML: a path, or a profile in configs/ (finetune_qwen_2_5_7b.yaml: the tutorial's 7B "
        "recipe on Ascend NPUs; finetune_tiny_cpu.yaml: the tiny CPU model of the demo)",
        title="Fine-tune profile",
        section=FINETUNE,
    )
    load_checkpoint: str | None = setting(
        None,
        help="folder of the base model weights (Qwen2.5-Math-7B-Instruct safetensors); empty: the profile's own "
        "load_checkpoint",
        title="Base checkpoint",
        section=FINETUNE,
    )
    epochs: int | None = setting(
        None,
        help="passes over the packed data; empty: the profile's runner_config.epochs",
        minimum=1,
        title="Epochs",
        section=FINETUNE,
    )
    learning_rate: float | None = setting(
        None,
        help="peak learning rate of the schedule; empty: the profile's lr_schedule.learning_rate",
        minimum=0,
        title="Learning rate",
        section=FINETUNE,
    )
    seq_length: int | None = setting(None, help="tokens per row; empty: the YAML's model seq_length", minimum=1)
    worker_num: int = setting(1, help="msrun workers over all nodes", minimum=1)
    local_worker_num: int | None = setting(None, help="msrun workers on this node; empty: worker_num (one node)")
    node_rank: int = setting(0, help="this node's rank (0: the node hosting msrun's scheduler)", minimum=0)
    master_addr: str = setting(
        "auto",
        help="address of training node 0 (msrun's scheduler), reachable from every node; auto: 127.0.0.1 on one "
        "node, else node 0 publishes its own address in its record",
        title="Master address",
        section=MULTINODE,
    )
    master_port: int = setting(
        8118, help="msrun's master port on node 0", minimum=1024, maximum=65535, title="Master port", section=MULTINODE
    )
    overrides: dict = setting(
        help="YAML overrides by dotted key, e.g. {'runner_config.epochs': 1} (CLI: --set KEY=VALUE ...)",
        factory=dict,
        cli=False,
    )
    poll_interval: float = setting(5.0, help="seconds between looks at the job's status", minimum=0.1)
    stall_timeout: float | None = setting(
        None,
        help="seconds without a worker log line before the job counts as stalled; empty: 600 on CPU, 1800 on Ascend",
        minimum=1,
    )
    dead_after: float = setting(
        60.0, help="seconds without a supervisor heartbeat before a node counts as dead", minimum=1
    )

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
        if not 0 <= self.node_rank < self.nodes:
            raise ValueError(f"node_rank {self.node_rank} is outside 0..{self.nodes - 1} ({self.nodes} node(s))")

    @property
    def nodes(self) -> int:
        return self.worker_num // self.local_worker_num


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


@dataclass(frozen=True)
class ResumePoint:
    """The newest checkpoint every rank finished: its global step and rank 0's file name (mindformers puts each
    rank's id in the name)."""

    step: int
    file_name: str


def checkpoint_step(path: Path) -> int:
    """The global step a safetensors checkpoint holds (its ``step_num``): after a resume mindformers names files by
    the steps of that process, not of the run (a run resumed at step 2 names its step 4 ``...-1_2``)."""
    with open(path, "rb") as f:  # the format: an 8-byte header size, the JSON header, then the tensors' bytes
        header_size = int.from_bytes(f.read(8), "little")
        start, end = json.loads(f.read(header_size))["step_num"]["data_offsets"]
        f.seek(8 + header_size + start)
        return int.from_bytes(f.read(end - start), "little", signed=True)


def resume_point(checkpoint_dir: Path) -> ResumePoint | None:
    """Where a retry resumes, decided before the workers start (on CPU they share no barrier to agree on it).

    A rank's ``meta.json`` names its last checkpoint once the file is complete (mindformers replaces it after the
    save), so a worker killed mid-save leaves its previous one named; the oldest of those, present in every rank,
    is the point. None: some rank finished no checkpoint yet (the job starts from its beginning)."""

    def rank_of(rank_dir: Path) -> int:
        return int(rank_dir.name.removeprefix("rank_"))

    ranks = sorted(Path(checkpoint_dir).glob("rank_*"), key=rank_of)
    last = []
    for rank_dir in ranks:
        try:
            name = json.loads((rank_dir / "meta.json").read_text())["last_ckpt_file"]
            last.append((checkpoint_step(rank_dir / name), rank_dir, name))
        except (OSError, ValueError, KeyError, TypeError):
            return None
    if not last:
        return None
    step, rank_dir, name = min(last, key=lambda found: found[0])
    files = [d / name.replace(f"_rank_{rank_of(rank_dir)}", f"_rank_{rank_of(d)}") for d in ranks]
    with contextlib.suppress(OSError, ValueError, KeyError):
        if all(checkpoint_step(f) == step for f in files):
            return ResumePoint(step, files[0].name)
    return None


def latest_step_checkpoint(checkpoint_dir: Path) -> int:
    """The newest global step every rank finished a checkpoint of (0 when none)."""
    point = resume_point(checkpoint_dir)
    return point.step if point else 0


# ---- the run's YAML -------------------------------------------------------------------------------------------


def resolved_config(cfg: FinetuneConfig) -> dict:
    """The base YAML with the run's inputs filled in (no job folder yet): what the fingerprint covers."""
    run_config = configs.load_yaml(cfg.config)
    for key in REQUIRED_KEYS:
        try:
            _get(run_config, key)
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


def job_config(run_config: dict, job_dir: Path) -> tuple[dict, int]:
    """The resolved YAML placed in ``job_dir``; returns it and the step it resumes from (0: fresh)."""
    run_config = json.loads(json.dumps(run_config))
    run_config["output_dir"] = str(job_dir)
    # every worker writes its steps as JSON lines next to its log (distilled_plugins/in_mindformers/train.py: StepMetricsWriter)
    point = resume_point(job_dir / "checkpoint")
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
    return str(_get(run_config, "context.device_target")).lower()


def stall_timeout(cfg: FinetuneConfig, run_config: dict) -> float:
    return float(cfg.stall_timeout or STALL_TIMEOUT.get(device(run_config), STALL_TIMEOUT["ascend"]))


def expected_steps(cfg: FinetuneConfig, run_config: dict) -> int:
    """Training steps of the whole job: packed rows / (batch x data-parallel workers) x epochs."""
    stats = Path(cfg.dataset_path) / STATS_FILE
    rows = int(json.loads(stats.read_text())["packs"]) if stats.exists() else 0
    layout = run_config.get("parallel_config") or {}
    data_parallel = int(layout.get("data_parallel", 1) or 1) if run_config.get("use_parallel") else 1
    batch = int(_get(run_config, "runner_config.batch_size"))
    epochs = int(_get(run_config, "runner_config.epochs"))
    return max(1, math.ceil(rows / (batch * data_parallel)) * epochs) if rows else 1000


def deferral_timeout(cfg: FinetuneConfig, run_config: dict) -> float:
    """How long the whole job may take before its task gives up: every step at its device's worst step time,
    plus twice the stall timeout for start-up (cluster forming, compiling, loading) and the last save."""
    per_step = MAX_STEP_SECONDS.get(device(run_config), MAX_STEP_SECONDS["ascend"])
    return expected_steps(cfg, run_config) * per_step + 2 * stall_timeout(cfg, run_config)


# ---- preflight ------------------------------------------------------------------------------------------------


def packed_row_length(dataset_path: str | Path) -> int:
    path = Path(dataset_path)
    stats = path / STATS_FILE
    if stats.exists():
        return int(json.loads(stats.read_text())["seq_length"])
    import datasets

    return len(datasets.load_from_disk(str(path))[0]["input_ids"])


def npu_count() -> int:
    return len(list(Path("/dev").glob("davinci[0-9]*")))


def preflight(cfg: FinetuneConfig, run_config: dict, resuming: bool) -> None:
    """Clear errors before anything is launched."""
    dataset = Path(cfg.dataset_path)
    if not dataset.is_dir():
        raise DataError(f"packed dataset {dataset} not found")
    seq_length = int(_get(run_config, "model.model_config.seq_length"))
    rows = packed_row_length(dataset)
    if rows != seq_length:
        raise SeqLengthMismatch(
            f"packed rows of {dataset} hold {rows} tokens but the model's seq_length is {seq_length} "
            f"(the tutorial packed at 8,192 for a 32,768 model): pack again with --seq-length {seq_length}"
            f" or set model.model_config.seq_length to {rows}"
        )
    checkpoint = run_config.get("load_checkpoint")
    if checkpoint and not resuming and not Path(str(checkpoint)).exists():
        raise CheckpointMissing(
            f"load_checkpoint {checkpoint} does not exist; give the base model's folder "
            "(e.g. Qwen2.5-Math-7B-Instruct safetensors)"
        )
    if device(run_config) == "ascend" and npu_count() < cfg.local_worker_num:
        raise ValueError(f"{cfg.local_worker_num} workers per node need as many NPUs; this node has {npu_count()}")


# ---- the fingerprint of a job's inputs ------------------------------------------------------------------------


PACKED_DIGEST = ".rows.sha256.json"  # in a packed folder: the rows' digest, valid while its files' state is


def packed_rows_digest(dataset: Path) -> str:
    """SHA-256 of the packed rows (the ``*.arrow`` files' bytes, by name): the same rows packed again, which is
    what a pack rerun on the same input writes, give the same digest although the files are new (their mtimes,
    ``state.json``'s random fingerprint and the stats' timings change). Computed once per state of the files and
    cached beside them (where the folder can be written), so a retry or a clear does not read the rows again."""
    files = sorted(p for p in dataset.glob("*.arrow") if p.is_file())
    state = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    cache = dataset / PACKED_DIGEST
    try:
        cached = json.loads(cache.read_text())
        if cached.get("state") == state:
            return cached["sha256"]
    except (OSError, ValueError, AttributeError):
        pass
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    value = digest.hexdigest()
    with contextlib.suppress(OSError):  # a read-only dataset: computed again next time
        write_json(cache, {"state": state, "sha256": value})
    return value


def fingerprint(cfg: FinetuneConfig, run_config: dict) -> tuple[str, dict]:
    """A hash of what the job trains on: the packed rows (by content: :func:`packed_rows_digest`) and their
    length, the resolved YAML, the workers, and the base checkpoint's files. Returns it with the inputs it hashes."""
    dataset = Path(cfg.dataset_path)
    stats = dataset / STATS_FILE
    checkpoint = run_config.get("load_checkpoint")
    inputs = {
        "config": run_config,
        "worker_num": cfg.worker_num,
        "local_worker_num": cfg.local_worker_num,
        "packed_seq_length": json.loads(stats.read_text()).get("seq_length") if stats.exists() else None,
        "packed_rows_sha256": packed_rows_digest(dataset),
        "base_checkpoint": {"path": str(checkpoint), "files": files_state(Path(str(checkpoint)))}
        if checkpoint
        else None,
    }
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()
    return digest, inputs


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
