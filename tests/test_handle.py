"""Stage 3 with the real Qwen2.5 tokenizer, and the same logic as a mindformers handler through HFDataLoader."""

from __future__ import annotations

import json
import logging
import shutil

import datasets
import pytest

from distilled_plugins.core.errors import DataError
from distilled_plugins.handle.config import SYSTEM_PROMPT, HandleConfig
from distilled_plugins.handle.encoder import load_tokenizer
from distilled_plugins.handle.stage import run
from tests.support import REPO, TOKENIZER_DIR, conversation_rows, write_jsonl

ROWS = 40


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def handled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("handle")
    src = write_jsonl(tmp / "filtered.jsonl", conversation_rows(ROWS))
    dst = run(HandleConfig(src=[str(src)], tokenizer=str(TOKENIZER_DIR), dst=str(tmp / "handled")))
    return src, dst, datasets.load_from_disk(str(dst))


def test_labels_are_masked_exactly_up_to_the_answer(handled, tokenizer):
    _src, _dst, ds = handled
    rows = conversation_rows(ROWS)
    marker = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    assert len(ds) == ROWS
    for row, sample in zip(rows, ds, strict=False):
        ids, labels = sample["input_ids"], sample["labels"]
        target = next(i + len(marker) for i in range(len(ids)) if ids[i : i + len(marker)] == marker)
        assert labels[:target] == [-100] * target
        assert labels[target:] == ids[target:]
        answer = row["messages"][1]["content"]
        assert tokenizer.decode(ids[target:]) == answer + "<|im_end|>\n"  # <|im_end|> is learned
        assert tokenizer.decode(ids[:target]).startswith(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>")


def test_fast_ids_equal_the_slow_tokenizer(handled):
    from transformers import Qwen2Tokenizer

    slow = Qwen2Tokenizer.from_pretrained(str(TOKENIZER_DIR))
    _src, _dst, ds = handled
    for row, sample in list(zip(conversation_rows(ROWS), ds, strict=False))[:15]:
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, *row["messages"]]
        assert slow.apply_chat_template(messages, tokenize=True, add_generation_prompt=False) == sample["input_ids"]


def test_stats_and_histogram(handled):
    _src, dst, ds = handled
    stats = json.loads((dst / "stats.json").read_text())
    assert stats["rows"] == ROWS and stats["tokens"] == sum(len(x) for x in ds["input_ids"])
    assert stats["rows_in"] == stats["rows_out"] == ROWS and sum(stats["dropped"].values()) == 0
    assert stats["answer_tokens"] == sum(sum(1 for v in x if v != -100) for x in ds["labels"])
    assert stats["length_percentiles"]["max"] == max(len(x) for x in ds["input_ids"])
    assert stats["pad_token_id"] == 151643 and stats["truncated"] == 0
    assert (dst / "lengths.png").read_bytes()[:4] == b"\x89PNG"
    assert ds.features["input_ids"].feature.dtype == "int32" and ds.features["labels"].feature.dtype == "int64"


def test_mindformers_handler_through_hfdataloader_gives_the_same_rows(handled, tmp_path):
    from mindformers.dataset.dataloader.hf_dataloader import HFDataLoader

    from distilled_plugins.in_mindformers import datasets_preprocess

    src, _dst, ds = handled
    assert "OpenR1Math220kDataHandler" in datasets_preprocess.register(datasets_preprocess.__file__.rsplit("/", 1)[0])
    handler = {"type": "OpenR1Math220kDataHandler", "tokenizer": {"pretrained_model_dir": str(TOKENIZER_DIR)}}
    loader = HFDataLoader(
        path="json", data_files=[str(src)], split="train", handler=[handler], python_multiprocessing=False
    )
    rows = [tuple(x.tolist() for x in item) for item in loader.create_tuple_iterator(output_numpy=True)]
    assert loader.get_col_names() == ["input_ids", "labels"]
    assert rows == list(zip(ds["input_ids"], ds["labels"], strict=False))

    # and the datasets_preprocess equivalent, driven by the shipped YAML
    config = tmp_path / "handling.yaml"
    text = (REPO / "configs" / "data_process_handling.yaml").read_text()
    config.write_text(text.replace("../shared/data/tokenizer/qwen2.5", str(TOKENIZER_DIR)))
    out = datasets_preprocess.preprocess(config, tmp_path / "handled", [str(src)])
    again = datasets.load_from_disk(str(out))
    assert again["input_ids"] == ds["input_ids"] and again["labels"] == ds["labels"]


@pytest.mark.parametrize(
    ("policy", "length", "counted"), [("tutorial", 202, "truncated"), ("drop", None, "too_long"), ("none", None, None)]
)
def test_truncation_policies(tmp_path, policy, length, counted, tokenizer):
    src = write_jsonl(tmp_path / "f.jsonl", conversation_rows(12))
    full = [
        len(x)
        for x in datasets.load_from_disk(
            str(run(HandleConfig(src=[str(src)], tokenizer=str(TOKENIZER_DIR), dst=str(tmp_path / "full"))))
        )["input_ids"]
    ]
    dst = run(
        HandleConfig(
            src=[str(src)], tokenizer=str(TOKENIZER_DIR), dst=str(tmp_path / policy), max_length=200, truncation=policy
        )
    )
    ds, stats = datasets.load_from_disk(str(dst)), json.loads((dst / "stats.json").read_text())
    over = sum(n > 200 for n in full)
    assert 0 < over < len(full)
    if policy == "tutorial":
        long = [x for x, n in zip(ds["input_ids"], full, strict=False) if n > 200]
        assert {len(x) for x in long} == {length} and stats["truncated"] == over
        assert all(tokenizer.decode(x[-2:]) == "<|im_end|>\n" for x in long)
    elif policy == "drop":
        assert len(ds) == len(full) - over
        assert stats["dropped"] == {"malformed_messages": 0, "no_assistant_turn": 0, "too_long": over}
        assert stats["rows_in"] == len(full) and stats["rows_out"] == len(ds) == len(full) - over
    else:
        assert [len(x) for x in ds["input_ids"]] == full and stats["truncated"] == 0


class TestBadInput:
    def test_missing_column(self, tmp_path):
        src = write_jsonl(tmp_path / "f.jsonl", [{"problem": "p", "answer": "1"}])
        with pytest.raises(DataError, match="column 'messages' not found; columns present: problem, answer"):
            run(HandleConfig(src=[str(src)], tokenizer=str(TOKENIZER_DIR), dst=str(tmp_path / "o")))

    def test_empty_dataset(self, tmp_path):
        src = tmp_path / "f.jsonl"
        src.write_text("")
        with pytest.raises(DataError, match="no rows to handle"):
            run(HandleConfig(src=[str(src)], tokenizer=str(TOKENIZER_DIR), dst=str(tmp_path / "o")))
        assert not (tmp_path / "o").exists()

    def test_tokenizer_without_chat_template(self, tmp_path):
        folder = shutil.copytree(TOKENIZER_DIR, tmp_path / "tok")
        config = json.loads((folder / "tokenizer_config.json").read_text())
        del config["chat_template"]
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        (folder / "chat_template.qwen2.5-7b-instruct.jinja").unlink()
        with pytest.raises(DataError, match="no chat template"):
            load_tokenizer(folder)

    def test_tokenizer_without_special_tokens(self, tmp_path):
        folder = shutil.copytree(TOKENIZER_DIR, tmp_path / "tok")
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["added_tokens_decoder"] = {
            k: v
            for k, v in config["added_tokens_decoder"].items()
            if v["content"] not in ("<|im_start|>", "<|im_end|>")
        }
        config["additional_special_tokens"] = []
        config["eos_token"] = "<|endoftext|>"
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        tok = json.loads((folder / "tokenizer.json").read_text())
        tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] not in ("<|im_start|>", "<|im_end|>")]
        (folder / "tokenizer.json").write_text(json.dumps(tok))
        with pytest.raises(DataError, match="special token <\\|im_start\\|> is not in the vocabulary"):
            load_tokenizer(folder)

    def test_missing_tokenizer_folder(self, tmp_path):
        with pytest.raises(DataError, match="tokenizer folder .* not found"):
            load_tokenizer(tmp_path / "nope")

    def test_bad_policy(self):
        with pytest.raises(ValueError, match="must be one of \\('tutorial', 'drop', 'none'\\)"):
            HandleConfig(src=["x"], tokenizer="t", dst="d", truncation="cut")


def test_stats_count_every_dropped_conversation_by_reason(tmp_path, caplog):
    """Each reason from real rows: rows in == rows out + dropped, and the last log line says so."""
    caplog.set_level(logging.INFO, logger="distilled_plugins.handle")
    good = conversation_rows(4)
    rows = [
        *good,
        {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "x"}]},  # malformed
        {"messages": [{"role": "user", "content": "a question and no answer"}]},  # no assistant turn
        {"messages": [*good[0]["messages"][:1], {"role": "assistant", "content": "word " * 5000}]},  # too long
    ]
    src = write_jsonl(tmp_path / "f.jsonl", rows)
    dst = run(
        HandleConfig(
            src=[str(src)], tokenizer=str(TOKENIZER_DIR), dst=str(tmp_path / "h"), max_length=4096, truncation="drop"
        )
    )
    stats = json.loads((dst / "stats.json").read_text())
    kept = datasets.load_from_disk(str(dst))
    assert stats["rows_in"] == 7 and stats["rows_out"] == stats["rows"] == len(kept) == 4
    assert max(len(x) for x in kept["input_ids"]) <= 4096
    assert stats["dropped"] == {"malformed_messages": 1, "no_assistant_turn": 1, "too_long": 1}
    final = [r.getMessage() for r in caplog.records if r.name == "distilled_plugins.handle"][-1]
    assert final == "kept 4 of 7 conversations; dropped 3: malformed_messages 1, no_assistant_turn 1, too_long 1"
