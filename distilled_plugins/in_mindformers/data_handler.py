"""``OpenR1Math220kDataHandler``: stage 3's logic as a mindformers data handler (mindformers 1.7+ API).

Use it in a data loader config (see ``configs/data_process_handling.yaml``)::

    handler:
      - type: OpenR1Math220kDataHandler
        tokenizer:
          pretrained_model_dir: /path/to/Qwen2.5-Math-7B-Instruct   # a folder with tokenizer.json
        max_length: 20480
        truncation: tutorial

Importing this module makes the handler visible to mindformers' ``HFDataLoader``, which looks handlers up as
attributes of ``mindformers.dataset.handler``. The tokenization is
:class:`distilled_plugins.handle.encoder.ChatEncoder`, the same code the stage runs, so both paths give the same
rows.
"""

from __future__ import annotations

import mindformers.dataset.handler as mindformers_handlers
from mindformers.dataset.handler.base_handler import BaseInstructDataHandler
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from distilled_plugins.core.schema import HANDLED_COLUMNS, features
from distilled_plugins.handle.config import SYSTEM_PROMPT, TRUNCATION_POLICIES
from distilled_plugins.handle.encoder import ChatEncoder, load_tokenizer


@MindFormerRegister.register(MindFormerModuleType.DATA_HANDLER)
class OpenR1Math220kDataHandler(BaseInstructDataHandler):
    """System prompt + Qwen2.5 chat template + labels masked up to the assistant's answer."""

    def __init__(self, **kwargs):
        self.system_prompt = kwargs.pop("system_prompt", SYSTEM_PROMPT)
        self.max_length = int(kwargs.pop("max_length", 20480))
        self.truncation = kwargs.pop("truncation", "tutorial")
        self.messages_column = kwargs.pop("messages_column", "messages")
        self.batch_size = int(kwargs.pop("batch_size", 1000))
        if self.truncation not in TRUNCATION_POLICIES:
            raise ValueError(f"Invalid truncation {self.truncation!r}, must be one of {TRUNCATION_POLICIES}.")
        super().__init__(**kwargs)
        self.encoder = ChatEncoder(self.tokenizer, self.system_prompt, self.max_length, self.truncation)

    def build_tokenizer(self, config):
        """The fast tokenizer of ``tokenizer.pretrained_model_dir`` (or the folder of ``vocab_file``)."""
        import os

        config = dict(config or {})
        folder = config.get("pretrained_model_dir") or (
            os.path.dirname(config["vocab_file"]) if config.get("vocab_file") else None
        )
        if not folder:
            raise ValueError("OpenR1Math220kDataHandler needs tokenizer.pretrained_model_dir: a tokenizer folder")
        return load_tokenizer(folder)

    def __call__(self, dataset):
        if self.messages_column not in dataset.column_names:
            raise ValueError(f"column {self.messages_column!r} not found; columns present: {dataset.column_names}")

        def encode(batch):
            pairs = self.encoder.encode_batch(batch[self.messages_column])
            return {"input_ids": [ids for ids, _ in pairs], "labels": [labels for _, labels in pairs]}

        return dataset.map(
            encode,
            batched=True,
            batch_size=self.batch_size,
            remove_columns=dataset.column_names,
            features=features(HANDLED_COLUMNS),
            desc="OpenR1Math220kDataHandler",
        )


# HFDataLoader finds handlers as attributes of this module, not in the registry
mindformers_handlers.OpenR1Math220kDataHandler = OpenR1Math220kDataHandler
