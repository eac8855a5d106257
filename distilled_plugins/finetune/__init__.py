"""Stage 5: fine-tune with mindformers, launched through ``msrun``; resumable, stoppable from any host, one
launcher per node, with metrics and a loss curve.

Usage:
    python -m distilled_plugins.finetune --config configs/finetune_tiny_cpu.yaml --dataset-path packed/ \\
        --output-dir finetune/ --worker-num 1
    # production: --config configs/finetune_qwen_2_5_7b.yaml --load-checkpoint /models/Qwen2.5-Math-7B-Instruct
    #             --worker-num 16 --local-worker-num 8 --node-rank N --master-addr NODE0 (one call per node)

``--output-dir`` (on storage every node sees) holds one folder per job, ``job-<id>``, the id being the first 12
hex digits of a fingerprint of the job's inputs (packed data, resolved YAML, workers, base checkpoint). A job
folder holds ``job.json`` (the fingerprint and its inputs), ``run_config.yaml``, per node ``node-R.json`` (the
supervisor's host, pid, start time and command line), ``node-R.heartbeat``, ``node-R.launcher.log`` and
``node-R.status.json``, ``msrun_log/worker_N.log`` (global ranks), ``checkpoint/rank_N/``, ``stop.json`` when a
stop was requested, and on success ``metrics.json``, ``loss.png`` and ``result.json``.

Running again with the same inputs re-attaches to the job while its heartbeat is fresh, resumes from its newest
checkpoint, or returns its finished result; other inputs start a new job folder (the old one is kept).

Modules: :mod:`.config` (settings), :mod:`.run_config` (the run's YAML, time limits, environment, preflight),
:mod:`.fingerprint` (the job's identity), :mod:`.checkpoints` (resume point), :mod:`.job` (job folder, heartbeat,
stop, "is this process mine"), :mod:`.supervisor` (a node's detached supervisor), :mod:`.metrics` (logs, metrics,
loss curve), :mod:`.stage` (find, launch, wait, collect: ``run``).
"""

from distilled_plugins.finetune.config import FinetuneConfig

__all__ = ["FinetuneConfig"]
