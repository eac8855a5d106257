"""stats.Stats: the one shape of every stage's drop counts."""

from __future__ import annotations

import pytest

from distilled_plugins.core.stats import Stats, StatsMismatch


class TestStats:
    def test_declared_reasons_all_appear_in_order_and_others_are_refused(self):
        stats = Stats("examples", reasons=("wrong", "contaminated"))
        stats.read(5)
        stats.drop("contaminated", 2)
        stats.keep(3)
        assert stats.as_dict() == {"rows_in": 5, "rows_out": 3, "dropped": {"wrong": 0, "contaminated": 2}}
        assert list(stats.as_dict()["dropped"]) == ["wrong", "contaminated"]
        with pytest.raises(KeyError, match="'typo' is not one of the declared reasons"):
            stats.drop("typo")

    def test_counts_that_do_not_add_up_are_refused_when_written(self):
        stats = Stats("samples", reasons=("too_long",))
        stats.read(4)
        stats.keep(2)
        stats.drop("too_long")
        with pytest.raises(StatsMismatch, match="4 samples in, but 2 out \\+ 1 dropped .*1 row\\(s\\) unaccounted for"):
            stats.as_dict()
        stats.keep(2)  # one counted twice
        with pytest.raises(StatsMismatch, match="-1 row"):
            stats.summary()

    def test_summary_names_only_the_reasons_that_dropped_something(self):
        stats = Stats("problems", reasons=("gold_filtered", "no_completions"))
        stats.read(3)
        stats.keep(3)
        assert stats.summary() == "kept 3 of 3 problems; dropped 0"
        stats.read()
        stats.drop("no_completions")
        assert stats.summary() == "kept 3 of 4 problems; dropped 1: no_completions 1"

    def test_undeclared_reasons_are_free_and_sorted_when_none_are_declared(self):
        stats = Stats()
        stats.read(3)
        stats.drop("b")
        stats.drop("a", 2)
        assert stats.as_dict()["dropped"] == {"a": 2, "b": 1}
