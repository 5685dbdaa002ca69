"""Prompt tokenization for the gateway: plain text and chat messages (the model's chat template)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase


class PromptTokenizer:
    def __init__(self, model_dir: str | Path):
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(str(model_dir))
        self.vocab_size = len(self.tokenizer)

    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=True))

    def encode_chat(self, messages: Sequence[dict]) -> list[int]:
        if not self.tokenizer.chat_template:
            # A model without a template: a plain transcript, ending where the assistant speaks.
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
            return self.encode_text(text)
        text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer.encode(text, add_special_tokens=False))
