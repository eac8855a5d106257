"""The chain teaches a model: a smaller run of the learnability check through the real stages (slow: msrun)."""

from __future__ import annotations

import json

import pytest

from distilled_plugins.core import configs
from distilled_plugins.core.io import rewrite_jsonl
from distilled_plugins.devtools import learnability
from distilled_plugins.handle.config import SYSTEM_PROMPT
from distilled_plugins.handle.encoder import load_tokenizer

TRAIN, HELD_OUT, EPOCHS = (learnability.SIZE[k] for k in ("n_train", "n_held_out", "epochs"))
# A wiring fault scores ~0 and guessing 1 in 64. bench/learnability_probe.py's stand-in for the fine-tune stage (the
# same model, vocabulary and packed rows) measures how many seeds pass this bar at this size (README).
MIN_AFTER = learnability.TEST_MIN_AFTER


@pytest.fixture(scope="module")
def task_tokenizer(tmp_path_factory):
    return learnability.build_tokenizer(tmp_path_factory.mktemp("task") / "tokenizer")


class TestTask:
    def test_problem_literal(self):
        row = learnability.problem(5, 7, "Ben", ("cats", "dogs", "pets"))
        assert row["problem"] == "Ben has fifty cats and seven dogs. How many pets does Ben have?"
        assert row["answer"] == "57"
        assert row["solution"] == "<think>\nWe add fifty and seven.\n</think>\n\\boxed{57}"
        assert learnability.TRACE_FORMAT.fullmatch(row["solution"])

    def test_answers(self):
        assert len(learnability.ANSWERS) == 64  # tens 2-9, units 1-9, the two digits different: chance 1 in 64
        held = [a for a in learnability.ANSWERS if learnability.held_out_answer(*a)]
        assert len(held) == 14
        trained = set(learnability.ANSWERS) - set(held)
        # every tens word and every units word is trained on, in other answers
        assert {t for t, _ in trained} == set(range(2, 10)) and {u for _, u in trained} == set(range(1, 10))

    def test_every_problem_and_trace_has_the_same_token_length(self, task_tokenizer):
        """So each number word sits at the same distance from the answer: lookups by relative position suffice."""
        tokenizer = load_tokenizer(task_tokenizer)
        rows = [
            learnability.problem(*answer, name, story)
            for answer in learnability.ANSWERS
            for name in learnability.NAMES
            for story in learnability.STORIES
        ]
        assert len(rows) == 3072
        lengths = {(len(tokenizer.encode(r["problem"])), len(tokenizer.encode(r["solution"]))) for r in rows}
        assert len(lengths) == 1, lengths  # one problem length and one trace length

    def test_held_out_answers_are_never_trained_on(self):
        train, held_out = learnability.make_task(600, 64)
        assert len(train) == 600 and len(held_out) == 64
        assert len({r["problem"] for r in train}) == 600
        assert not {r["answer"] for r in train} & {r["answer"] for r in held_out}
        with pytest.raises(ValueError, match="at most 2400 training and 672 held-out"):
            learnability.make_task(2401, 64)


class TestTokenizer:
    """The task's tokenizer: Qwen2.5's template and pre-tokenizer, the task's words as the vocabulary."""

    def test_vocabulary_is_the_special_tokens_and_the_tasks_words(self, task_tokenizer):
        tokenizer = load_tokenizer(task_tokenizer)  # what handle and evaluation load: fast, template, pad token
        qwen = load_tokenizer(learnability.QWEN_TOKENIZER)
        assert len(tokenizer) == 101 == configs.load_yaml(learnability.PROFILE)["model"]["model_config"]["vocab_size"]
        assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == [*learnability.SPECIAL_TOKENS, "<|unk|>"]
        assert (tokenizer.pad_token, tokenizer.eos_token) == (qwen.pad_token, qwen.eos_token)
        assert tokenizer.chat_template == qwen.chat_template
        row = learnability.problem(5, 7, "Ben", ("cats", "dogs", "pets"))
        conversation = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": row["problem"]},
            {"role": "assistant", "content": row["solution"]},
        ]
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
        assert text == qwen.apply_chat_template(conversation, tokenize=False)
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        tokens = tokenizer.convert_ids_to_tokens(ids)
        assert " ".join(tokens[tokens.index("user") - 1 :]) == (
            "<|im_start|> user Ċ Ben Ġhas Ġfifty Ġcats Ġand Ġseven Ġdogs . ĠHow Ġmany Ġpets Ġdoes ĠBen Ġhave ? "
            "<|im_end|> Ċ <|im_start|> assistant Ċ <think >Ċ We Ġadd Ġfifty Ġand Ġseven .Ċ </ think >Ċ \\boxed { 5 7 } "
            "<|im_end|> Ċ"
        )
        # Qwen2.5 has the same tokens, but for "<think" and "\\boxed": two each
        assert len(qwen.encode(text)) == len(ids) + 2

    def test_a_word_outside_the_task_is_unknown(self, task_tokenizer):
        tokenizer = load_tokenizer(task_tokenizer)
        assert tokenizer.convert_ids_to_tokens(tokenizer.encode("Zoe has ten cats")) == [
            "<|unk|>",
            "Ġhas",
            "<|unk|>",
            "Ġcats",
        ]

    def test_mindformers_loads_it(self, task_tokenizer):
        from mindformers.models.build_tokenizer import build_tokenizer

        tokenizer = build_tokenizer(use_legacy=False, pretrained_model_dir=str(task_tokenizer))
        text = learnability.problem(5, 7)["problem"]
        assert tokenizer.encode(text) == load_tokenizer(task_tokenizer).encode(text)
        assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]

    def test_a_profile_of_another_vocabulary_is_refused(self, tmp_path, monkeypatch):
        profile = tmp_path / "profile.yaml"
        profile.write_text(learnability.PROFILE.read_text().replace("vocab_size: 101", "vocab_size: 151936"))
        monkeypatch.setattr(learnability, "PROFILE", profile)
        with pytest.raises(
            ValueError, match="model vocab_size 151936 and pad_token_id 0 must be the task tokenizer's 101"
        ):
            learnability.build_tokenizer(tmp_path / "tokenizer")
        assert not (tmp_path / "tokenizer").exists()


@pytest.mark.slow
def test_the_chain_teaches_a_small_model(tmp_path):
    report = learnability.run_check(tmp_path / "check", n_train=TRAIN, n_held_out=HELD_OUT, epochs=EPOCHS)
    assert report == json.loads((tmp_path / "check" / "report.json").read_text())
    assert report["held_out"] == HELD_OUT and report["train_kept"] == TRAIN
    assert report["before"] <= 5.0  # an untrained model does not answer (chance: 1 in 64)
    assert report["trace_format_before"] <= 5.0
    # the trained model writes the trained trace, through the evaluation prompt and the checkpoint it loaded
    assert report["trace_format_after"] >= 90.0, report
    # and reads the problem: answers it was never trained on, far above chance (1 in 64)
    assert report["after"] >= MIN_AFTER, report
    assert (tmp_path / "check" / "loss.png").stat().st_size > 0


@pytest.mark.slow
def test_an_explicit_mask_hides_the_future_without_flash_attention():
    """Packed rows' mask is uint8 "1 = hidden"; without the fix mindformers added it (+1) and training saw ahead."""
    import mindspore as ms
    import numpy as np

    from distilled_plugins.core import configs
    from distilled_plugins.in_mindformers.mf_generate import attention_mask, build_model

    model = build_model(str(configs.CONFIG_DIR / "finetune_tiny_cpu.yaml"), "untrained", 8)
    tokens = np.arange(100, 108, dtype=np.int32)[None]
    changed = tokens.copy()
    changed[0, 4:] = [7, 8, 9, 10]
    mask = ms.Tensor(attention_mask(np.zeros((1, 8), dtype=bool))[:, None])
    first = model.model(ms.Tensor(tokens), attention_mask=mask).asnumpy()
    second = model.model(ms.Tensor(changed), attention_mask=mask).asnumpy()
    np.testing.assert_array_equal(first[0, :4], second[0, :4])  # the first 4 positions do not see the last 4
    assert np.abs(first[0, 4:] - second[0, 4:]).max() > 1e-3
    unmasked = model.model(ms.Tensor(tokens)).asnumpy()  # mindformers' own causal mask
    np.testing.assert_allclose(first, unmasked, atol=1e-5)


@pytest.mark.slow
def test_a_packed_row_lets_each_token_see_its_own_sample_and_nothing_else(tmp_path):
    """What the loader delivers, through the model as training runs it: content must flow, and only within a sample.

    A fault in pack's offsets, mindformers' packed mask or the uint8 -> additive conversion (train.py) fails here
    in seconds; the learnability check above would only show it as a model that does not learn.
    """
    import datasets
    import mindspore as ms
    import numpy as np
    from mindformers.dataset.dataloader.hf_dataloader import _get_packed_data

    from distilled_plugins.in_mindformers.mf_generate import build_model

    train, _ = learnability.make_task(12, 0)
    tokenizer = learnability.build_tokenizer(tmp_path / "tokenizer")
    packed, kept = learnability.data_stages(tmp_path, rewrite_jsonl(tmp_path / "train.jsonl", train), tokenizer)
    assert kept == 12
    row = datasets.load_from_disk(str(packed))[0]
    ids, labels, loss_mask, position_ids, mask = _get_packed_data(
        row["input_ids"], row["labels"], row["actual_seq_len"]
    )
    ends = list(row["actual_seq_len"])
    assert len(ends) >= 2, ends  # at least two samples share the row
    first, second = ends[0], ends[1]
    assert position_ids[first] == 0 and position_ids[first - 1] == first - 1  # each sample counts from 0
    np.testing.assert_array_equal(
        labels[: first - 1][loss_mask[: first - 1] == 1], ids[1:first][loss_mask[: first - 1] == 1]
    )
    model = build_model(str(learnability.PROFILE), "untrained", len(ids))

    def logits(tokens):
        out = model(
            ms.Tensor(tokens[None]),
            labels=ms.Tensor(labels[None]),
            position_ids=ms.Tensor(position_ids[None]),
            attention_mask=ms.Tensor(mask[None]),
        )
        return out[0].asnumpy().reshape(len(ids), -1)

    base = logits(ids)

    def moved(position):  # how much each position's logits move when the token at `position` changes
        changed = ids.copy()
        changed[position] = 10 if ids[position] != 10 else 11  # another word of the task's vocabulary
        return np.abs(logits(changed) - base).max(-1)

    number_word = first + 2  # inside the second sample's prompt
    diff = moved(number_word)
    assert diff[number_word + 1 : second].min() > 1e-4  # every later token of the same sample sees it
    assert diff[:number_word].max() == 0 and diff[second:].max() == 0  # earlier tokens and the next sample do not
    diff = moved(first - 3)  # the end of the first sample
    assert diff[first:].max() == 0
