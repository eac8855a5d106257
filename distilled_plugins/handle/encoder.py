"""The chat encoding shared by the stage and the mindformers handler: the tokenizer, the chat template and the
label mask (every label up to and including the first ``<|im_start|>assistant\\n`` is -100)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from distilled_plugins.core.errors import DataError
from distilled_plugins.core.schema import IGNORE_INDEX
from distilled_plugins.core.stats import Stats
from distilled_plugins.handle.config import SYSTEM_PROMPT

ASSISTANT_MARKER = "<|im_start|>assistant\n"
# why a conversation is left out (one cut to max_length is kept and counted as truncated)
DROP_REASONS = ("malformed_messages", "no_assistant_turn", "too_long")


def load_tokenizer(path: str | Path, num_threads: int | None = None):
    """The fast Qwen2.5 tokenizer of a local folder, checked for what the stage needs."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"tokenizer folder {path} not found")
    if num_threads:
        os.environ["RAYON_NUM_THREADS"] = str(num_threads)  # read when the Rust thread pool first starts
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), use_fast=True)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot load a tokenizer: {e}") from e
    if not tokenizer.is_fast:
        raise DataError(f"{path}: no fast tokenizer (tokenizer.json) found")
    if not tokenizer.chat_template:
        raise DataError(f"{path}: the tokenizer has no chat template (tokenizer_config.json 'chat_template')")
    for token in ("<|im_start|>", "<|im_end|>"):
        if token not in tokenizer.get_vocab():
            raise DataError(f"{path}: special token {token} is not in the vocabulary; is this a Qwen2.5 tokenizer?")
    if tokenizer.pad_token_id is None:
        raise DataError(f"{path}: the tokenizer has no pad token")
    return tokenizer


class ChatEncoder:
    """Chat template + tokenizer + label mask: the logic shared by the stage and the mindformers handler."""

    def __init__(
        self, tokenizer, system_prompt: str = SYSTEM_PROMPT, max_length: int = 20480, truncation: str = "tutorial"
    ):
        self.tokenizer = tokenizer
        self.system = {"role": "system", "content": system_prompt}
        self.max_length, self.truncation = max_length, truncation
        self.marker = np.array(tokenizer.encode(ASSISTANT_MARKER, add_special_tokens=False), dtype=np.int64)
        self.stats = Stats("conversations", reasons=DROP_REASONS)
        self.truncated = 0  # kept, cut to max_length

    def _target_start(self, ids: np.ndarray) -> int | None:
        """Index of the first answer token: just past the first ``<|im_start|>assistant\\n``."""
        width = len(self.marker)
        for start in np.flatnonzero(ids == self.marker[0]):
            if np.array_equal(ids[start : start + width], self.marker):
                return int(start) + width
        return None

    def encode_batch(self, conversations: list) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(input_ids, labels)`` of each conversation that is kept; reasons for the others are counted."""
        valid = []
        self.stats.read(len(conversations))
        for messages in conversations:
            if not isinstance(messages, list) or not all(
                isinstance(m, dict) and "role" in m and isinstance(m.get("content"), str) for m in messages
            ):  # a null or list content would fail inside the chat template: count it instead
                self.stats.drop("malformed_messages")
            else:
                valid.append([self.system, *messages])
        if not valid:
            return []
        texts = self.tokenizer.apply_chat_template(valid, tokenize=False, add_generation_prompt=False)
        # the Rust tokenizer directly: batched across threads, without building Python BatchEncoding objects
        encodings = self.tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        out = []
        for encoding in encodings:
            ids = np.asarray(encoding.ids, dtype=np.int32)
            target = self._target_start(ids)
            if target is None or target >= len(ids):
                self.stats.drop("no_assistant_turn")
                continue
            if len(ids) > self.max_length:
                if self.truncation == "drop":
                    self.stats.drop("too_long")
                    continue
                if self.truncation == "tutorial":
                    # keep the head and the closing "<|im_end|>\n", as the tutorial's handler does
                    ids = np.concatenate([ids[: self.max_length], ids[-2:]])
                    self.truncated += 1
            labels = ids.astype(np.int64)
            labels[:target] = IGNORE_INDEX
            out.append((ids, labels))
        self.stats.keep(len(out))
        return out
