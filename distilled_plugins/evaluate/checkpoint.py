"""Completions from a stage 5 checkpoint with mindformers' own model: ``mf_generate`` in a process of its own
(mindspore's context is global), its progress lines relayed to this log."""

from __future__ import annotations

import collections
import logging
import subprocess
import sys
from pathlib import Path

from distilled_plugins.core.configs import child_env
from distilled_plugins.core.errors import ChildFailed
from distilled_plugins.evaluate.completions import COMPLETIONS_FILE, write_problems
from distilled_plugins.evaluate.config import EvalConfig

logger = logging.getLogger(__package__)  # the stage's name, from any of its modules

MF_GENERATE = "distilled_plugins.in_mindformers.mf_generate"
RELAYED = " distilled_plugins."  # in a line of mf_generate's own loggers (not mindformers' or mindspore's)


def mf_generate_command(cfg: EvalConfig, problems_file: Path, output: Path) -> list[str]:
    """``python -m ...mf_generate`` with the protocol and the checkpoint mode's settings as its flags."""
    protocol = cfg.protocol
    flags = {
        "--config": cfg.mindformers_config,
        "--checkpoint": cfg.checkpoint,
        "--tokenizer": cfg.tokenizer,
        "--problems": problems_file,
        "--output": output,
        "--system-prompt": protocol.system_prompt,
        "--num-samples": protocol.n_samples,
        "--max-new-tokens": protocol.max_new_tokens,
        "--temperature": protocol.temperature,
        "--top-p": protocol.top_p,
        "--seed": protocol.seed,
        "--batch-size": cfg.batch_size,
        "--prompt-template": cfg.prompt_template,
    }
    return [sys.executable, "-m", MF_GENERATE, *(item for flag, value in flags.items() for item in (flag, str(value)))]


def completions_from_checkpoint(cfg: EvalConfig, problems: list[dict], folder: Path) -> Path:
    output = folder / COMPLETIONS_FILE
    command = mf_generate_command(cfg, write_problems(folder, problems), output)
    env_log = Path(cfg.out) / "mindformers"
    env = child_env()  # no Airflow secrets, no API keys
    env.update(LOG_MF_PATH=str(env_log / "log"), LOCAL_DEFAULT_PATH=str(env_log))
    tail: collections.deque[str] = collections.deque(maxlen=20)
    # the generation's own lines (progress every few seconds) go to this log as they come; mindformers' and
    # mindspore's chatter stays in the tail kept for an error message
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            if RELAYED in line:
                logger.info("mf_generate: %s", line.split(": ", 1)[-1])
    if proc.returncode != 0:
        raise ChildFailed(
            f"mindformers generation from {cfg.checkpoint} failed (exit {proc.returncode}):\n" + "\n".join(tail)
        )
    return output
