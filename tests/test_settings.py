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

from distilled_plugins.core import settings
from distilled_plugins.evaluate.__main__ import build_parser as evaluate_parser
from distilled_plugins.evaluate.config import EvalConfig, Protocol
from distilled_plugins.finetune import FinetuneConfig
from distilled_plugins.finetune.__main__ import build_parser as finetune_parser
from distilled_plugins.generate.__main__ import build_parser as generate_parser
from distilled_plugins.generate.config import GenerateConfig
from distilled_plugins.handle.__main__ import build_parser as handle_parser
from distilled_plugins.handle.config import HandleConfig
from distilled_plugins.pack.__main__ import build_parser as pack_parser
from distilled_plugins.pack.config import PackConfig
from distilled_plugins.reject_sampling.__main__ import build_parser as reject_sampling_parser
from distilled_plugins.reject_sampling.config import RejectSamplingConfig
from distilled_plugins.teacher import batch_api
from distilled_plugins.teacher.settings import RequestSettings
from operators import (
    GenerateReasoningOperator,
    HandleDatasetOperator,
    Math500EvalOperator,
    MsrunFinetuneOperator,
    PackDatasetOperator,
    RejectSamplingOperator,
)
from operators.stage import StageOperator

# (config class, its CLI's parser, its operator)
STAGES = [
    (RejectSamplingConfig, reject_sampling_parser, RejectSamplingOperator),
    (HandleConfig, handle_parser, HandleDatasetOperator),
    (PackConfig, pack_parser, PackDatasetOperator),
    (GenerateConfig, generate_parser, GenerateReasoningOperator),
    (EvalConfig, evaluate_parser, Math500EvalOperator),
    (FinetuneConfig, finetune_parser, MsrunFinetuneOperator),
]
# each settings class whose fields the trigger form sets -> (its CLI's parser, the operator taking them)
OWNERS = {
    **{config: (build_parser, operator) for config, build_parser, operator in STAGES},
    Protocol: (evaluate_parser, Math500EvalOperator),
    RequestSettings: (generate_parser, GenerateReasoningOperator),
    batch_api.BatchSettings: (generate_parser, GenerateReasoningOperator),
}
IDS = [config.__name__ for config, _, _ in STAGES]
REPO = Path(__file__).resolve().parents[1]
DAG_FILE = REPO / "dags" / "distill_r1.py"


def cli_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest != "help"}


def operator_fields(config, operator) -> list[tuple[type, dataclasses.Field]]:
    """(settings class, field) of every field the operator takes: the config's, with nested settings flattened."""
    nested = getattr(operator, "nested", {})
    top = [(config, f) for f in dataclasses.fields(config) if f.name not in nested]
    return top + [(klass, f) for klass in nested.values() for f in dataclasses.fields(klass)]


@pytest.mark.parametrize(("config", "build_parser", "operator"), STAGES, ids=IDS)
def test_every_field_has_help_and_one_default_everywhere(config, build_parser, operator):
    fields = operator_fields(config, operator)
    assert [f.name for _, f in fields if not f.metadata.get("help")] == []  # every field is described
    actions = cli_actions(build_parser())
    signature = inspect.signature(operator.__init__).parameters
    for _, f in fields:
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
    for klass, f in operator_fields(config, operator):
        spec = settings.param_spec(klass, f.name)
        default = settings.default_of(f)
        assert spec["default"] == (None if default is dataclasses.MISSING else default)
        assert spec["description"] == f.metadata["help"]
        if f.metadata["minimum"] is not None:
            assert spec["minimum"] == f.metadata["minimum"]


def test_rendered_text_is_coerced_once_centrally():
    assert settings.coerce(PackConfig, "seq_length", "256") == 256
    assert settings.coerce(PackConfig, "seq_length", "None") is None
    assert settings.coerce(HandleConfig, "src", "/a.jsonl") == ["/a.jsonl"]
    assert settings.coerce(HandleConfig, "overwrite", "False") is False
    with pytest.raises(ValueError, match="max_length: expected integer, got 'abc'"):
        settings.coerce(HandleConfig, "max_length", "abc")


def test_operator_rejects_an_unknown_setting():
    with pytest.raises(TypeError, match="max_lenght"):
        HandleDatasetOperator(task_id="h", src="a", tokenizer="t", dst="d", max_lenght=3)


def test_operator_requires_the_required_fields():
    with pytest.raises(TypeError, match="missing keyword argument 'dst'"):
        PackDatasetOperator(task_id="p", src="a")


def test_form_cli_and_operator_defaults_agree():
    """Each trigger-form param that sets a stage setting has one default: the field's, which is also the CLI's and
    the operator's; a param left empty by default ("not set here") has the operator's default, None, and says in
    its description what decides then. Run without a deployment's own defaults."""
    code = (
        "import json, importlib.util as u; "
        f"s = u.spec_from_file_location('d', {str(DAG_FILE)!r}); m = u.module_from_spec(s); s.loader.exec_module(m); "
        "from operators.dag_helpers.params import FORM_FIELDS, UNSET_BY_DEFAULT; "
        "print(json.dumps({n: [c.__module__ + ':' + c.__qualname__, f, m.params[n].value, m.params[n].description,"
        " m.params[n].schema, n in UNSET_BY_DEFAULT] for n, (c, f) in FORM_FIELDS.items()}))"
    )
    env = {k: v for k, v in os.environ.items() if k != "AIRFLOW_VAR_DISTILL_DEPLOYMENT"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    form = json.loads(done.stdout.strip().splitlines()[-1])
    classes = {f"{c.__module__}:{c.__qualname__}": c for c in OWNERS}
    # every evaluation, fine-tune and teacher request param the form has comes from a field
    expected = {"eval_samples", "eval_limit", "eval_max_new_tokens", "master_addr", "master_port", "finetune_config"}
    expected |= {"base_checkpoint", "request_attempts", "teacher_stream", "teacher_request_timeout", "uuid_column"}
    assert expected <= set(form)
    for name, (owner, field, param_default, description, schema, unset) in form.items():
        config = classes[owner]
        f = next(f for f in dataclasses.fields(config) if f.name == field)
        field_default = settings.default_of(f)
        build_parser, operator = OWNERS[config]
        cli_default = cli_actions(build_parser())[field].default
        operator_default = inspect.signature(operator.__init__).parameters[field].default
        assert cli_default == field_default, f"CLI default of {name}: {cli_default!r} != {field_default!r}"
        assert description.startswith(f.metadata["help"]), name
        if unset:  # empty: not set here; the connection, then the field's default decide
            assert param_default is None and operator_default is None, name
            assert "null" in schema["type"] and "(empty: " in description, name
        else:
            assert param_default == field_default, f"form default of {name}: {param_default!r} != {field_default!r}"
            assert operator_default == field_default, f"operator default of {name}: {operator_default!r}"
        if f.metadata["minimum"] is not None:  # the form may narrow the field's range, never widen it
            assert schema["minimum"] >= f.metadata["minimum"], name
        if f.metadata["maximum"] is not None:
            assert schema["maximum"] <= f.metadata["maximum"], name


def test_the_form_speaks_of_what_it_shows_and_names_fields_it_cannot_check():
    """Airflow 3.3.2's form lets a fraction through an integer field (its number input has no step) and the API's
    400 reaches the user as a bare toast: whole-number fields are number fields saying so, and the run's first task
    names them (tests/test_clear_airflow.py). No description names a CLI flag; the two datasets of the other entry
    points are optional; an empty teacher setting is described once."""
    from distilled_plugins import preflight

    code = (
        "import json, importlib.util as u; "
        f"s = u.spec_from_file_location('d', {str(DAG_FILE)!r}); m = u.module_from_spec(s); s.loader.exec_module(m); "
        "from operators.dag_helpers.params import WHOLE_NUMBERS; "
        "print(json.dumps({'whole': sorted(WHOLE_NUMBERS), "
        "'params': {n: [p.description, p.schema, p.value] for n, p in m.params.items()}}))"
    )
    env = {k: v for k, v in os.environ.items() if k != "AIRFLOW_VAR_DISTILL_DEPLOYMENT"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    form = json.loads(done.stdout.strip().splitlines()[-1])
    params, whole = form["params"], set(form["whole"])
    integer_fields = {"epochs", "shards", "num_generations", "max_tokens", "max_length", "eval_samples", "eval_limit"}
    integer_fields |= {"nodes", "workers_per_node", "master_port", "request_attempts", "max_concurrent"}
    assert integer_fields <= whole
    for name, (description, schema, _) in params.items():
        kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        assert "integer" not in kinds, name  # the form would let 2.5 through to a bare "Bad Request"
        assert (name in whole) == ("a whole number" in description), name
        assert " --" not in f" {description}", (name, description)  # no CLI flag: the form shows titles
    assert "null" in params["openr1_dataset"][1]["type"] and "minLength" not in params["openr1_dataset"][1]
    assert "null" in params["packed_dataset"][1]["type"] and "minLength" not in params["packed_dataset"][1]
    rpm = params["teacher_max_rpm"][0]
    assert rpm.count("empty") == 1 and "unset" not in rpm, rpm
    # and the first task refuses a fraction, naming the field by its title
    run = preflight.RunInputs(source="packed_dataset", whole_numbers={"epochs": 2.5, "shards": 2.0})
    lines = preflight.problems(run, titles={"epochs": params["epochs"][1]["title"]})
    assert "Epochs: 2.5 is not a whole number; give a whole number" in lines
    assert not any(line.startswith("shards") for line in lines)


# ---- a new setting is one field ------------------------------------------------------------------------------


@dataclasses.dataclass
class ThrowawayConfig:
    dst: str = settings.setting(help="output file", required=True)
    beams: int = settings.setting(
        3, help="beams searched per problem", minimum=1, maximum=8, title="Beams", section=settings.PROCESSING
    )


class ThrowawayOperator(StageOperator):
    config_class = ThrowawayConfig

    def execute(self, context):
        return self.stage_config()


def test_a_new_setting_is_one_field():
    """The field ``beams`` written once reaches the command line, the operator and the trigger form."""
    from operators.dag_helpers.params import FORM_FIELDS, field_param

    parser = argparse.ArgumentParser()
    settings.add_arguments(parser, ThrowawayConfig)
    beams = cli_actions(parser)["beams"]
    assert beams.option_strings == ["--beams"] and beams.default == 3 and beams.type is int
    assert beams.help == "beams searched per problem (default: 3)"
    assert settings.from_args(ThrowawayConfig, parser.parse_args(["--dst", "o", "--beams", "5"])).beams == 5

    assert inspect.signature(ThrowawayOperator.__init__).parameters["beams"].default == 3
    assert "beams" in ThrowawayOperator.template_fields
    assert ThrowawayOperator(task_id="t", dst="o").beams == 3
    rendered = ThrowawayOperator(task_id="t", dst="o", beams="6")  # as a template renders it: text
    assert rendered.stage_config() == ThrowawayConfig(dst="o", beams=6) and rendered.beams == "6"

    try:
        param = field_param("beams", ThrowawayConfig, "beams", defaults={})
        assert param.value == 3 and param.description == "beams searched per problem"
        assert param.schema["title"] == "Beams" and param.schema["section"] == settings.PROCESSING
        assert (param.schema["type"], param.schema["minimum"], param.schema["maximum"]) == ("integer", 1, 8)
        assert field_param("beams", ThrowawayConfig, "beams", defaults={"beams": 4}).value == 4  # a deployment's
    finally:
        FORM_FIELDS.pop("beams", None)


# ---- output flags ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build_parser", "required", "aliases"),
    [
        (reject_sampling_parser, ["--src", "in.jsonl"], []),
        (handle_parser, ["--src", "in.jsonl", "--tokenizer", "t"], []),
        (pack_parser, ["--src", "in"], []),
        (generate_parser, ["--model", "m", "--dataset-name", "d"], ["--output-file"]),
        (evaluate_parser, ["--rescore", "c.jsonl"], ["--out", "--output-dir"]),
        (finetune_parser, ["--dataset-path", "p"], ["--output-dir"]),
    ],
    ids=["reject_sampling", "handle", "pack", "generate", "evaluate", "finetune"],
)
def test_every_stage_writes_where_dst_says(build_parser, required, aliases):
    """``--dst`` names every stage's output; the names the tutorial (or an older version) used still work."""
    for flag in ["--dst", *aliases]:
        args = build_parser().parse_args([*required, flag, "target"])
        dest = next(a.dest for a in build_parser()._actions if "--dst" in a.option_strings)
        assert getattr(args, dest) == "target", flag


def test_the_teachers_endpoint_and_sampling_fields_are_one_group_each():
    """Generation and evaluation inherit EndpointSettings and Sampling: the same flags, help and ranges; a stage's
    own default (settings.redefault) changes nothing else of the field."""
    from distilled_plugins.teacher.settings import EndpointSettings, Sampling

    for group, owners in ((EndpointSettings, (GenerateConfig, EvalConfig)), (Sampling, (GenerateConfig, Protocol))):
        for shared in dataclasses.fields(group):
            for owner in owners:
                own = next(f for f in dataclasses.fields(owner) if f.name == shared.name)
                assert own.metadata["help"] == shared.metadata["help"], (owner.__name__, shared.name)
                assert own.metadata["minimum"] == shared.metadata["minimum"], (owner.__name__, shared.name)
    by_name = {f.name: f for f in dataclasses.fields(GenerateConfig)}
    assert by_name["model"].metadata["required"] and by_name["max_concurrent"].default == 100
    assert by_name["max_concurrent"].metadata["section"] == "Teacher"
    assert next(f for f in dataclasses.fields(EvalConfig) if f.name == "max_concurrent").default == 64
    # evaluation hands its endpoint and sampling to generation by the groups' fields, none by hand
    cfg = EvalConfig(out="x", api_addr="h:1", model="m", protocol=Protocol(temperature=0.0))
    assert settings.values_of(EndpointSettings, cfg)["api_addr"] == "h:1"
    assert settings.values_of(Sampling, cfg.protocol) == {"temperature": 0.0, "top_p": 0.95}
