"""Rejection sampling's LLM judge, against a local judge server on 127.0.0.1, with real math_verify."""

from __future__ import annotations

import json
import logging
import re

import pytest

from distilled_plugins import preflight
from distilled_plugins.core.errors import DataError
from distilled_plugins.core.schema import row_key
from distilled_plugins.devtools.teacher_server import judge_answer, judge_prompt_fields
from distilled_plugins.reject_sampling import RejectSamplingConfig, judge, stage
from distilled_plugins.report.collect import collect
from distilled_plugins.report.render import render
from distilled_plugins.teacher.settings import RequestSettings
from tests.support import cli_env, read_jsonl, run_cli, write_jsonl

OPTION = "Which option is the number of sides of a dodecagon? (A) 10 (B) 11 (C) 12 (D) 13"
PARITY = "Is 1234 even or odd?"
SUM = "What is 2+2?"
PROOF = "Prove that there are infinitely many primes."
CUT = "What is 3+4?"
MUMBLE = "What is one half of one?"
EASY = "What is 1+1?"

# what the judge says, by problem or by (problem, answer part)
VERDICTS = {
    (OPTION, "The answer is C, namely 12."): "yes",
    (OPTION, "So the answer is $\\boxed{D}$."): "no",
    PARITY: "yes",
    SUM: "no",
    CUT: "yes",  # never asked: the generation was cut at max_tokens
    PROOF: "yes",  # never asked: a proof has no gold to compare with
    MUMBLE: "I cannot decide; the answer may be right.",  # no Verdict line
}
FAST = RequestSettings(max_attempts=3, backoff_base=0.01, backoff_max=0.05, connect_timeout=2, request_timeout=5)


def judged_rows() -> list[dict]:
    """Generations whose math_verify verdicts are known (see the asserts): what reaches the judge is checked."""
    return [
        {
            "problem": OPTION,
            "answer": "\\text{(C)}",
            "generations": [
                "<think>\nTwelve sides.\n</think>\nThe answer is C, namely 12.",  # wrong for math_verify: asked
                "Hence $\\boxed{\\text{(C)}}$",  # correct
                "So the answer is $\\boxed{D}$.",  # wrong: asked, the judge says no
                "So $\\boxed{\\text{(C)}}$",  # correct, but cut at max_tokens: truncated, never asked
            ],
            "finish_reasons": ["stop", "stop", "stop", "length"],
        },
        {"problem": PARITY, "answer": "\\text{even}", "generations": ["Even number"], "finish_reasons": ["stop"]},
        {"problem": SUM, "answer": "4", "generations": ["$\\boxed{5}$", "four"], "finish_reasons": ["stop", "stop"]},
        {"problem": PROOF, "answer": "proof", "generations": ["Euclid."], "finish_reasons": ["stop"]},
        {"problem": CUT, "answer": "7", "generations": ["It is seven"], "finish_reasons": ["length"]},
        {"problem": MUMBLE, "answer": "\\frac{1}{2}", "generations": ["one half"], "finish_reasons": ["stop"]},
        {"problem": EASY, "answer": "2", "generations": ["$\\boxed{2}$", "$\\boxed{2}$"]},
    ]


def seen_questions(replay) -> list[tuple[str, str]]:
    """(problem, answer part) of each question the judge server was sent."""
    fields = [judge_prompt_fields(p["messages"][-1]["content"]) for p in replay.seen_payloads]
    return sorted((f["problem"], f["answer"]) for f in fields)


def run_stage(tmp_path, url, rows=None, name="filtered.jsonl", **overrides):
    src = write_jsonl(tmp_path / "gen.jsonl", judged_rows() if rows is None else rows)
    settings = {
        "src": str(src),
        "dst": str(tmp_path / "out" / name),
        "workers": 2,
        "eval_sets": ["none"],
        "judge_api_addr": url,
        "judge_model": "judge",
        "judge_requests": FAST,
        "judge_cache_dir": str(tmp_path / "judge_cache"),
        **overrides,
    }
    return stage.run(RejectSamplingConfig(**settings))


class TestPrompt:
    def test_the_judge_sees_problem_gold_and_the_answer_after_think(self):
        content = judge.judge_messages(OPTION, "\\text{(C)}", "<think>\nlong\n</think>\nThe answer is C.")[0]
        assert content["role"] == "user"
        assert judge_prompt_fields(content["content"]) == {
            "problem": OPTION,
            "gold": "\\text{(C)}",
            "answer": "The answer is C.",
        }
        assert content["content"].endswith('"Verdict: yes" or "Verdict: no".')

    @pytest.mark.parametrize(
        ("reply", "verdict"),
        [
            ("They match.\nVerdict: yes", "yes"),
            ("Verdict: NO\n\n", "no"),
            ("**Verdict: yes**", "yes"),
            ("Verdict: yes\nActually, let me reconsider.", "unparseable"),  # the verdict must be the last line
            ("Verdict: probably", "unparseable"),
            ("", "unparseable"),
        ],
    )
    def test_parse_verdict(self, reply, verdict):
        assert judge.parse_verdict(reply) == verdict

    def test_cache_key_covers_model_prompt_version_problem_gold_and_generation(self):
        base = judge.cache_key("m", "p", "g", "x")
        assert base == judge.cache_key("m", "p", "g", "x")
        others = {judge.cache_key(*args) for args in [("m2", "p", "g", "x"), ("m", "p2", "g", "x")]}
        others |= {judge.cache_key(*args) for args in [("m", "p", "g2", "x"), ("m", "p", "g", "x2")]}
        assert base not in others and len(others) == 4


class TestRecover:
    def test_only_math_verify_rejections_reach_the_judge_and_recovered_rows_are_kept(
        self, tmp_path, replay_teacher, caplog
    ):
        caplog.set_level(logging.INFO, logger="distilled_plugins.reject_sampling")
        replay, url = replay_teacher(judge_answer(VERDICTS))
        result = run_stage(tmp_path, url)
        # wrong and no_answer only: never the truncated, the correct, a proof's or a cut-off generation
        assert seen_questions(replay) == sorted(
            [
                (OPTION, "The answer is C, namely 12."),
                (OPTION, "So the answer is $\\boxed{D}$."),
                (PARITY, "Even number"),
                (SUM, "$\\boxed{5}$"),
                (SUM, "four"),
                (MUMBLE, "one half"),
            ]
        )
        kept = {row["problem"]: row for row in read_jsonl(result.output)}
        assert list(kept) == [OPTION, PARITY, EASY]
        option = kept[OPTION]
        assert option["generations"] == [
            "<think>\nTwelve sides.\n</think>\nThe answer is C, namely 12.",
            "Hence $\\boxed{\\text{(C)}}$",
        ]
        assert option["finish_reasons"] == ["stop", "stop"]
        assert option["correctness_math_verify"] == [False, True]
        assert option["correctness_judge"] == [True, None]
        assert option["is_reasoning_complete"] == [True, True]
        assert option["correctness_count"] == 2 and option["pass_rate"] == 0.5
        assert option["messages"][-1] == {"role": "assistant", "content": "Hence $\\boxed{\\text{(C)}}$"}
        parity = kept[PARITY]  # kept only thanks to the judge
        assert parity["correctness_math_verify"] == [False] and parity["correctness_judge"] == [True]
        assert parity["pass_rate"] == 1.0 and parity["messages"][-1]["content"] == "Even number"
        assert kept[EASY]["correctness_judge"] == [None, None] and kept[EASY]["correctness_count"] == 2

        stats = result.stats
        assert stats["rows_in"] == 7 and stats["rows_out"] == 3
        assert stats["dropped"]["no_correct_generation"] == 3 and stats["dropped"]["gold_filtered"] == 1
        j = stats["judge"]
        assert (j["requests"], j["from_cache"], j["requests_sent"]) == (6, 0, 6)
        assert (j["recovered"], j["confirmed_wrong"], j["unparseable"], j["errors"]) == (2, 3, 1, 0)
        assert (j["generations_added"], j["rows_added"], j["audited"]) == (2, 1, 0)
        assert j["agreement"]["math_verify_rejected"] == {"judge_yes": 2, "judge_no": 4}
        assert j["prompt_tokens"] > 0 and j["completion_tokens"] > 0

        verdicts = read_jsonl(result.verdicts)
        assert [v.get("judge") for v in verdicts[:4]] == ["yes", None, "no", None]
        assert verdicts[3]["verdict"] == "truncated"
        mumble = next(v for v in verdicts if v.get("judge") == "unparseable")
        assert mumble["judge_reply"] == VERDICTS[MUMBLE]
        final = [r.getMessage() for r in caplog.records if r.name == "distilled_plugins.reject_sampling"][-1]
        assert final.startswith("kept 3 of 7 examples; dropped 4: gold_filtered 1, no_correct_generation 3")
        assert "the judge recovered 2 generations math_verify rejected (2 kept, adding 1 examples)" in final

    def test_a_slow_judge_does_not_silence_the_progress_lines(self, tmp_path, replay_teacher, caplog):
        """The first example waits for the judge while its six questions are answered one at a time: the log still
        says how far the stage is every progress interval, not only once everything is written."""
        caplog.set_level(logging.INFO, logger="distilled_plugins.reject_sampling")
        _, url = replay_teacher(judge_answer(VERDICTS), delay=0.4)
        run_stage(tmp_path, url, judge_max_concurrent=1, progress_interval=0.1)
        lines = [r.getMessage() for r in caplog.records if r.name == "distilled_plugins.reject_sampling"]
        progress = [line for line in lines if line.startswith("examples ") and " in " not in line]  # not the last
        assert len(progress) >= 4, lines  # about one per answer (0.4 s apart), not one at the end

    def test_a_rerun_asks_nothing_and_a_new_generation_only_itself(self, tmp_path, replay_teacher):
        replay, url = replay_teacher(judge_answer(VERDICTS))
        first = run_stage(tmp_path, url)
        asked = replay.requests
        again = run_stage(tmp_path, url, name="again.jsonl")
        assert replay.requests == asked  # every verdict came from the cache
        assert again.stats["judge"]["from_cache"] == 6 and again.stats["judge"]["requests"] == 0
        assert again.output.read_bytes() == first.output.read_bytes()
        assert again.verdicts.read_bytes() == first.verdicts.read_bytes()
        rows = judged_rows()  # a seed refresh: one more generation for one problem
        rows[2]["generations"].append("The sum is four.")
        rows[2]["finish_reasons"].append("stop")
        refreshed = run_stage(tmp_path, url, rows=rows, name="refreshed.jsonl")
        assert replay.requests == asked + 1
        assert seen_questions(replay).count((SUM, "The sum is four.")) == 1
        assert refreshed.stats["judge"]["from_cache"] == 6

    def test_audit_keeps_by_math_verify_and_measures_agreement(self, tmp_path, replay_teacher):
        replay, url = replay_teacher(judge_answer({**VERDICTS, EASY: "yes"}))
        result = run_stage(tmp_path, url, judge_policy="audit", judge_audit_sample=2)
        kept = {row["problem"]: row for row in read_jsonl(result.output)}
        assert list(kept) == [OPTION, EASY]  # PARITY is no longer kept: only math_verify keeps
        assert kept[OPTION]["generations"] == ["Hence $\\boxed{\\text{(C)}}$"]
        assert kept[OPTION]["correctness_judge"] == [False]  # audited: the judge's fixed verdict for OPTION is no
        assert kept[EASY]["correctness_judge"] == [True, None]  # the first correct generation only
        j = result.stats["judge"]
        assert (
            j["requests"] == replay.requests == 8
            and j["audited"] == 2
            and (j["generations_added"], j["rows_added"]) == (0, 0)
        )
        assert j["agreement"] == {
            "math_verify_correct": {"judge_yes": 1, "judge_no": 1},
            "math_verify_rejected": {"judge_yes": 2, "judge_no": 4},
        }
        assert j["recovered"] == 2  # said yes to, though not kept under audit

    def test_the_runs_report_shows_the_judges_verdicts(self, tmp_path, replay_teacher):
        """The run's report (distilled_plugins/report/collect.py) reads the judge's stats from rejection sampling's."""
        _, url = replay_teacher(judge_answer({**VERDICTS, EASY: "yes"}))
        run_stage(tmp_path, url, name="reject_sampling/filtered.jsonl", judge_audit_sample=2)
        page = render(collect(tmp_path / "out"))

        def figure(name: str) -> str:
            return re.search(rf'data-figure="{re.escape(name)}">([^<]*)<', page).group(1)

        assert "The judge: judge, prompt v1, policy recover" in page
        assert (figure("judge.recovered"), figure("judge.confirmed_wrong"), figure("judge.unparseable")) == (
            "2",
            "3",
            "1",
        )
        assert (figure("judge.rows_added"), figure("judge.audited")) == ("1", "2")
        assert figure("judge.agreement.math_verify_correct.yes") == "1"
        assert figure("judge.agreement.math_verify_rejected.no") == "4"


class TestFaults:
    def test_500s_are_retried_and_a_question_failing_every_attempt_is_an_error(self, tmp_path, replay_teacher):
        # one judge request at a time, so the faults meet the questions in a known order
        replay, url = replay_teacher(judge_answer(VERDICTS), faults=["500", "ok", "500", "500", "500"])
        result = run_stage(tmp_path, url, rows=judged_rows()[1:3], workers=1, judge_max_concurrent=1)
        j = result.stats["judge"]
        assert j["retries"] == {"http_500": 3} and j["errors"] == 1 and j["error_causes"] == {"http_500": 1}
        assert j["requests_sent"] == 3 + 1 + 1 + 1 and j["requests"] == 3
        errored = [v for v in read_jsonl(result.verdicts) if v.get("judge") == "error"]
        assert len(errored) == 1 and errored[0]["judge_reply"].startswith("http_500")
        # nor is the generation kept: no kept row holds it
        (lost,) = [
            r["generations"][errored[0]["index"]]
            for r in judged_rows()[1:3]
            if row_key(r["problem"]) == errored[0]["key"]
        ]
        assert lost not in [g for r in read_jsonl(result.output) for g in r["generations"]]
        # the failed question is not cached: a rerun asks it again, and only it
        before = replay.requests
        rerun = run_stage(tmp_path, url, rows=judged_rows()[1:3], workers=1, name="rerun.jsonl")
        assert replay.requests == before + 1 and rerun.stats["judge"]["errors"] == 0

    def test_a_rate_limited_judge_loses_nothing(self, tmp_path, replay_teacher):
        replay, url = replay_teacher(judge_answer(VERDICTS), rate_limit_rpm=120)  # 2 requests a second
        result = run_stage(tmp_path, url, judge_requests=RequestSettings(max_attempts=20, backoff_base=0.05))
        j = result.stats["judge"]
        assert j["errors"] == 0 and j["recovered"] == 2 and j["requests"] == 6
        assert result.stats["rows_out"] == 3
        # the client kept to the limit it learnt from the headers: 6 requests, 2 at once, 2 a second
        assert replay.refused <= 1 and replay.request_times[-1] - replay.request_times[0] >= 1.5

    def test_a_judge_that_refuses_the_key_fails_the_stage_in_one_line(self, tmp_path, replay_teacher):
        _, url = replay_teacher(judge_answer(VERDICTS), api_key="sk-judge")
        src = write_jsonl(tmp_path / "gen.jsonl", judged_rows())
        done = run_cli(
            "reject_sampling",
            *("--src", src, "--dst", tmp_path / "out.jsonl", "--eval-sets", "none", "--workers", 1),
            *("--judge-api-addr", url, "--judge-api-key-env", "NO_SUCH_JUDGE_KEY", "--judge-max-attempts", 2),
        )
        assert done.returncode == 1
        assert done.stderr.strip().splitlines()[-1].startswith("error: HTTP 401 from")
        assert not (tmp_path / "out.jsonl").exists()


class TestPassRate:
    def test_bounds_drop_too_hard_and_too_easy_and_count_them(self, tmp_path):
        rows = [
            {"problem": f"Problem {k}", "answer": "1", "generations": ["$\\boxed{1}$"] * k + ["$\\boxed{2}$"] * (4 - k)}
            for k in range(5)
        ]
        result = run_stage(tmp_path, None, rows=rows, min_pass_rate=0.5, max_pass_rate=0.75)
        kept = read_jsonl(result.output)
        assert [(r["problem"], r["pass_rate"], r["correctness_count"]) for r in kept] == [
            ("Problem 2", 0.5, 2),
            ("Problem 3", 0.75, 3),
        ]
        assert result.stats["dropped"] == {
            "gold_filtered": 0,
            "contaminated": 0,
            "gold_unparseable": 0,
            "no_generations": 0,
            "no_correct_generation": 1,
            "too_hard": 1,
            "too_easy": 1,
        }
        assert result.stats["judge"] is None and result.stats["pass_rate_bounds"] == {"min": 0.5, "max": 0.75}

    def test_bad_bounds_and_an_audit_without_a_judge_are_refused(self, tmp_path):
        src = write_jsonl(tmp_path / "gen.jsonl", judged_rows())
        with pytest.raises(ValueError, match="min_pass_rate <= max_pass_rate"):
            RejectSamplingConfig(src=str(src), dst="o.jsonl", min_pass_rate=0.8, max_pass_rate=0.2)
        with pytest.raises(ValueError, match="needs a judge"):
            RejectSamplingConfig(src=str(src), dst="o.jsonl", judge_audit_sample=3)
        with pytest.raises(DataError):
            stage.run(RejectSamplingConfig(src=str(tmp_path / "none.jsonl"), dst="o.jsonl"))


def test_cli_flags_reach_the_judge(tmp_path, replay_teacher):
    replay, url = replay_teacher(judge_answer(VERDICTS), api_key="sk-judge")
    src = write_jsonl(tmp_path / "gen.jsonl", judged_rows())
    done = run_cli(
        "reject_sampling",
        *("--src", src, "--dst", tmp_path / "out.jsonl", "--eval-sets", "none", "--workers", 2),
        *("--judge-api-addr", url, "--judge-model", "judge-7b", "--judge-api-key-env", "JUDGE_KEY"),
        *("--judge-max-attempts", 3, "--judge-backoff-base", 0.01, "--judge-audit-sample", 1),
        env=cli_env(JUDGE_KEY="sk-judge"),
    )
    assert done.returncode == 0, done.stderr
    assert {p["model"] for p in replay.seen_payloads} == {"judge-7b"}
    assert set(replay.seen_authorization) == {"Bearer sk-judge"}
    stats = json.loads((tmp_path / "out.stats.json").read_text())
    assert stats["judge"]["requests"] == 7 and stats["judge"]["audited"] == 1
    assert "the judge recovered 2 generations" in done.stderr.strip().splitlines()[-1]  # the stage's last line
    assert (tmp_path / judge.CACHE_FILE).exists()  # the cache defaults to --dst's folder


def test_the_runs_first_task_checks_a_named_judge_connection():
    """A judge connection that does not exist fails the run before the teacher is asked anything; an empty one
    means no judge, and an entry point without rejection sampling never reads it."""

    def judge_lines(**inputs) -> list[str]:
        run = preflight.RunInputs(**inputs)
        lines = preflight.problems(run, lambda conn_id: f"no connection {conn_id!r}", {"judge_conn_id": "Judge"})
        return [line for line in lines if line.startswith("Judge")]

    assert judge_lines(source="generate", judge_conn_id="no_such_judge") == ["Judge: no connection 'no_such_judge'"]
    assert judge_lines(source="generate", judge_conn_id="") == []
    assert judge_lines(source="generate", judge_conn_id=None) == []
    assert judge_lines(source="packed_dataset", judge_conn_id="no_such_judge") == []
