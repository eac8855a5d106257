"""Stage 4: the plan, the overlong policies, and the output read back through mindformers' own loader."""

from __future__ import annotations

import json
import math

import datasets
import numpy as np
import pytest

from distilled_plugins.core.errors import DataError
from distilled_plugins.handle.config import HandleConfig
from distilled_plugins.handle.stage import run as handle_run
from distilled_plugins.pack.config import PackConfig
from distilled_plugins.pack.plan import Piece, pieces_of, plan_bfd, trainable_tokens
from distilled_plugins.pack.stage import run as pack_run
from tests.support import TOKENIZER_DIR, conversation_rows, write_jsonl

SEQ = 1024


class TestPlan:
    def test_best_fit_decreasing_literal(self):
        assert plan_bfd([5, 3, 4, 2, 6], 8) == [[4, 3], [0, 1], [2]]
        assert plan_bfd([8, 8, 1], 8) == [[0], [1], [2]]
        assert plan_bfd([], 8) == []

    def test_deterministic_and_near_optimal(self):
        rng = np.random.default_rng(0)
        lengths = np.clip(rng.lognormal(np.log(400), 0.8, 5000), 16, 1600).astype(int)
        first, second = plan_bfd(lengths, 1638), plan_bfd(lengths.copy(), 1638)
        assert first == second
        assert sorted(i for p in first for i in p) == list(range(5000))  # each sample exactly once
        assert all(lengths[p].sum() <= 1638 for p in first)
        assert len(first) <= math.ceil(lengths.sum() / 1638) * 1.005
        next_fit, room = 0, 0  # the tutorial's plan: a new row whenever the next sample does not fit
        for n in lengths:
            if n > room:
                next_fit, room = next_fit + 1, 1638
            room -= n
        assert len(first) < 0.85 * next_fit

    def test_rejects_items_longer_than_a_row(self):
        with pytest.raises(ValueError, match="every length must be in"):
            plan_bfd([9], 8)

    def test_overlong_policies(self):
        lengths = np.array([3, 10, 4])
        assert pieces_of(lengths, 4, "truncate") == (
            [Piece(0, 0, 3), Piece(1, 0, 4), Piece(2, 0, 4)],
            {"truncated": 1, "split": 0, "split_pieces": 0, "dropped": 0},
        )
        assert pieces_of(lengths, 4, "split")[0] == [
            Piece(0, 0, 3),
            Piece(1, 0, 4),
            Piece(1, 4, 4),
            Piece(1, 8, 2),
            Piece(2, 0, 4),
        ]
        assert pieces_of(lengths, 4, "split")[1]["split_pieces"] == 3
        assert pieces_of(lengths, 4, "drop") == (
            [Piece(0, 0, 3), Piece(2, 0, 4)],
            {"truncated": 0, "split": 0, "split_pieces": 0, "dropped": 1},
        )


@pytest.fixture(scope="module")
def handled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pack")
    src = write_jsonl(tmp / "filtered.jsonl", conversation_rows(60))
    return handle_run(HandleConfig(src=[str(src)], tokenizer=str(TOKENIZER_DIR), dst=str(tmp / "handled")))


def read_back(packed_dir):
    """Rows as mindformers' HFDataLoader yields them for training (create_attention_mask: True)."""
    from mindformers.dataset.dataloader.hf_dataloader import HFDataLoader

    loader = HFDataLoader(
        load_func="load_from_disk",
        dataset_path=str(packed_dir),
        create_attention_mask=True,
        python_multiprocessing=False,
    )
    assert loader.get_col_names() == ["input_ids", "labels", "loss_mask", "position_ids", "attention_mask"]
    return list(loader.create_tuple_iterator(output_numpy=True))


def test_mindformers_loader_reads_what_was_handled(handled, tmp_path):
    dst = pack_run(PackConfig(src=str(handled), dst=str(tmp_path / "packed"), seq_length=SEQ))
    samples = datasets.load_from_disk(str(handled))
    packed = datasets.load_from_disk(str(dst))
    assert packed.features["input_ids"].feature.dtype == "int32"
    assert packed.features["labels"].feature.dtype == "int64"
    rows = read_back(dst)
    assert len(rows) == len(packed)
    seen = []
    for (ids, labels, loss_mask, position_ids, attention_mask), ends in zip(
        rows, packed["actual_seq_len"], strict=False
    ):
        assert ids.shape == (SEQ,) and attention_mask.shape == (1, SEQ, SEQ)
        starts = [0, *ends[:-1]]
        for start, end in zip(starts, ends, strict=False):
            np.testing.assert_array_equal(position_ids[start:end], np.arange(end - start))  # restart per sample
            original = next(i for i, s in enumerate(samples["input_ids"]) if s == ids[start:end].tolist())
            seen.append(original)
            raw_labels = np.array(samples["labels"][original])
            answer_next = np.append(raw_labels[1:] != -100, True)  # next token is an answer token, or "+ [pad]"
            np.testing.assert_array_equal(loss_mask[start:end].astype(bool), answer_next)
            np.testing.assert_array_equal(labels[start : end - 1], raw_labels[1:])
            assert labels[end - 1] == 151643
            block = attention_mask[0, start:end]  # 1 = masked out
            assert block[:, :start].all()  # no token sees an earlier sample of the row
            np.testing.assert_array_equal(block[:, start:end], 1 - np.tril(np.ones((end - start,) * 2, int)))
        assert (ids[ends[-1] :] == 151643).all() and not loss_mask[ends[-1] :].any()
    assert sorted(seen) == list(range(len(samples)))  # every handled sample once, nothing lost
    stats = json.loads((dst / "stats.json").read_text())
    assert stats["packs"] == len(rows) and stats["samples_in"] == len(samples)
    assert stats["rows_in"] == stats["rows_out"] == len(samples)
    assert stats["dropped"] == {"too_long": 0, "no_trainable_token": 0}
    assert stats["efficiency"] == round(stats["tokens"] / (len(rows) * SEQ), 6)


def test_never_more_packs_than_mindformers_packing_handler(handled, tmp_path):
    from mindformers.dataset.handler import PackingHandler

    ours = json.loads(
        (pack_run(PackConfig(src=str(handled), dst=str(tmp_path / "p"), seq_length=SEQ)) / "stats.json").read_text()
    )["packs"]
    theirs = len(PackingHandler(seq_length=SEQ, pack_strategy="pack")(datasets.load_from_disk(str(handled))))
    assert ours <= theirs


@pytest.mark.parametrize("policy", ["truncate", "split", "drop"])
def test_overlong_samples_are_counted_never_silently_lost(handled, tmp_path, policy):
    seq = 256
    lengths = [len(x) for x in datasets.load_from_disk(str(handled))["input_ids"]]
    all_labels = datasets.load_from_disk(str(handled))["labels"]
    over = sum(n > seq for n in lengths)
    starts = {"truncate": lambda n: [0], "split": lambda n: range(0, n - seq, seq), "drop": lambda n: []}[policy]
    prompt_only = sum(  # pieces stopping before their sample's end whose shifted labels are all ignored
        all(label == -100 for label in labels[start + 1 : start + seq + 1])
        for labels in all_labels
        if len(labels) > seq
        for start in starts(len(labels))
    )
    assert over > 0
    dst = pack_run(PackConfig(src=str(handled), dst=str(tmp_path / policy), seq_length=seq, overlong=policy))
    stats = json.loads((dst / "stats.json").read_text())
    key = {"truncate": "truncated", "split": "split", "drop": "dropped"}[policy]
    assert stats["overlong"][key] == over
    expected_tokens = {
        "truncate": sum(min(n, seq) for n in lengths),
        "split": sum(lengths),
        "drop": sum(n for n in lengths if n <= seq),
    }[policy]
    assert sum(stats["pieces_without_trainable_token"].values()) == prompt_only
    expected_tokens -= prompt_only * seq
    assert stats["tokens"] == expected_tokens
    # samples: in == out + dropped; a split sample loses at most its head, a truncated one all it had
    dropped = {"too_long": over if policy == "drop" else 0, "no_trainable_token": prompt_only * (policy == "truncate")}
    assert stats["dropped"] == dropped
    assert stats["rows_in"] == len(lengths) and stats["rows_out"] == len(lengths) - sum(dropped.values())
    assert (
        sum(sum(1 for t in row if t != 151643) for row in datasets.load_from_disk(str(dst))["input_ids"])
        <= expected_tokens
    )
    read_back(dst)


def test_seq_length_comes_from_the_finetune_config(handled, tmp_path):
    cfg = PackConfig(src=str(handled), dst=str(tmp_path / "p"))
    assert cfg.seq_length == 32768
    custom = tmp_path / "ft.yaml"
    custom.write_text("model:\n  model_config:\n    seq_length: 2048\n")
    assert PackConfig(src="s", dst="d", finetune_config=str(custom)).seq_length == 2048


class TestPiecesWithoutTrainableTokens:
    """A split sample's prompt-only head would be a loss step over nothing: it is not packed, and it is counted."""

    LABELS = [-100] * 7 + [8, 9, 10]  # 7 prompt tokens, then the answer

    def handmade(self, tmp_path, rows):
        src = tmp_path / "h"
        datasets.Dataset.from_dict(
            {"input_ids": [list(range(1, len(r) + 1)) for r in rows], "labels": rows},
            features=datasets.Features(
                {
                    "input_ids": datasets.Sequence(datasets.Value("int32")),
                    "labels": datasets.Sequence(datasets.Value("int64")),
                }
            ),
        ).save_to_disk(str(src))
        return src

    def test_trainable_tokens_literal(self):
        labels = np.array(self.LABELS)
        assert trainable_tokens(labels, Piece(0, 0, 4)) == 0  # shifted labels[1:5]: prompt only
        assert trainable_tokens(labels, Piece(0, 4, 4)) == 2  # labels[5:9] = -100, -100, 8, 9
        assert trainable_tokens(labels, Piece(0, 8, 2)) == 2  # labels[9:10] = 10, then the final pad

    @pytest.mark.parametrize(
        ("policy", "reason"), [("split", "split_piece_prompt_only"), ("truncate", "truncated_prompt_only")]
    )
    def test_prompt_only_pieces_are_not_packed_and_counted(self, tmp_path, policy, reason):
        src = self.handmade(tmp_path, [self.LABELS, [-100, 5, 6]])
        dst = pack_run(PackConfig(src=str(src), dst=str(tmp_path / "p"), seq_length=4, overlong=policy, pad_token_id=0))
        stats = json.loads((dst / "stats.json").read_text())
        packed = datasets.load_from_disk(str(dst))
        other = "truncated_prompt_only" if reason == "split_piece_prompt_only" else "split_piece_prompt_only"
        assert stats["pieces_without_trainable_token"] == {reason: 1, other: 0}
        if policy == "split":  # pieces [4, 8) and [8, 10) of the first sample, the whole second one
            assert stats["pieces_packed"] == 3 and stats["tokens"] == 4 + 2 + 3
            assert stats["rows_in"] == stats["rows_out"] == 2 and sum(stats["dropped"].values()) == 0
            assert sorted(packed["input_ids"]) == [[1, 2, 3, 0], [5, 6, 7, 8], [9, 10, 0, 0]]
        else:  # the first sample's only piece [0, 4) is prompt only
            assert stats["pieces_packed"] == 1 and packed["input_ids"] == [[1, 2, 3, 0]]
            assert stats["rows_in"] == 2 and stats["rows_out"] == 1
            assert stats["dropped"] == {"too_long": 0, "no_trainable_token": 1}
        assert all(any(t != -100 for t in row) for row in packed["labels"])

    def test_real_conversations_no_row_without_a_trainable_token(self, handled, tmp_path):
        seq = 64  # shorter than most prompts (system prompt + problem): their heads hold no answer token
        samples = datasets.load_from_disk(str(handled))
        expected = 0
        for labels in samples["labels"]:
            for start in range(0, len(labels) - seq, seq):  # pieces that stop before the sample's end
                expected += all(label == -100 for label in labels[start + 1 : start + seq + 1])
        assert expected > 0
        dst = pack_run(PackConfig(src=str(handled), dst=str(tmp_path / "p"), seq_length=seq))
        stats = json.loads((dst / "stats.json").read_text())
        assert stats["pieces_without_trainable_token"]["split_piece_prompt_only"] == expected
        assert stats["tokens"] == stats["tokens_in"] - expected * seq
        rows = read_back(dst)
        assert len(rows) == stats["packs"]
        assert all(loss_mask.any() for _, _, loss_mask, _, _ in rows)  # no training step over nothing


class TestBadInput:
    def test_drop_with_nothing_left(self, handled, tmp_path):
        with pytest.raises(DataError, match="policy 'drop' left nothing"):
            pack_run(PackConfig(src=str(handled), dst=str(tmp_path / "p"), seq_length=16, overlong="drop"))
        assert not (tmp_path / "p").exists()

    def test_missing_column(self, tmp_path):
        datasets.Dataset.from_dict({"input_ids": [[1, 2]]}).save_to_disk(str(tmp_path / "h"))
        with pytest.raises(DataError, match="column 'labels' not found; columns present: input_ids"):
            pack_run(PackConfig(src=str(tmp_path / "h"), dst=str(tmp_path / "p"), seq_length=8))

    def test_empty_dataset(self, tmp_path):
        datasets.Dataset.from_dict({"input_ids": [], "labels": []}).save_to_disk(str(tmp_path / "h"))
        with pytest.raises(DataError, match="empty"):
            pack_run(PackConfig(src=str(tmp_path / "h"), dst=str(tmp_path / "p"), seq_length=8))

    def test_bad_policy_lists_choices(self):
        with pytest.raises(ValueError, match=r"must be one of \('truncate', 'split', 'drop'\)"):
            PackConfig(src="s", dst="d", seq_length=8, overlong="squash")
