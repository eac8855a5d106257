"""The chain teaches a model: a smaller run of the learnability check through the real stages (slow: msrun)."""

from __future__ import annotations

import json

import pytest

from distilled_plugins.devtools import learnability

# the demo's size, smaller than the benchmark's (360 / 64 / 3 epochs): a few minutes
TRAIN, HELD_OUT, EPOCHS = (learnability.DEMO_SIZE[k] for k in ("n_train", "n_held_out", "epochs"))


class TestTask:
    def test_problem_literal(self):
        row = learnability.problem("472")
        assert row["problem"] == "Ben reads Ada's number backwards. Ada's number is 472"
        assert row["answer"] == "274"
        assert row["solution"] == "<think>\n4 7 2 backwards is 2 7 4\n</think>\n\\boxed{274}"

    def test_train_and_held_out_are_disjoint(self):
        train, held_out = learnability.make_task(600, 64)
        assert len(train) == 600 and len(held_out) == 64
        assert not {r["problem"] for r in train} & {r["problem"] for r in held_out}
        with pytest.raises(ValueError, match="at most 729"):
            learnability.make_task(700, 64)


@pytest.mark.slow
def test_the_chain_teaches_a_small_model(tmp_path):
    report = learnability.run_check(tmp_path / "check", n_train=TRAIN, n_held_out=HELD_OUT, epochs=EPOCHS)
    assert report == json.loads((tmp_path / "check" / "report.json").read_text())
    assert report["held_out"] == HELD_OUT and report["train_kept"] == TRAIN
    assert report["before"] <= 5.0  # an untrained model does not guess 3-digit answers (chance: 1 in 729)
    assert report["trace_format_before"] <= 5.0
    # the trained model writes the trained trace, through the evaluation prompt and the checkpoint it loaded
    # (a label shift, a prompt unlike training's, a checkpoint not loaded or a decoding fault breaks this)
    assert report["trace_format_after"] >= 90.0, report
    # not asserted yet: the reversed digits themselves (after >= 90 is the benchmark's target, not reached: README)
    assert report["final_loss"] < report["first_loss"] / 4
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
