"""The project's YAML configs: where they live and the values other stages read from them."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
FINETUNE_7B = CONFIG_DIR / "finetune_qwen_2_5_7b.yaml"
# the demo's and the tests' profile, and its own tokenizer: Qwen2.5's cut to the profile's 4,096-token vocabulary
# (distilled_plugins/devtools/tiny_tokenizer.py writes it)
FINETUNE_TINY = CONFIG_DIR / "finetune_tiny_cpu.yaml"
TINY_TOKENIZER = CONFIG_DIR / "tokenizer_tiny"
# the public data beside the checkout (MATH-500, the Qwen2.5 tokenizer, ...); DISTILL_DATA moves it (Docker: /data)
# the Airflow worker's own settings and secrets (database and broker URLs with passwords, fernet key, connections)
# and the keys of the teacher and the hub are none of the business of the processes a stage starts (msrun, its
# workers, mindformers generation): child_env() leaves them out
PRIVATE_ENV_PREFIXES = ("AIRFLOW__", "AIRFLOW_CONN_", "AIRFLOW_VAR_")
PRIVATE_ENV_NAMES = ("OPENAI_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
SHARED_DATA = Path(os.environ.get("DISTILL_DATA", CONFIG_DIR.parents[1] / "shared" / "data"))
# the data at hand's defaults, one place for every stage, the DAG and the preflight
MATH500 = SHARED_DATA / "math500" / "test.jsonl"
QWEN_TOKENIZER = SHARED_DATA / "tokenizer" / "qwen2.5"


def resolve(name_or_path: str | Path) -> Path:
    """A config path as given, or a bare name (``finetune_tiny_cpu.yaml``) looked up in ``configs/``."""
    path = Path(name_or_path)
    if not path.exists() and (CONFIG_DIR / path.name).exists() and path.parent == Path("."):
        return CONFIG_DIR / path.name
    return path


def load_yaml(path: str | Path) -> dict:
    path = resolve(path)
    if not path.is_file():
        raise FileNotFoundError(f"config {path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a YAML mapping at the top, got {type(config).__name__}")
    return config


def seq_length_of(finetune_config: str | Path) -> int:
    """``model.model_config.seq_length`` of a fine-tune config: the one source of the packed row length."""
    try:
        value = load_yaml(finetune_config)["model"]["model_config"]["seq_length"]
    except (KeyError, TypeError):
        raise ValueError(f"{finetune_config}: no model.model_config.seq_length") from None
    if not isinstance(value, int) or value < 2:
        raise ValueError(f"{finetune_config}: model.model_config.seq_length must be an integer >= 2, got {value!r}")
    return value


def check_built_tokenizer(finetune_config: str | Path, tokenizer, whose: str) -> None:
    """A tokenizer built for a profile (the tiny profile's, the learnability task's; ``whose`` names it in the
    error) must have exactly its model's ``vocab_size`` and pad id."""
    model = load_yaml(finetune_config)["model"]["model_config"]
    if (model["vocab_size"], model["pad_token_id"]) != (len(tokenizer), tokenizer.pad_token_id):
        raise ValueError(
            f"{finetune_config}: model vocab_size {model['vocab_size']} and pad_token_id {model['pad_token_id']} must "
            f"be the {whose}'s {len(tokenizer)} and {tokenizer.pad_token_id}"
        )


def packed_pad_mismatch(packed_pad: int | None, finetune_config: str | Path, model_config: dict) -> str | None:
    """Why rows packed with a tokenizer whose pad id is ``packed_pad`` (pack records it in its stats) do not suit
    the fine-tune profile's model, or None when they do (or the pad id is unknown): another pad id means another
    tokenizer, whose ids name other tokens or lie past the model's vocabulary."""
    model_pad = model_config.get("pad_token_id")
    if packed_pad is None or model_pad is None or int(packed_pad) == int(model_pad):
        return None
    own = f" ({TINY_TOKENIZER})" if Path(finetune_config).name == FINETUNE_TINY.name else ""
    return (
        f"packed with pad id {packed_pad}, but the fine-tune profile {Path(finetune_config).name} pads with "
        f"{model_pad} (a vocabulary of {model_config.get('vocab_size')}): another tokenizer than its model's (or "
        f"pack's --pad-token-id); handle and pack again with the tokenizer its model was made for{own}, or pick the "
        "profile the data was packed for"
    )


def child_env() -> dict[str, str]:
    """This process's environment without the secrets a started process has no use for (see above).

    >>> os.environ.update(HF_TOKEN="hf_x", AIRFLOW_CONN_TEACHER="http://k@h", DISTILL_EXAMPLE="kept")
    >>> env = child_env()
    >>> "HF_TOKEN" in env, "AIRFLOW_CONN_TEACHER" in env, env["DISTILL_EXAMPLE"]
    (False, False, 'kept')
    >>> for name in ("HF_TOKEN", "AIRFLOW_CONN_TEACHER", "DISTILL_EXAMPLE"):
    ...     del os.environ[name]
    """
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(PRIVATE_ENV_PREFIXES) and name not in PRIVATE_ENV_NAMES
    }
