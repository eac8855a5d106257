"""Stage 6: a replaying endpoint on 127.0.0.1, mindformers generation on the tiny model, and re-scoring."""

from __future__ import annotations

import json
import re

import pytest

from distilled_plugins.core.configs import SHARED_DATA
from distilled_plugins.core.errors import DataError, FatalRequestError
from distilled_plugins.devtools.teacher_server import load_answers, replay_answer
from distilled_plugins.evaluate import EvalConfig, Protocol
from distilled_plugins.evaluate.completions import SETTINGS_FILE, completions_folder, load_problems
from distilled_plugins.evaluate.stage import run as evaluate
from distilled_plugins.handle.config import SYSTEM_PROMPT
from distilled_plugins.teacher.settings import RetryPolicy
from tests.support import MATH500, read_jsonl, write_jsonl

SKYTHOUGHT = SHARED_DATA / "eval_outputs" / "skythought"


@pytest.fixture(scope="module")
def reference_answers():
    return load_answers(MATH500, "problem", "solution")


def test_reference_solutions_score_100_and_figures_add_up(replay_teacher, tmp_path):
    _replay, url = replay_teacher(solutions=MATH500)
    path = evaluate(
        EvalConfig(
            out=str(tmp_path),
            api_addr=url,
            model="reference",
            protocol=Protocol(n_samples=2, max_new_tokens=2048),
        )
    )
    report = json.loads(path.read_text())
    assert report["pass@1"] == 100.0 and report["ci95"] == [100.0, 100.0]
    assert report["problems"] == 500 and report["samples"] == 1000
    stats = json.loads((tmp_path / "stats.json").read_text())  # every MATH-500 gold is usable: none left out
    assert stats["rows_in"] == stats["rows_out"] == 500 and report["excluded"] == {}
    assert stats["dropped"] == {"gold_filtered": 0, "no_completions": 0}
    assert sum(v["samples"] for v in report["by_level"].values()) == 500 * 2
    assert sum(v["samples"] for v in report["by_subject"].values()) == 500 * 2
    assert {k: v["problems"] for k, v in report["by_level"].items()} == {"1": 43, "2": 90, "3": 105, "4": 128, "5": 134}
    assert report["protocol"]["system_prompt"] == SYSTEM_PROMPT
    assert report["protocol"]["temperature"] == 0.6 and report["protocol"]["top_p"] == 0.95
    assert (tmp_path / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    markdown = (tmp_path / "report.md").read_text()
    assert "OpenR1-Qwen-7B (MindSpore Transformers, tutorial) | 90.0" in markdown and "**100.0**" in markdown


def test_wrong_answers_score_0_truncations_counted_and_resume(replay_teacher, tmp_path):
    teacher, url = replay_teacher(lambda problem: "After some work: $\\boxed{123456789}$.", faults=["length"] * 3)
    cfg = EvalConfig(out=str(tmp_path), api_addr=url, model="wrong", limit=20, protocol=Protocol(n_samples=2, seed=7))
    report = json.loads(evaluate(cfg).read_text())
    assert report["pass@1"] == 0.0 and report["truncated"] == 3
    assert report["verdicts"] == {"truncated": 3, "wrong": 37}
    payload = teacher.seen_payloads[0]
    assert payload["messages"][0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert payload["seed"] == 7 and payload["max_tokens"] == 32768
    before = teacher.requests
    evaluate(cfg)  # a rerun keeps the completions: no request is sent again
    assert teacher.requests == before


def test_completions_are_kept_per_source_and_settings_never_refused_never_mixed(replay_teacher, tmp_path):
    """A rerun after a new fine-tune (another source) makes new completions beside the old ones; the same source
    again reuses its own; --fresh makes them again (the DAG's evaluate, cleared after finetune reran)."""
    teacher, url = replay_teacher(lambda problem: "$\\boxed{1}$")
    first = EvalConfig(out=str(tmp_path), api_addr=url, model="model-a", limit=3, protocol=Protocol(n_samples=1))
    second = EvalConfig(out=str(tmp_path), api_addr=url, model="model-b", limit=3, protocol=Protocol(n_samples=1))
    evaluate(first)
    assert teacher.requests == 3
    report = json.loads(evaluate(second).read_text())
    assert teacher.requests == 6 and "model-b" in report["protocol"]["completions"]
    folders = sorted((tmp_path / "completions").iterdir())
    assert len(folders) == 2 and all((f / "completions.jsonl").exists() for f in folders)
    evaluate(first)  # back to the first source: its completions are still there
    assert teacher.requests == 6
    assert json.loads((tmp_path / "stats.json").read_text())["completions"].startswith(str(tmp_path / "completions"))
    evaluate(EvalConfig(**{**first.__dict__, "fresh": True}))
    assert teacher.requests == 9


def test_a_checkpoint_rewritten_in_place_is_another_source(tmp_path):
    checkpoint = tmp_path / "checkpoint" / "rank_0"
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.ckpt").write_bytes(b"weights of the first training")
    cfg = EvalConfig(out=str(tmp_path / "e"), checkpoint=str(checkpoint.parent), mindformers_config="tiny.yaml")
    before = completions_folder(cfg)
    (checkpoint / "model.ckpt").write_bytes(b"weights of a second training, longer")
    after = completions_folder(cfg)
    assert before != after and before.parent == after.parent == tmp_path / "e" / "completions"
    assert json.loads((after / SETTINGS_FILE).read_text())["source"]["checkpoint_files"][0][0] == ("rank_0/model.ckpt")
    assert completions_folder(cfg) == after  # unchanged files: the same folder


def test_baseline_difference(replay_teacher, reference_answers, tmp_path):
    half = {p: (s if i % 2 else "no idea") for i, (p, s) in enumerate(reference_answers.items())}
    _replay, half_url = replay_teacher(replay_answer(half))
    _replay, reference_url = replay_teacher(solutions=MATH500)
    base = evaluate(
        EvalConfig(
            out=str(tmp_path / "base"),
            api_addr=half_url,
            model="base",
            limit=40,
            protocol=Protocol(n_samples=1),
            report_label="base model",
        )
    )
    tuned = evaluate(
        EvalConfig(
            out=str(tmp_path / "tuned"),
            api_addr=reference_url,
            model="tuned",
            limit=40,
            protocol=Protocol(n_samples=1),
            baseline=str(base),
        )
    )
    report = json.loads(tuned.read_text())
    assert report["baseline"]["label"] == "base model"
    assert report["baseline"]["difference"] == pytest.approx(100.0 - json.loads(base.read_text())["pass@1"])
    assert "difference **+" in (tmp_path / "tuned" / "report.md").read_text()


@pytest.mark.slow
def test_mindformers_generation_from_the_tiny_checkpoint(tiny_checkpoint, tmp_path):
    from distilled_plugins.core import configs

    cfg = EvalConfig(
        out=str(tmp_path),
        checkpoint=str(tiny_checkpoint),
        limit=3,
        mindformers_config=str(configs.FINETUNE_TINY),
        tokenizer=str(configs.TINY_TOKENIZER),
        protocol=Protocol(n_samples=2, max_new_tokens=12),
    )
    report = json.loads(evaluate(cfg).read_text())
    assert report["problems"] == 3 and report["samples"] == 6
    completions = read_jsonl(json.loads((tmp_path / "stats.json").read_text())["completions"])
    assert [len(r["generations"]) for r in completions] == [2, 2, 2]
    assert all(reason in ("stop", "length") for r in completions for reason in r["finish_reasons"])
    assert report["truncated"] == sum(r["finish_reasons"].count("length") for r in completions)
    assert "mindformers checkpoint" in report["protocol"]["completions"]


class TestCheckpointGeneration:
    """mf_generate: the prompt is rendered as training renders it; batched decoding changes no token."""

    def test_prompt_is_the_training_prompt(self, tmp_path):
        from distilled_plugins.handle import HandleConfig
        from distilled_plugins.handle.encoder import load_tokenizer
        from distilled_plugins.handle.stage import run as handle
        from distilled_plugins.in_mindformers.mf_generate import prompt_ids
        from tests.support import TOKENIZER_DIR, conversation_rows

        rows = conversation_rows(5)
        src = write_jsonl(tmp_path / "filtered.jsonl", rows)
        handled = handle(HandleConfig(src=[str(src)], tokenizer=str(TOKENIZER_DIR), dst=str(tmp_path / "h")))
        import datasets

        trained = datasets.load_from_disk(str(handled))
        prompts = prompt_ids(load_tokenizer(TOKENIZER_DIR), SYSTEM_PROMPT, [r["messages"][0]["content"] for r in rows])
        for ids, labels, prompt in zip(trained["input_ids"], trained["labels"], prompts, strict=True):
            first_answer = next(i for i, label in enumerate(labels) if label != -100)
            assert ids[:first_answer] == prompt  # what the model saw before its answer in training

    def test_attention_mask_hides_the_future_and_the_left_padding(self):
        import numpy as np

        from distilled_plugins.in_mindformers.mf_generate import attention_mask

        mask = attention_mask(np.array([[True, True, False, False], [False, False, False, False]]))
        assert mask.dtype == np.uint8
        assert mask[0].tolist() == [[0, 1, 1, 1], [1, 0, 1, 1], [1, 1, 0, 1], [1, 1, 0, 0]]
        assert mask[1].tolist() == [[0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]]

    def test_sampler(self):
        import numpy as np

        from distilled_plugins.in_mindformers.mf_generate import Sampler

        logits = np.array([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
        assert Sampler(0.0, 0.95, 0)(logits).tolist() == [1, 0]  # greedy
        assert Sampler(1.0, 0.01, 0)(logits).tolist() == [1, 0]  # top_p keeps only the most likely token
        picks = np.stack([Sampler(1.0, 1.0, seed)(logits) for seed in range(200)])
        assert set(picks[:, 0].tolist()) == {0, 1, 2}  # sampling reaches every token at top_p 1

    @pytest.mark.slow
    def test_batched_greedy_equals_one_at_a_time(self, tmp_path):
        from distilled_plugins.core import configs
        from distilled_plugins.in_mindformers import mf_generate

        problems = write_jsonl(tmp_path / "p.jsonl", load_problems(MATH500, 3))  # prompts of 3 lengths
        outputs = {}
        for batch in (3, 1):
            outputs[batch] = tmp_path / f"out{batch}.jsonl"
            argv = ["--config", str(configs.FINETUNE_TINY), "--checkpoint", "untrained"]
            argv += [
                "--tokenizer",
                str(configs.TINY_TOKENIZER),
                "--problems",
                str(problems),
                "--output",
                str(outputs[batch]),
            ]
            argv += ["--system-prompt", SYSTEM_PROMPT, "--num-samples", "1", "--max-new-tokens", "6"]
            argv += ["--temperature", "0", "--batch-size", str(batch)]
            assert mf_generate.main(argv) == 0
        batched, single = read_jsonl(outputs[3]), read_jsonl(outputs[1])
        assert [r["unique_id"] for r in batched] == [r["unique_id"] for r in single]
        assert [r["generations"] for r in batched] == [r["generations"] for r in single]
        assert all(len(r["generations"][0]) > 0 for r in batched)


@pytest.mark.parametrize(
    ("model", "stored"),
    [
        # ~80 s: some of its completions keep math_verify busy until its timeouts (make test runs it, make check not)
        pytest.param("Qwen2.5-Math-7B", 52.4, marks=pytest.mark.slow),
        ("Qwen2.5-14B-Instruct", 80.4),
        ("gemma-2-27b-it", 57.2),
    ],
)
def test_rescore_matches_stored_accuracy_within_one_point(tmp_path, model, stored):
    assert json.loads((SKYTHOUGHT / f"{model}.math500.metrics.json").read_text())["acc"] == stored
    path = evaluate(
        EvalConfig(
            out=str(tmp_path),
            rescore=str(SKYTHOUGHT / f"{model}.math500.jsonl"),
            problem_column="question",
            gold_column="answer",
            completion_column="code",
        )
    )
    report = json.loads(path.read_text())
    assert abs(report["pass@1"] - stored) <= 1.0
    assert report["problems"] == 500 and "unknown" not in report["by_subject"]  # subjects joined from MATH-500


class TestBadInput:
    def test_missing_column(self, tmp_path):
        rows = [{k: v for k, v in r.items() if k != "subject"} for r in read_jsonl(MATH500)[:3]]
        with pytest.raises(DataError, match="missing column\\(s\\) subject"):
            evaluate(
                EvalConfig(
                    out=str(tmp_path),
                    dataset=str(write_jsonl(tmp_path / "p.jsonl", rows)),
                    api_addr="127.0.0.1:9",
                    model="m",
                )
            )

    def test_empty_set(self, tmp_path):
        (tmp_path / "p.jsonl").write_text("")
        with pytest.raises(DataError, match="evaluation set is empty"):
            evaluate(
                EvalConfig(out=str(tmp_path), dataset=str(tmp_path / "p.jsonl"), api_addr="127.0.0.1:9", model="m")
            )

    def test_unreachable_endpoint(self, tmp_path):
        from distilled_plugins.devtools.local_airflow import free_port

        port = free_port()
        with pytest.raises(
            FatalRequestError, match=re.escape(f"cannot reach the teacher endpoint http://127.0.0.1:{port}")
        ):
            evaluate(
                EvalConfig(
                    out=str(tmp_path),
                    api_addr=f"127.0.0.1:{port}",
                    model="m",
                    limit=2,
                    retry=RetryPolicy(max_attempts=2, backoff_base=0.01),
                )
            )

    def test_one_source_only(self, tmp_path):
        with pytest.raises(ValueError, match="exactly one source"):
            EvalConfig(out=str(tmp_path), api_addr="h:1", model="m", rescore="x.jsonl")

    def test_rescore_missing_completion_column(self, tmp_path):
        src = write_jsonl(tmp_path / "c.jsonl", [{"question": "q", "answer": "1"}])
        with pytest.raises(DataError, match="missing column 'code'"):
            evaluate(
                EvalConfig(
                    out=str(tmp_path / "o"), rescore=str(src), problem_column="question", completion_column="code"
                )
            )
