"""The one table of errors (distilled_plugins.core.errors): complete, in an order where every row can match, and
raised where the engine meets each kind of problem."""

from __future__ import annotations

import inspect

import pytest

from distilled_plugins.core import cli, errors
from distilled_plugins.core.io import require_columns
from operators.dag_helpers.failures import HINTS

OWN_ERRORS = [
    obj
    for _, obj in inspect.getmembers(errors, inspect.isclass)
    if issubclass(obj, BaseException) and obj.__module__ == errors.__name__
]


@pytest.mark.parametrize("table", [errors.RETRY_CAN_FIX, HINTS], ids=["RETRY_CAN_FIX", "HINTS"])
def test_every_row_of_a_table_can_match(table):
    """First match wins, so a base class above its subclass would hide the subclass's row."""
    kinds = [kind for kind, _ in table]
    for i, kind in enumerate(kinds):
        shadowing = [earlier for earlier in kinds[:i] if issubclass(kind, earlier)]
        assert not shadowing, f"{kind.__name__} is hidden by {shadowing[0].__name__} above it"


def test_every_error_of_the_engine_is_decided_and_explained():
    assert OWN_ERRORS
    for kind in OWN_ERRORS:
        assert errors.retry_can_fix(kind("x")) is not None, kind
        assert any(issubclass(kind, hinted) for hinted, _ in HINTS), kind
    assert errors.retry_can_fix(RuntimeError("a bug")) is None


def test_a_missing_column_is_its_own_kind():
    with pytest.raises(errors.MissingColumn, match="column 'answer' not found"):
        require_columns([{"problem": "1+1"}], ["answer"], "seed.jsonl")


def test_the_command_line_says_one_line_for_the_table_and_calls_anything_else_a_bug(capsys):
    def budget(argv):
        raise errors.BudgetReached("budget reached: estimated cost 1.0 >= max_cost 1")

    def bug(argv):
        raise RuntimeError("boom")

    assert cli.run(budget, []) == 1
    assert capsys.readouterr().err == "error: budget reached: estimated cost 1.0 >= max_cost 1\n"
    assert cli.run(bug, []) == 1
    assert "unexpected RuntimeError: boom" in capsys.readouterr().err
