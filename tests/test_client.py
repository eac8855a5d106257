"""The shared client against real local servers: bad replies, streaming, rate limits, cost and budget."""

from __future__ import annotations

import json
import re

import pytest

from distilled_plugins.core import cli, errors
from distilled_plugins.core.errors import BudgetReached
from distilled_plugins.core.schema import STATS_FILE, stats_path
from distilled_plugins.evaluate.__main__ import build_parser as evaluate_parser
from distilled_plugins.evaluate.__main__ import main as evaluate_main
from distilled_plugins.generate.__main__ import build_parser as generate_parser
from distilled_plugins.generate.__main__ import main as generate_main
from distilled_plugins.generate.stage import run as generate
from distilled_plugins.teacher.endpoints import Endpoint, TokenBucket, parse_duration, parse_endpoints
from distilled_plugins.teacher.settings import RequestSettings
from tests.support import FAST_RETRY, MATH500, answer_with_solution, keys_of, math_train_rows, read_jsonl, write_jsonl
from tests.support import generate_config as config


def fast(**overrides) -> RequestSettings:
    return RequestSettings(**{**{k: getattr(FAST_RETRY, k) for k in vars(FAST_RETRY)}, **overrides})


class TestBadReplies:
    def test_null_content_and_missing_choices_are_failed_requests(self, replay_teacher, seed, tmp_path):
        replay, url = replay_teacher(faults=["null_content", "no_choices", "null_content"])
        result = generate(config(seed, tmp_path, url, max_concurrent=1))
        assert result.stats["retries"] == {"null_content": 2, "no_choices": 1}
        rows = read_jsonl(result.output_file)
        assert len(rows) == 12
        assert all(g == answer_with_solution(r["problem"]) for r in rows for g in r["generations"])
        assert replay.requests == 24 + 3

    def test_null_content_on_every_attempt_fails_the_row_not_an_empty_completion(self, replay_teacher, seed, tmp_path):
        _replay, url = replay_teacher(faults=["null_content"] * 1000)
        with pytest.raises(errors.GenerationIncomplete, match="12 of 12 rows"):
            generate(config(seed, tmp_path, url, num_generations=1))
        stats = json.loads(stats_path(tmp_path / "out" / "gen.jsonl").read_text())
        assert stats["failed_requests"] == {"null_content": 12} and stats["completions_ok"] == 0
        assert stats["rows_out"] == 0 and stats["dropped"] == {"duplicate_uuid": 0, "failed": 12, "unfinished": 0}
        assert read_jsonl(tmp_path / "out" / "gen.jsonl") == []


class TestStreaming:
    def test_stream_merges_reasoning_and_content(self, replay_teacher, seed, tmp_path):
        replay, url = replay_teacher(faults=["reasoning"] * 24, stream_chunks=5)
        result = generate(config(seed, tmp_path, url, retry=fast(stream=True)))
        rows = read_jsonl(result.output_file)
        assert len(rows) == 12
        for row in rows:
            for text in row["generations"]:
                assert text == "<think>\nLet me think.\n</think>\n" + answer_with_solution(row["problem"])
            assert all(m["completion_tokens"] > 0 for m in row["api_metadata"])
        assert replay.seen_payloads[0]["stream"] is True
        assert replay.seen_payloads[0]["stream_options"] == {"include_usage": True}
        assert result.stats["completion_tokens"] > 0

    def test_stream_cut_midway_is_retried_and_the_partial_text_dropped(self, replay_teacher, seed, tmp_path):
        replay, url = replay_teacher(faults=["cut_stream", "cut_stream"])
        result = generate(config(seed, tmp_path, url, max_concurrent=1, retry=fast(stream=True)))
        assert result.stats["retries"] == {"stream_cut": 2}
        rows = read_jsonl(result.output_file)
        assert len(rows) == 12 and len(set(keys_of(result.output_file))) == 12
        assert all(g == answer_with_solution(r["problem"]) for r in rows for g in r["generations"])
        assert replay.requests == 24 + 2


class TestRateLimits:
    def test_429_with_nothing_remaining_pauses_the_whole_endpoint(self, replay_teacher, seed, tmp_path):
        # one 429 saying x-ratelimit-remaining-requests: 0 and no Retry-After; the request's own backoff is
        # 0.05 s at most, so only an endpoint-wide pause (1 s by default) keeps the other requests away
        replay, url = replay_teacher(faults=["ok"] * 6 + ["429_exhausted"], retry_after=None)
        result = generate(config(seed, tmp_path, url, max_concurrent=4))
        assert len(read_jsonl(result.output_file)) == 12
        refused_at = replay.request_times[6]
        # requests already on the wire when the 429 left may land just after it; then nothing for ~1 s
        quiet = [t for t in replay.request_times if refused_at + 0.2 < t < refused_at + 0.9]
        assert quiet == [], [round(t - refused_at, 3) for t in replay.request_times]
        assert max(replay.request_times) > refused_at + 0.9
        assert result.stats["rate_limit_pauses"] >= 1
        assert result.stats["retries"] == {"http_429": 1}

    def test_limit_learnt_from_headers_keeps_refusals_rare(self, replay_teacher, tmp_path):
        seed = write_jsonl(tmp_path / "seed.jsonl", math_train_rows(40))
        replay, url = replay_teacher(rate_limit_rpm=600, retry_after="1")  # 10 requests/s, bursts of 10
        result = generate(config(seed, tmp_path, url, num_generations=1, max_concurrent=16))
        assert len(read_jsonl(result.output_file)) == 40
        # without the adaptation 16 workers against an instant server are refused most of the time
        assert replay.refused <= 2, replay.refused
        assert result.stats["endpoints"][url]["requests"] == 40 + replay.refused

    def test_max_rpm_paces_requests(self, replay_teacher, tmp_path):
        seed = write_jsonl(tmp_path / "seed.jsonl", math_train_rows(25))
        replay, url = replay_teacher()
        generate(config(seed, tmp_path, url, num_generations=1, max_concurrent=8, retry=fast(max_rpm=600)))
        times = sorted(replay.request_times)
        # at most 10 in any 1.05 s (endpoints.RequestWindow): 25 requests need at least 2.1 s
        assert times[-1] - times[0] >= 2.0
        assert replay.requests == 25

    def test_max_rpm_keeps_each_wall_clock_second_within_the_limit(self, replay_teacher, tmp_path):
        seed = write_jsonl(tmp_path / "seed.jsonl", math_train_rows(40))
        replay, url = replay_teacher(rate_limit_rpm=600, rate_limit_per_second=True, retry_after="1")  # 10 a second
        result = generate(config(seed, tmp_path, url, num_generations=1, max_concurrent=16, retry=fast(max_rpm=600)))
        assert len(read_jsonl(result.output_file)) == 40
        # a token bucket of a second's worth put up to 20 into one second (2-5% refused at 1,200 RPM)
        assert replay.refused <= 1, replay.refused

    def test_token_bucket_and_durations(self):
        bucket = TokenBucket(per_minute=600)  # 10/s, capacity 10
        assert bucket.wait_time(1, bucket.stamp) == 0
        bucket.take(15, bucket.stamp)  # one cost above capacity passes, leaving a debt
        assert bucket.wait_time(1, bucket.stamp) == pytest.approx(0.6)
        assert parse_duration("6m0s") == 360 and parse_duration("20ms") == pytest.approx(0.02)
        assert parse_duration("1.5") == 1.5 and parse_duration("1h2m3s") == 3723 and parse_duration("x") is None


class TestCostAndBudget:
    def test_budget_stops_cleanly_and_a_rerun_resumes(self, replay_teacher, seed, tmp_path, caplog):
        import logging

        caplog.set_level(logging.INFO)
        replay, url = replay_teacher()
        completion_tokens = len(answer_with_solution(read_jsonl(seed)[0]["problem"])) // 4
        # a price making each completion cost about 1.0: the budget of 5.5 allows 6 completions
        price = 1e6 / completion_tokens
        settings = fast(price_per_mtok_out=price, max_cost=5.5)
        cfg = config(seed, tmp_path, url, max_concurrent=1, retry=settings)
        with pytest.raises(BudgetReached, match="run again") as info:
            generate(cfg)
        assert "budget reached" in str(info.value)
        assert re.search(r"cost \d+\.\d{4} of 5\.5", caplog.text), caplog.text  # the progress line shows it
        stats = json.loads(stats_path(cfg.output_file).read_text())
        assert stats["budget_reached"] is True and stats["cost_estimate"] >= 5.5
        assert stats["completions_ok"] == replay.requests < 24
        assert stats["rows_failed"] == 0 and stats["requests_not_sent_budget"] > 0
        written = len(read_jsonl(cfg.output_file))
        assert written < 12
        assert stats["rows_in"] == 12 and stats["rows_out"] == written
        assert stats["dropped"] == {"duplicate_uuid": 0, "failed": 0, "unfinished": 12 - written}

        resumed = generate(config(seed, tmp_path, url, max_concurrent=1, retry=fast(price_per_mtok_out=price)))
        rows = read_jsonl(resumed.output_file)
        assert len(rows) == 12 and len(set(keys_of(resumed.output_file))) == 12
        assert all(len(r["generations"]) == 2 for r in rows)
        assert replay.requests == 24  # nothing requested twice
        assert resumed.stats["cost_estimate"] == pytest.approx((24 - stats["completions_ok"]) * 1.0, rel=0.05)


class TestSettingsOnce:
    def test_generate_and_evaluate_take_the_same_request_flags(self):
        flags = ["--max-attempts", "3", "--request-timeout", "7", "--max-rpm", "120", "--stream"]
        flags += ["--price-per-mtok-in", "0.5", "--max-cost", "10", "--backoff-base", "0.2"]
        gen = generate_parser().parse_args(["--output-file", "o", *flags])
        ev = evaluate_parser().parse_args(["--out", "o", *flags])
        assert RequestSettings.from_args(gen) == RequestSettings.from_args(ev)
        settings = RequestSettings.from_args(ev)
        assert settings.max_attempts == 3 and settings.request_timeout == 7 and settings.max_rpm == 120
        assert settings.stream and settings.max_cost == 10 and settings.cost(2_000_000, 0) == 1.0

    def test_endpoint_lists(self):
        eps = parse_endpoints("a:1, b:2", "k", [{"addr": "https://c/v1", "api_key": "k2", "weight": 2, "max_rpm": 60}])
        assert [e.url for e in eps] == ["http://a:1", "http://b:2", "https://c"]
        assert [e.api_key for e in eps] == ["k", "k", "k2"] and eps[2].weight == 2 and eps[2].max_rpm == 60
        with pytest.raises(ValueError, match="listed twice"):
            parse_endpoints("a:1,http://a:1", None, None)
        with pytest.raises(ValueError, match="unknown field"):
            parse_endpoints(None, None, [{"addr": "a:1", "wieght": 2}])
        with pytest.raises(ValueError, match="weight must be positive"):
            Endpoint("a:1", weight=0)

    def test_budget_without_a_price_is_refused(self, tmp_path):
        with pytest.raises(ValueError, match="max_cost 5 needs a price"):
            RequestSettings(max_cost=5)
        done = cli.run(  # the command line's contract: one line, exit status 1
            generate_main,
            ["--model", "m", "--dataset-name", "x.jsonl", "--output-file", str(tmp_path / "o"), "--max-cost", "5"],
        )
        assert done == 1


class TestEvaluationUsesTheSameClient:
    def test_evaluate_cli_streams_from_two_endpoints_with_the_request_flags(self, replay_teacher, tmp_path):
        first, url1 = replay_teacher(solutions=MATH500, faults=["cut_stream"])
        second, url2 = replay_teacher(solutions=MATH500)
        argv = ["--out", str(tmp_path / "eval"), "--api-addr", f"{url1},{url2}", "--model", "m", "--limit", "6"]
        argv += ["--n-samples", "2", "--workers", "1", "--stream", "--request-timeout", "30", "--max-attempts", "3"]
        assert evaluate_main(argv) == 0
        report = json.loads((tmp_path / "eval" / "report.json").read_text())
        assert report["pass@1"] == 100.0 and report["samples"] == 12
        assert first.requests > 1 and second.requests > 0 and first.requests + second.requests == 12 + 1
        assert all(p["stream"] is True for p in first.seen_payloads + second.seen_payloads)
        completions = json.loads((tmp_path / "eval" / STATS_FILE).read_text())["completions"]
        stats = json.loads(stats_path(completions).read_text())
        assert stats["retries"] == {"stream_cut": 1} and set(stats["endpoints"]) == {url1, url2}


class TestTokenLimit:
    def test_tokens_are_charged_at_max_tokens_until_the_usage_corrects_them(self):
        import asyncio
        import time

        from distilled_plugins.teacher.endpoints import Fleet

        async def scenario():
            fleet = Fleet([Endpoint("127.0.0.1:9", max_tpm=6000)])  # 100 tokens/s, at most 100 at once
            state = await fleet.acquire(100)  # prompt estimate + max_tokens
            assert state.tokens_bucket.wait_time(50, time.monotonic()) > 0.4
            fleet.succeeded(state, 0.01, {"prompt_tokens": 5, "completion_tokens": 15, "total_tokens": 20}, 100, {})
            started = time.monotonic()
            await fleet.acquire(50)  # the 80 unused tokens were given back: no wait
            return time.monotonic() - started, state

        waited, state = asyncio.run(scenario())
        assert waited < 0.2
        assert state.prompt_tokens == 5 and state.completion_tokens == 15 and state.in_flight == 1
