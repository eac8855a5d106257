"""Completions from an OpenAI-compatible endpoint serving the model (vLLM, vLLM-MindSpore, MindIE), made by stage 1's
generation with the evaluation's protocol: its client, retries, rate limits and resume."""

from __future__ import annotations

from pathlib import Path

from distilled_plugins.core.settings import values_of
from distilled_plugins.evaluate.completions import COMPLETIONS_FILE, write_problems
from distilled_plugins.evaluate.config import EvalConfig
from distilled_plugins.generate import GenerateConfig
from distilled_plugins.generate.stage import run as generate
from distilled_plugins.teacher.settings import EndpointSettings, Sampling


def completions_from_endpoint(cfg: EvalConfig, problems: list[dict], folder: Path) -> Path:
    protocol = cfg.protocol
    result = generate(
        GenerateConfig(
            dataset_name=str(write_problems(folder, problems)),
            output_file=str(folder / COMPLETIONS_FILE),
            **values_of(EndpointSettings, cfg),
            **values_of(Sampling, protocol),
            prompt_column="problem",
            uuid_column="unique_id",
            num_generations=protocol.n_samples,
            max_tokens=protocol.max_new_tokens,
            prompt_template="{prompt}",
            system_prompt=protocol.system_prompt,
            seed=protocol.seed,
            retry=cfg.retry,
        )
    )
    return result.output_file
