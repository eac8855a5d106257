"""The tiny profile's tokenizer (configs/tokenizer_tiny): Qwen2.5's cut to 4,096 tokens, and the checks that keep
a tokenizer, the data packed with it and a profile's vocabulary together."""

from __future__ import annotations

import pytest

from distilled_plugins import preflight
from distilled_plugins.core import configs
from distilled_plugins.core.errors import DataError
from distilled_plugins.devtools import tiny_tokenizer
from distilled_plugins.devtools.local_airflow import free_port
from distilled_plugins.handle.encoder import load_tokenizer
from tests.support import TOKENIZER_DIR, conversation_rows, handled_and_packed_rows, write_jsonl


@pytest.fixture(scope="module")
def tokenizers():
    return load_tokenizer(configs.TINY_TOKENIZER), load_tokenizer(TOKENIZER_DIR)


def test_the_committed_folder_is_what_the_builder_writes(tmp_path):
    built = tiny_tokenizer.build(tmp_path / "tokenizer")
    committed = sorted(p.name for p in configs.TINY_TOKENIZER.iterdir())
    assert sorted(p.name for p in built.iterdir()) == committed
    for name in committed:
        assert (built / name).read_bytes() == (configs.TINY_TOKENIZER / name).read_bytes(), name


def test_it_renders_qwens_template_and_encodes_any_text_losslessly_in_the_profiles_vocabulary(tokenizers):
    tiny, qwen = tokenizers
    model = configs.load_yaml(configs.FINETUNE_TINY)["model"]["model_config"]
    assert len(tiny) == model["vocab_size"] == 4096 and tiny.pad_token_id == model["pad_token_id"]
    texts = [qwen.apply_chat_template(row["messages"], tokenize=False) for row in conversation_rows(20)]
    texts.append("∑ 日本語 \\boxed{\\frac{1}{2}} 🙂\r\n\t")  # bytes outside the cut vocabulary's merges
    for text in texts:
        ids = tiny(text, add_special_tokens=False)["input_ids"]
        assert max(ids) < model["vocab_size"] and tiny.decode(ids) == text
    messages = conversation_rows(1)[0]["messages"]
    assert tiny.apply_chat_template(messages, tokenize=False) == qwen.apply_chat_template(messages, tokenize=False)
    # the special tokens are whole tokens after the vocabulary, as in Qwen2.5
    assert tiny.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [4074, 4075, 4076]
    # the same BPE, fewer merges: a common word is one token in both
    assert tiny.tokenize(" the") == qwen.tokenize(" the") == ["Ġthe"]


@pytest.mark.parametrize(
    ("tokenizer", "profile", "refused"),
    [
        (TOKENIZER_DIR, configs.FINETUNE_TINY.name, True),
        (configs.TINY_TOKENIZER, configs.FINETUNE_TINY.name, False),
        (TOKENIZER_DIR, configs.FINETUNE_7B.name, False),
    ],
)
def test_the_preflight_refuses_a_tokenizer_whose_ids_the_profile_cannot_embed(tmp_path, tokenizer, profile, refused):
    run = preflight.RunInputs(
        source="packed_dataset", tokenizer_dir=str(tokenizer), finetune_config=profile, output_root=str(tmp_path)
    )
    lines = [line for line in preflight.problems(run) if line.startswith("tokenizer_dir")]
    expected = (
        f"tokenizer_dir: {TOKENIZER_DIR}: token ids up to 151664, but the fine-tune profile finetune_tiny_cpu.yaml "
        f"has a vocabulary of 4096; give the tokenizer its model was made for ({configs.TINY_TOKENIZER})"
    )
    assert lines == ([expected] if refused else [])


def test_generation_refuses_a_tokenizer_with_more_tokens_than_the_models_vocabulary(tmp_path, caplog):
    from distilled_plugins.in_mindformers import mf_generate

    problems = write_jsonl(tmp_path / "p.jsonl", [{"problem": "What is 1 + 1?", "answer": "2"}])
    argv = ["--config", str(configs.FINETUNE_TINY), "--checkpoint", "untrained", "--tokenizer", str(TOKENIZER_DIR)]
    argv += ["--problems", str(problems), "--output", str(tmp_path / "out.jsonl"), "--system-prompt", "Reason."]
    assert mf_generate.main(argv) == 2
    assert "151665 tokens, more than the model's vocabulary" in caplog.text and not (tmp_path / "out.jsonl").exists()


@pytest.fixture(scope="module")
def qwen_packed(tmp_path_factory):
    """Rows handled and packed with Qwen2.5's tokenizer at the tiny profile's row length (256)."""
    return handled_and_packed_rows(tmp_path_factory.mktemp("qwen-packed"), TOKENIZER_DIR, 5, start=2)[1]


def test_data_packed_with_another_tokenizer_is_refused_before_training(qwen_packed, tiny_packed, tmp_path):
    from distilled_plugins.finetune import FinetuneConfig, stage

    why = (
        "packed with pad id 151643, but the fine-tune profile finetune_tiny_cpu.yaml pads with 4074 (a vocabulary of "
        "4096): another tokenizer than its model's (or pack's --pad-token-id); handle and pack again with the "
        f"tokenizer its model was made for ({configs.TINY_TOKENIZER}), or pick the profile the data was packed for"
    )

    def preflight_lines(packed) -> list[str]:
        run = preflight.RunInputs(
            source="packed_dataset",
            packed_dataset=str(packed),
            finetune_config=configs.FINETUNE_TINY.name,
            output_root=str(tmp_path),
        )
        return [line for line in preflight.problems(run) if line.startswith("packed_dataset")]

    assert preflight_lines(qwen_packed) == [f"packed_dataset: {qwen_packed}: {why}"]
    assert preflight_lines(tiny_packed) == []  # packed with the profile's own tokenizer
    out = tmp_path / "out"
    cfg = FinetuneConfig(
        config=str(configs.FINETUNE_TINY), dataset_path=str(qwen_packed), output_dir=str(out), master_port=free_port()
    )
    with pytest.raises(DataError) as refused:  # the fine-tune task's own check, before msrun starts
        stage.launch(cfg)
    assert str(refused.value) == f"{qwen_packed}: {why}"
    assert not list(out.glob("job-*/node-0.json"))
