"""Each setting is written once: the CLI, the operator and the trigger form take it from the config dataclass."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distilled_plugins import generate, handle, pack, reject_sampling, settings
from operators import GenerateReasoningOperator, HandleDatasetOperator, PackDatasetOperator, RejectSamplingOperator

# (config class, its CLI's parser, its operator)
STAGES = [
    (reject_sampling.RejectSamplingConfig, reject_sampling.build_parser, RejectSamplingOperator),
    (handle.HandleConfig, handle.build_parser, HandleDatasetOperator),
    (pack.PackConfig, pack.build_parser, PackDatasetOperator),
    (generate.GenerateConfig, generate.build_parser, GenerateReasoningOperator),
]
IDS = [config.__name__ for config, _, _ in STAGES]
REPO = Path(__file__).resolve().parents[1]
DAG_FILE = REPO / "dags" / "distill_r1.py"


def cli_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest != "help"}


@pytest.mark.parametrize(("config", "build_parser", "operator"), STAGES, ids=IDS)
def test_every_field_has_help_and_one_default_everywhere(config, build_parser, operator):
    fields = dataclasses.fields(config)
    assert [f.name for f in fields if not f.metadata.get("help")] == []  # every field is described
    actions = cli_actions(build_parser())
    signature = inspect.signature(operator.__init__).parameters
    for f in fields:
        default = settings.default_of(f)
        if f.metadata["cli"]:
            action = actions[f.name]
            assert action.help.startswith(f.metadata["help"]), f.name
            if default is not dataclasses.MISSING:
                assert action.default == default, f"CLI default of {f.name}: {action.default!r} != {default!r}"
            if f.metadata["choices"]:
                assert tuple(action.choices) == f.metadata["choices"], f.name
        if f.name in operator.not_arguments:  # the operator fills it itself (endpoints from a Connection)
            assert f.name not in signature, f.name
            continue
        if default is dataclasses.MISSING:
            assert signature[f.name].default is inspect.Parameter.empty, f.name
        else:
            assert signature[f.name].default == default, f"operator default of {f.name}"
        if f.name not in operator.not_templated:
            assert f.name in operator.template_fields, f"{f.name} is not templated"


@pytest.mark.parametrize(("config", "build_parser", "operator"), STAGES, ids=IDS)
def test_form_params_follow_the_fields(config, build_parser, operator):
    for f in settings.described_fields(config):
        spec = settings.param_spec(config, f.name)
        default = settings.default_of(f)
        assert spec["default"] == (None if default is dataclasses.MISSING else default)
        assert spec["description"] == f.metadata["help"]
        if f.metadata["minimum"] is not None:
            assert spec["minimum"] == f.metadata["minimum"]


def test_rendered_text_is_coerced_once_centrally():
    assert settings.coerce(pack.PackConfig, "seq_length", "256") == 256
    assert settings.coerce(pack.PackConfig, "seq_length", "None") is None
    assert settings.coerce(handle.HandleConfig, "src", "/a.jsonl") == ["/a.jsonl"]
    assert settings.coerce(handle.HandleConfig, "overwrite", "False") is False
    with pytest.raises(ValueError, match="max_length: expected integer, got 'abc'"):
        settings.coerce(handle.HandleConfig, "max_length", "abc")


def test_operator_rejects_an_unknown_setting():
    with pytest.raises(TypeError, match="max_lenght"):
        HandleDatasetOperator(task_id="h", src="a", tokenizer="t", dst="d", max_lenght=3)


def test_operator_requires_the_required_fields():
    with pytest.raises(TypeError, match="missing keyword argument 'dst'"):
        PackDatasetOperator(task_id="p", src="a")


def test_form_defaults_are_the_fields_defaults():
    """Each trigger-form param that sets a stage setting has that setting's default (no deployment defaults)."""
    code = (
        "import json, importlib.util as u, dataclasses; "
        f"s = u.spec_from_file_location('d', {str(DAG_FILE)!r}); m = u.module_from_spec(s); s.loader.exec_module(m); "
        "from operators.pipeline import FORM_FIELDS; from distilled_plugins.settings import default_of; "
        "fields = {n: next(f for f in dataclasses.fields(c) if f.name == f_) for n, (c, f_) in FORM_FIELDS.items()}; "
        "print(json.dumps({n: [m.params[n].value, default_of(f), m.params[n].description] for n, f in fields.items()}))"
    )
    env = {k: v for k, v in os.environ.items() if k != "AIRFLOW_VAR_DISTILL_DEPLOYMENT"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    form = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(form) >= 9  # the columns, generation, request, handling and packing settings at least
    for name, (param_default, field_default, description) in form.items():
        assert param_default == field_default, f"form default of {name}: {param_default!r} != {field_default!r}"
        assert description, name
