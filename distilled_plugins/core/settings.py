"""Each setting written once: a dataclass field carries its default, help, choices and range.

The command line, the Airflow operator and the DAG's trigger form are all built from the stage's config
dataclass, so a default or a help text changes in one place (transformers' ``HfArgumentParser`` and open-r1's
``ScriptArguments`` are the model)::

    @dataclass
    class PackConfig:
        src: str = setting(help="handled dataset folder (stage 3)", required=True)
        overlong: str = setting("split", help="samples longer than seq_length", choices=("truncate", "split"))

    parser = argparse.ArgumentParser()
    add_arguments(parser, PackConfig)          # --src (required), --overlong {truncate,split} (default: split)
    config = from_args(PackConfig, parser.parse_args())
    param_spec(PackConfig, "overlong")         # {"default": "split", "type": "string", "enum": [...], ...}

>>> import argparse
>>> from dataclasses import dataclass
>>> @dataclass
... class Demo:
...     rows: int = setting(8, help="rows per batch", minimum=1)
...     mode: str = setting("fast", help="how", choices=("fast", "slow"))
>>> parser = argparse.ArgumentParser()
>>> add_arguments(parser, Demo)
>>> from_args(Demo, parser.parse_args(["--rows", "3"]))
Demo(rows=3, mode='fast')
>>> param_spec(Demo, "rows")["minimum"], param_spec(Demo, "mode")["enum"]
(1, ['fast', 'slow'])
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Sequence
from typing import Any

_MISSING = dataclasses.MISSING

# the trigger form's sections (its collapsible groups, shown in this order); a field names its own
DATA, TEACHER, PROCESSING, FINETUNE, MULTINODE, EVALUATION, OUTPUT = SECTIONS = (
    "Data",
    "Teacher",
    "Processing",
    "Fine-tune",
    "Multi-node (rarely changed)",
    "Evaluation",
    "Output",
)


def setting(
    default: Any = _MISSING,
    *,
    help: str,
    choices: Sequence | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    required: bool = False,
    flag: str | None = None,
    aliases: Sequence[str] = (),
    title: str | None = None,
    section: str | None = None,
    factory: Any = None,
    cli: bool = True,
    repr: bool = True,
) -> Any:
    """A dataclass field that is also a command-line flag, an operator argument and a trigger-form param.

    ``flag`` overrides ``--field-name``; ``aliases`` keeps the tutorial's names working; ``cli=False`` keeps a
    field off the command line (objects a caller builds, such as a retry policy); ``repr=False`` keeps a secret
    out of the config's repr.
    """
    metadata = {
        "help": help,
        "choices": tuple(choices) if choices is not None else None,
        "minimum": minimum,
        "maximum": maximum,
        "required": required,
        "flag": flag,
        "aliases": tuple(aliases),
        "title": title,
        "section": section,
        "cli": cli,
    }
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata, repr=repr)
    if required:
        return dataclasses.field(metadata=metadata, repr=repr)
    return dataclasses.field(default=default, metadata=metadata, repr=repr)


def redefault(owner, name: str, default: Any = _MISSING, *, required: bool = False, **changes) -> Any:
    """Field ``name`` of the settings class ``owner`` (a group of fields several stages share), with this stage's
    default (or ``required=True``) and, where given, its own ``title``, ``section``, ``minimum`` or ``maximum``:
    the help, the flag and the rest stay written once, in ``owner``."""
    f = next(f for f in dataclasses.fields(owner) if f.name == name)
    metadata = {**f.metadata, "required": required, **changes}
    if required:
        return dataclasses.field(metadata=metadata, repr=f.repr, kw_only=True)
    return dataclasses.field(default=default, metadata=metadata, repr=f.repr, kw_only=True)


def values_of(group, obj) -> dict[str, Any]:
    """``obj``'s values of the fields of the settings class ``group`` (one of the groups it inherits), by name."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(group)}


def described_fields(cls) -> list[dataclasses.Field]:
    """The fields of a config dataclass made with :func:`setting`, in order."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:
        return f.default_factory()
    return _MISSING


def _base_type(f: dataclasses.Field, cls) -> tuple[type, bool, bool]:
    """(element type, is a list, may be None) of a field's annotation."""
    hint = typing.get_type_hints(cls)[f.name]
    nullable = False
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        nullable = type(None) in args
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True, nullable
    return hint, False, nullable


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_arguments(
    parser: argparse.ArgumentParser,
    cls,
    exclude: Sequence[str] = (),
    optional: Sequence[str] = (),
    prefix: str = "",
) -> None:
    """Add one flag per described field of ``cls`` (defaults, help and choices from the field).

    ``optional`` names required fields whose flag may be left out (the command checks them itself). ``prefix``
    gives a second copy of a settings class its own flags and destinations (``prefix="judge_"``: ``--judge-max-rpm``
    into ``args.judge_max_rpm``; read back with ``from_args(cls, args, prefix="judge_")``).
    """
    for f in described_fields(cls):
        if f.name in exclude or not f.metadata["cli"]:
            continue
        kind, is_list, _ = _base_type(f, cls)
        meta = f.metadata
        default = default_of(f)
        options: dict[str, Any] = {"dest": prefix + f.name, "help": meta["help"]}
        if meta["required"]:
            options["required"] = f.name not in optional
            options["default"] = None
        else:
            options["default"] = default
            if default is not None and default != "" and kind is not bool:
                options["help"] += f" (default: {default})"
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction if default else "store_true"
        else:
            options["type"] = kind
            if meta["choices"]:
                options["choices"] = meta["choices"]
            if is_list:
                options["nargs"] = "+"
        if prefix:
            parser.add_argument("--" + (prefix + f.name).replace("_", "-"), **options)
        else:
            parser.add_argument(flag_of(f), *meta["aliases"], **options)


def coerce(cls, name: str, value: Any) -> Any:
    """``value`` as field ``name``'s type when it arrives as text (a rendered template, an environment value)."""
    if not isinstance(value, str):
        return value
    f = next((f for f in dataclasses.fields(cls) if f.name == name), None)
    if f is None:
        return value
    kind, is_list, nullable = _base_type(f, cls)
    if nullable and value.strip() in ("", "None", "null"):
        return None
    if is_list:
        return [value]
    if kind is bool:
        if value.strip().lower() in ("true", "1", "yes", "on"):
            return True
        if value.strip().lower() in ("false", "0", "no", "off", ""):
            return False
        raise ValueError(f"{name}: expected true or false, got {value!r}")
    if kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            raise ValueError(f"{name}: expected {_JSON_TYPES[kind]}, got {value!r}") from None
    return value


def from_args(cls, args: argparse.Namespace, prefix: str = "", **extra):
    """An instance of ``cls`` from parsed arguments (fields without a flag take ``extra`` or their default)."""
    values = {f.name: getattr(args, prefix + f.name) for f in dataclasses.fields(cls) if hasattr(args, prefix + f.name)}
    return cls(**{**values, **extra})


_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean"}


def param_spec(cls, name: str, **overrides) -> dict[str, Any]:
    """The keyword arguments of an Airflow ``Param`` for field ``name`` (no Airflow import here)."""
    f = next((f for f in dataclasses.fields(cls) if f.name == name), None)
    if f is None or "help" not in f.metadata:
        raise KeyError(f"{cls.__name__} has no described field {name!r}")
    kind, is_list, nullable = _base_type(f, cls)
    meta = f.metadata
    json_type: Any = "array" if is_list else _JSON_TYPES.get(kind, "string")
    default = default_of(f)
    if nullable or default is None:
        json_type = ["null", json_type]
    spec: dict[str, Any] = {
        "default": None if default is _MISSING else default,
        "type": json_type,
        "title": meta.get("title") or name.replace("_", " ").capitalize(),
        "description": meta["help"],
    }
    if meta.get("section"):
        spec["section"] = meta["section"]
    if meta.get("choices"):
        spec["enum"] = [*meta["choices"], *([None] if nullable else [])]
    if meta.get("minimum") is not None:
        spec["minimum"] = meta["minimum"]
    if meta.get("maximum") is not None:
        spec["maximum"] = meta["maximum"]
    spec.update(overrides)
    return spec


def is_empty(value) -> bool:
    """A form field left empty, as a template renders it (``None`` becomes "None"; JSON's null, "null")."""
    return value is None or (isinstance(value, str) and value.strip() in ("", "None", "null"))
