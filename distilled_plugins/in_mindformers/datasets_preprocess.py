"""The project's equivalent of mindformers' ``toolkit/data_preprocess/huggingface/datasets_preprocess.py``
(not in the mindformers wheel): run a data loader config's handlers and ``save_to_disk`` the result.

Usage:
    python -m distilled_plugins.in_mindformers.datasets_preprocess --config configs/data_process_handling.yaml \\
        --save_path handled/ --register_path distilled_plugins/in_mindformers/ [--data_files filtered.jsonl ...]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import sys
from pathlib import Path

from distilled_plugins.core import cli
from distilled_plugins.core.configs import load_yaml
from distilled_plugins.core.io import atomic_dir

logger = logging.getLogger(__name__)


def register(path: str | Path) -> list[str]:
    """Expose the data handler classes of ``path`` (a module file, or every module of a folder, as the tutorial's
    ``--register_path`` does) to mindformers' ``HFDataLoader``; returns their names."""
    import mindformers.dataset.handler as mindformers_handlers
    from mindformers.dataset.handler.base_handler import BaseInstructDataHandler

    path = Path(path).resolve()
    if path.is_file() and path.suffix == ".py":
        folder, sources = path.parent, [path]
    elif path.is_dir():
        folder, sources = path, [p for p in sorted(path.glob("*.py")) if not p.stem.startswith("_")]
    else:
        raise ValueError(f"--register_path {path}: neither a folder nor a .py file")
    # a folder inside packages is imported by its dotted name (distilled_plugins.in_mindformers), not by its
    # own name alone, which could shadow a library (a folder named "mindformers")
    root, parts = folder, []
    while (root / "__init__.py").exists():
        root, parts = root.parent, [root.name, *parts]
    package = ".".join(parts) or None
    sys.path.insert(0, str(root))
    found = []
    for source in sources:
        module = importlib.import_module(f"{package}.{source.stem}" if package else source.stem)
        for name, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseInstructDataHandler) and obj.__module__ == module.__name__:
                setattr(mindformers_handlers, name, obj)
                found.append(name)
    return found


def preprocess(config_path: str | Path, save_path: str | Path, data_files: list[str] | None = None) -> Path:
    from mindformers.dataset.dataloader.hf_dataloader import HFDataLoader, process_legacy_args

    config = load_yaml(config_path)
    try:
        loader = dict(config["train_dataset"]["data_loader"])
    except (KeyError, TypeError):
        raise ValueError(f"{config_path}: no train_dataset.data_loader section") from None
    if data_files:
        loader["data_files"] = list(data_files)
    hf_config = HFDataLoader._build_config(**process_legacy_args(**loader))
    dataset = HFDataLoader.load_dataset(hf_config)
    if hf_config.process is not None:
        dataset, _ = HFDataLoader.process_dataset(hf_config, dataset)
    with atomic_dir(save_path) as tmp:
        dataset.save_to_disk(str(tmp))
    logger.info("processed %d rows into %s", len(dataset), save_path)
    return Path(save_path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m distilled_plugins.in_mindformers.datasets_preprocess", description=__doc__.split("\n")[0]
    )
    p.add_argument("--config", required=True, help="YAML with train_dataset.data_loader")
    p.add_argument("--save_path", default="./handled_data")
    p.add_argument(
        "--register_path",
        default=str(Path(__file__).resolve().with_name("data_handler.py")),
        help="a module, or a folder of modules, defining extra data handlers (default: this project's handler)",
    )
    p.add_argument("--data_files", nargs="+", default=None, help="override data_loader.data_files")
    args = p.parse_args(argv)
    cli.start_logging()
    logger.info("registered data handlers: %s", register(args.register_path))
    preprocess(args.config, args.save_path, args.data_files)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
