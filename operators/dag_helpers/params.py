"""The trigger form's fields: :func:`form_param` for a run's own settings, :func:`field_param` for a stage setting
(its default, type, range, title and section come from the stage's config field), and whole-number fields made
safe for Airflow's form (:func:`whole_numbers_in_form`)."""

from __future__ import annotations

from typing import Any

from airflow.sdk import Param

from distilled_plugins.core.settings import param_spec


def form_param(default: Any, title: str, section: str, description: str, **schema) -> Param:
    """One field of the trigger form: ``title`` is its label, ``section`` the collapsible group it sits in."""
    return Param(default, title=title, section=section, description=description, **schema)


# trigger-form param -> the stage config field it sets (tests check that their defaults agree) ...
FORM_FIELDS: dict[str, tuple[type, str]] = {}
# ... and those left empty by default, meaning "not set here" (the operator's default is None too)
UNSET_BY_DEFAULT: set[str] = set()


def field_param(
    name: str,
    config: type,
    field: str,
    title: str | None = None,
    section: str | None = None,
    defaults: dict | None = None,
    *,
    unset: str | None = None,
    **schema,
) -> Param:
    """A form field for a stage setting: its default, title, section, description, type, choices and range come
    from the config dataclass field (``distilled_plugins.core.settings``); ``title``/``section`` given here replace the
    field's, ``defaults`` (a deployment's own) and ``schema`` refine it.

    ``unset`` makes the field empty by default, meaning "not set here", and says what decides then (``{default}``
    is the field's default), e.g. ``unset="the connection's extra, else {default}"``.
    """
    spec = param_spec(config, field)
    FORM_FIELDS[name] = (config, field)
    keywords = {k: spec[k] for k in ("type", "enum", "minimum", "maximum") if k in spec}
    description, default = spec["description"], spec["default"]
    if unset is not None:
        UNSET_BY_DEFAULT.add(name)
        kind = keywords["type"]
        keywords["type"] = kind if isinstance(kind, list) else ["null", kind]
        shown = ("on" if default else "off") if isinstance(default, bool) else default
        shown = f"{shown:g}" if isinstance(shown, float) else shown
        description += f" (empty: {unset.format(default=shown)})"
        default = None
    if spec.get("section") is None and section is None:
        raise ValueError(f"{config.__name__}.{field}: no form section; give one in setting(section=...)")
    return form_param(
        (defaults or {}).get(name, default),
        title or spec["title"],
        section or spec["section"],
        description,
        **{**keywords, **schema},
    )


# params that take only whole numbers: Airflow 3.3's trigger form shows "integer" and "number" fields alike and lets
# a fraction through, which the API then refuses with a bare "Bad Request" toast that names no field. So the form
# takes them as numbers, their descriptions say so, and the run's first task (choose_source) names the field.
WHOLE_NUMBERS: set[str] = set()
WHOLE_NUMBER_NOTE = "; a whole number (a fraction fails the run's first task, which names this field)"


def whole_numbers_in_form(params: dict[str, Param]) -> dict[str, Param]:
    """``params`` with each integer field made a number field that says it takes whole numbers (see above)."""
    for name, param in params.items():
        kinds = param.schema.get("type")
        kinds = kinds if isinstance(kinds, list) else [kinds]
        if "integer" in kinds:
            WHOLE_NUMBERS.add(name)
            numbers = ["number" if k == "integer" else k for k in kinds]
            param.schema["type"] = numbers if len(numbers) > 1 else "number"
            param.description = (param.description or "") + WHOLE_NUMBER_NOTE
    return params
