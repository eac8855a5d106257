"""The chain teaches a model: a smaller run of the learnability check through the real stages (slow: msrun)."""

from __future__ import annotations

import json

import pytest

from distilled_plugins.devtools import learnability
from distilled_plugins.handle import load_tokenizer
from distilled_plugins.io import rewrite_jsonl

TRAIN, HELD_OUT, EPOCHS = (learnability.TEST_SIZE[k] for k in ("n_train", "n_held_out", "epochs"))
# A wiring fault scores ~0. bench/learnability_probe.py's stand-in for training (the same model and rows, the
# vocabulary cut) passed this bar for 16 of 16 seeds at this size (the lowest 88%) and with one epoch less (41%).
MIN_AFTER = learnability.TEST_MIN_AFTER


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

    def test_every_problem_and_trace_has_the_same_token_length(self):
        """So each number word sits at the same distance from the answer: lookups by relative position suffice."""
        tokenizer = load_tokenizer(learnability.TOKENIZER)
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

    from distilled_plugins import configs
    from distilled_plugins.mf_generate import attention_mask, build_model

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

    from distilled_plugins.mf_generate import build_model

    train, _ = learnability.make_task(12, 0)
    packed, kept = learnability.data_stages(tmp_path, rewrite_jsonl(tmp_path / "train.jsonl", train))
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
        changed[position] = 1000 if ids[position] != 1000 else 1001
        return np.abs(logits(changed) - base).max(-1)

    number_word = first + 2  # inside the second sample's prompt
    diff = moved(number_word)
    assert diff[number_word + 1 : second].min() > 1e-4  # every later token of the same sample sees it
    assert diff[:number_word].max() == 0 and diff[second:].max() == 0  # earlier tokens and the next sample do not
    diff = moved(first - 3)  # the end of the first sample
    assert diff[first:].max() == 0
