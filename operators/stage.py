"""StageOperator: an operator whose arguments are the fields of a stage's config dataclass.

A field that is itself a settings dataclass (evaluation's sampling ``Protocol``) is named in ``nested``: its fields
are the operator's arguments, and ``stage_config`` builds it from them.

A stage's settings are written once, as fields of its config dataclass (``distilled_plugins.core.settings``). The
operator takes exactly those fields as keyword arguments, with the same defaults, templates them all (except
those named in ``not_templated``), and builds the config from its fields in ``execute``: no default is
repeated here, no value is cast by hand, and ``execute`` never changes the operator's fields (state it keeps for
``on_kill``, such as the fine-tune's job folder, is a separate attribute, not a field).

    class PackDatasetOperator(StageOperator):
        config_class = pack.PackConfig

        def execute(self, context):
            return str(pack.run(self.stage_config()))
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, ClassVar

from airflow.sdk import BaseOperator

from distilled_plugins.core.settings import coerce, default_of


class StageOperator(BaseOperator):
    """Base of the stage operators; subclasses set ``config_class`` (and may set ``not_templated``)."""

    config_class: ClassVar[type]
    not_templated: ClassVar[tuple[str, ...]] = ()
    # config fields the operator fills itself in execute (e.g. an endpoint read from a Connection) ...
    not_arguments: ClassVar[tuple[str, ...]] = ()
    # ... and arguments of the operator that are not config fields, with their defaults
    operator_arguments: ClassVar[dict[str, Any]] = {}
    # config fields that are themselves settings dataclasses (evaluation's sampling protocol): their fields are
    # the operator's arguments, and stage_config builds the nested object from them
    nested: ClassVar[dict[str, type]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "config_class" not in cls.__dict__:
            return
        fields = [f for f in dataclasses.fields(cls.config_class) if f.name not in (*cls.not_arguments, *cls.nested)]
        for klass in cls.nested.values():
            fields += dataclasses.fields(klass)
        names = [f.name for f in fields]
        if len(set(names)) != len(names):
            raise TypeError(f"{cls.__name__}: a nested setting repeats a field name of {cls.config_class.__name__}")
        extra = dict(cls.__dict__.get("operator_arguments", {}))
        if set(extra) & set(names):  # an operator argument would silently shadow the setting of the same name
            raise TypeError(f"{cls.__name__}: operator_arguments repeat setting(s) {sorted(set(extra) & set(names))}")
        cls.template_fields = tuple(
            name
            for name in dict.fromkeys([*cls.__dict__.get("template_fields", ()), *names, *extra])
            if name not in cls.not_templated
        )

        def __init__(self, **kwargs):
            settings = {name: kwargs.pop(name) for name in [*names, *extra] if name in kwargs}
            super(cls, self).__init__(**kwargs)
            for f in fields:
                value = settings.get(f.name, default_of(f))
                setattr(self, f.name, None if value is dataclasses.MISSING else value)
            for name, default in extra.items():
                setattr(self, name, settings.get(name, default))

        # Airflow reads __init__'s signature: default_args fill the named parameters, and partial()/expand()
        # accept only argument names found there, so the fields are spelled out as keyword-only parameters
        parameters = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        for f in fields:
            default = default_of(f)
            parameters.append(
                inspect.Parameter(
                    f.name,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=inspect.Parameter.empty if default is dataclasses.MISSING else default,
                )
            )
        parameters += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d) for n, d in extra.items()]
        parameters.append(inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD))
        __init__.__signature__ = inspect.Signature(parameters)
        __init__.__qualname__ = f"{cls.__qualname__}.__init__"
        __init__.__doc__ = f"Takes the fields of :class:`{cls.config_class.__qualname__}` as keyword arguments."
        cls.__init__ = __init__

    def stage_config(self, **values: Any):
        """The stage's config from this operator's (rendered) fields; ``values`` fill or replace fields."""
        fields = dataclasses.fields(self.config_class)
        skipped = (*self.not_arguments, *self.nested)
        settings = {f.name: getattr(self, f.name) for f in fields if f.name not in skipped}
        settings.update(values)
        config = {name: coerce(self.config_class, name, v) for name, v in settings.items()}
        for name, klass in self.nested.items():
            if name not in config:
                config[name] = klass(
                    **{f.name: coerce(klass, f.name, getattr(self, f.name)) for f in dataclasses.fields(klass)}
                )
        return self.config_class(**config)
