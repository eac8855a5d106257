"""Stage 2 with real math_verify in real worker processes."""

from __future__ import annotations

import json
import logging
import re
import signal
import time

import pytest

from distilled_plugins.core.errors import DataError
from distilled_plugins.core.grader import GradingPool, Sample
from distilled_plugins.reject_sampling import RejectSamplingConfig
from distilled_plugins.reject_sampling.stage import run
from tests.support import contaminated_row, generation_rows, read_jsonl, run_cli, write_jsonl

# (gold, completion, expected verdict): each answer kind the issue lists
CASES = [
    ("\\frac{1}{2}", "Half of it: $\\boxed{\\frac{1}{2}}$", "correct"),
    ("\\frac{1}{2}", "So the answer is $\\boxed{0.5}$.", "correct"),
    ("2\\sqrt{2}", "Simplify: $\\boxed{\\sqrt{8}}$", "correct"),
    ("x^{2}", "We get $\\boxed{x^{2}}$", "correct"),
    ("2^{10}", "It is $\\boxed{1024}$", "correct"),
    ("[1,2)", "The solution set is $\\boxed{[1,2)}$", "correct"),
    ("(-\\infty, 3]", "So $x \\in \\boxed{(-\\infty, 3]}$", "correct"),
    ("(3, -1)", "The point is $\\boxed{(3,-1)}$", "correct"),
    ("\\{1, 2, 3\\}", "The roots are $\\boxed{\\{3, 2, 1\\}}$", "correct"),
    ("\\text{Evelyn}", "The fastest is $\\boxed{\\text{Evelyn}}$", "correct"),
    ("\\text{(C)}", "Hence $\\boxed{\\text{(C)}}$", "correct"),
    (
        "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}",
        "$\\boxed{\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}}$",
        "correct",
    ),
    ("3", "<think>\nMaybe it is \\boxed{5}? No.\n</think>\nThe answer is $\\boxed{3}$.", "correct"),
    ("5", "<think>\nIt is clearly \\boxed{5}.\n</think>\nThe answer is $\\boxed{3}$.", "wrong"),
    ("\\frac{1}{2}", "So $\\boxed{\\frac{1}{3}}$", "wrong"),
    ("7", "I am not sure what the answer is.", "no_answer"),
]


def tutorial_extract(text: str) -> str | None:
    """The tutorial's get_last_boxed_content: the regex that stops at the first closing brace."""
    found = re.findall(r"\\boxed\{(.*?)\}", text)
    return found[-1] if found else None


def boxed_content(text: str) -> str:
    """What the last ``\\boxed{...}`` really holds, braces balanced."""
    start = text.rindex("\\boxed{") + len("\\boxed{")
    depth = 1
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    raise ValueError(f"unbalanced braces in {text!r}")


@pytest.fixture(scope="module")
def pool():
    with GradingPool(workers=2, parse_timeout=2, verify_timeout=2, sample_timeout=10) as p:
        yield p


class TestGrader:
    def test_answer_kinds(self, pool):
        verdicts = {v.id: v for v in pool.grade(Sample(i, g, c) for i, (g, c, _) in enumerate(CASES))}
        got = [(CASES[i][0], verdicts[i].verdict) for i in range(len(CASES))]
        assert got == [(g, expected) for g, _, expected in CASES]

    def test_cases_the_tutorial_regex_cuts_are_accepted(self, pool):
        cut = [
            (g, c)
            for g, c, expected in CASES
            if expected == "correct" and "</think>" not in c and tutorial_extract(c) != g
        ]
        braces = [(g, c) for g, c in cut if "{" in boxed_content(c)]
        assert len(braces) >= 6  # fractions, roots, powers, text, matrices, sets all have braces
        for _, c in braces:  # the tutorial's regex stops at the first closing brace: a proper prefix ...
            assert len(tutorial_extract(c)) < len(boxed_content(c)) and boxed_content(c).startswith(tutorial_extract(c))
        verdicts = list(pool.grade(Sample(i, g, c) for i, (g, c) in enumerate(braces)))
        assert {v.verdict for v in verdicts} == {"correct"}  # ... and they are accepted here
        assert tutorial_extract("$\\boxed{\\frac{1}{2}}$") == "\\frac{1"

    def test_gold_is_first_argument(self, pool):
        # verify(gold, prediction) is not symmetric: a gold interval accepts no bare number
        [v] = pool.grade([Sample(0, "[1,2)", "$\\boxed{1}$")])
        assert v.verdict == "wrong"

    def test_truncated_is_rejected_without_grading(self, pool):
        [v] = pool.grade([Sample(0, "3", "so $\\boxed{3}$", "length")])
        assert v.verdict == "truncated"

    def test_gold_unparseable(self, pool):
        [v] = pool.grade([Sample(0, "\\text{}", "$\\boxed{3}$")])
        assert v.verdict == "gold_unparseable"

    def test_pathological_inputs_cannot_stall(self):
        samples = [
            Sample(0, "9", "$\\boxed{9^{9^{9}}}$"),
            Sample(1, "1", "$\\boxed{\\binom{1000000}{500000}}$"),
            Sample(2, "4", "$\\boxed{4}$"),
        ]
        started = time.monotonic()
        with GradingPool(workers=2, parse_timeout=1, verify_timeout=1, sample_timeout=3) as pool:
            verdicts = {v.id: v.verdict for v in pool.grade(samples)}
        assert time.monotonic() - started < 15
        assert verdicts[0] in ("timeout", "wrong") and verdicts[1] == "timeout" and verdicts[2] == "correct"

    def test_hard_limit_replaces_a_stalled_worker(self):
        # a sympy power that runs in C where math_verify's alarm never fires
        with GradingPool(workers=1, parse_timeout=30, verify_timeout=30, sample_timeout=2) as pool:
            started = time.monotonic()
            verdicts = list(pool.grade([Sample(0, "1", "$\\boxed{9^{9^{9}}}$"), Sample(1, "2", "$\\boxed{2}$")]))
            assert time.monotonic() - started < 10
            assert [v.verdict for v in verdicts] == ["timeout", "correct"]
            assert pool.replaced == 1

    def test_whole_seconds_only(self):
        with pytest.raises(ValueError, match="whole number of seconds"):
            GradingPool(parse_timeout=0.5)

    def test_callers_alarm_survives(self, pool):
        # math_verify's alarm(0) would cancel it if grading ran in this process
        previous = signal.signal(signal.SIGALRM, lambda *a: None)
        try:
            signal.alarm(100)
            list(pool.grade(Sample(i, g, c) for i, (g, c, _) in enumerate(CASES[:4])))
            remaining = signal.alarm(0)
        finally:
            signal.signal(signal.SIGALRM, previous)
        assert 90 <= remaining <= 100


def run_stage(tmp_path, rows, **overrides):
    src = write_jsonl(tmp_path / "gen.jsonl", rows)
    cfg = RejectSamplingConfig(src=str(src), dst=str(tmp_path / "out" / "filtered.jsonl"), workers=2, **overrides)
    return run(cfg)


class TestStage:
    def test_output_schema_alignment_and_stats(self, tmp_path, caplog):
        caplog.set_level(logging.INFO, logger="distilled_plugins.reject_sampling")
        result = run_stage(tmp_path, [*generation_rows(), contaminated_row()])
        kept = read_jsonl(result.output)
        assert [r["problem"] for r in kept] == ["Compute 1/2 + 1/2 - 1/2.", "Solve x^2 = 4 for positive x."]
        first = kept[0]
        assert first["generations"] == ["so $\\boxed{\\frac{1}{2}}$", "so $\\boxed{0.5}$"]
        assert first["finish_reasons"] == ["stop", "stop"]
        assert first["api_metadata"] == [{"n": 1}, {"n": 2}]
        assert first["messages"] == [
            {"role": "user", "content": "P1"},
            {"role": "assistant", "content": "so $\\boxed{0.5}$"},
        ]
        assert kept[1]["messages"][0]["content"] == "Solve x^2 = 4 for positive x."  # no prompt: the problem
        stats = result.stats
        assert stats["rows_in"] == 8 and stats["rows_out"] == 2
        assert stats["generations_correct"] == 3
        assert stats["rejected_generations"] == {
            "wrong": 2,
            "no_answer": 1,
            "truncated": 1,
            "timeout": 0,
            "gold_unparseable": 1,
            "error": 0,
        }
        assert stats["dropped"] == {
            "gold_filtered": 3,
            "contaminated": 1,
            "gold_unparseable": 1,
            "no_generations": 0,
            "no_correct_generation": 1,
            "too_hard": 0,
            "too_easy": 0,
        }
        assert stats["contaminated"][0]["problem"].startswith("CONVERT  THE  POINT")
        verdicts = read_jsonl(result.verdicts)
        assert len(verdicts) == 4 + 1 + 1 + 2 + 1 + 1 + 1 + 1
        assert [v["verdict"] for v in verdicts[:4]] == ["wrong", "correct", "correct", "truncated"]
        assert json.loads(result.stats_file.read_text())["rows_out"] == 2
        final = [r.getMessage() for r in caplog.records if r.name == "distilled_plugins.reject_sampling"][-1]
        assert final.startswith(
            "kept 2 of 8 examples; dropped 6: gold_filtered 3, contaminated 1, gold_unparseable 1, "
            "no_correct_generation 1 (3 of 8 generations correct"
        )

    def test_rerun_is_byte_identical_and_keeps_input_order(self, tmp_path):
        rows = [
            {
                "problem": f"Problem {i}",
                "answer": str(i),
                "generations": [f"$\\boxed{{{i}}}$"] * 2,
                "finish_reasons": ["stop", "stop"],
            }
            for i in range(40)
        ]
        first = run_stage(tmp_path, rows)
        out1, verdicts1 = first.output.read_bytes(), first.verdicts.read_bytes()
        second = run_stage(tmp_path, rows)
        assert second.output.read_bytes() == out1 and second.verdicts.read_bytes() == verdicts1
        assert [r["problem"] for r in read_jsonl(second.output)] == [f"Problem {i}" for i in range(40)]
        assert list((tmp_path / "out").glob(".*tmp*")) == []

    def test_other_problem_column(self, tmp_path):
        row = {"question": "What is 2+2?", "answer": "4", "generations": ["$\\boxed{4}$"], "finish_reasons": ["stop"]}
        result = run_stage(tmp_path, [row], problem_column="question", eval_sets=[])
        assert read_jsonl(result.output)[0]["messages"][0] == {"role": "user", "content": "What is 2+2?"}

    def test_decontamination_catches_case_and_spacing(self, tmp_path):
        result = run_stage(tmp_path, [contaminated_row()] * 1 + generation_rows()[4:5])
        assert result.stats["dropped"]["contaminated"] == 1
        assert result.stats["rows_out"] == 1


class TestBadInput:
    def test_malformed_line_names_file_and_line(self, tmp_path):
        src = tmp_path / "gen.jsonl"
        src.write_text(json.dumps(generation_rows()[4]) + "\n{not json\n")
        with pytest.raises(DataError, match=rf"{src}:2: malformed JSON"):
            run(RejectSamplingConfig(src=str(src), dst=str(tmp_path / "o.jsonl"), eval_sets=[]))

    @pytest.mark.parametrize("field", ["answer", "generations"])
    def test_missing_field_is_named(self, tmp_path, field):
        row = dict(generation_rows()[4])
        del row[field]
        with pytest.raises(DataError, match=rf"gen.jsonl:1: missing field '{field}'"):
            run_stage(tmp_path, [row], eval_sets=[])

    def test_empty_input(self, tmp_path):
        with pytest.raises(DataError, match="no examples"):
            run_stage(tmp_path, [], eval_sets=[])

    def test_misaligned_finish_reasons(self, tmp_path):
        row = {**generation_rows()[4], "finish_reasons": ["stop", "stop"]}
        with pytest.raises(DataError, match="'finish_reasons' has 2 entries for 1 generations"):
            run_stage(tmp_path, [row], eval_sets=[])

    def test_cli_error_is_one_line(self, tmp_path):
        src = write_jsonl(tmp_path / "gen.jsonl", [{"problem": "p", "generations": []}])
        done = run_cli("reject_sampling", "--src", src, "--dst", tmp_path / "o.jsonl", "--eval-sets", "none")
        assert done.returncode == 1
        assert "missing field 'answer'" in done.stderr and "Traceback" not in done.stderr
