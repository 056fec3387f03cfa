"""Prompt encoding on the device: tokenizers' tokenizer.json plus the manifest's chat prefix/suffix."""
from __future__ import annotations

from typing import List

from .bundle import Bundle
from .errors import FirstEdgeError, first_line


class BundleTokenizer:
    def __init__(self, bundle: Bundle):
        from tokenizers import Tokenizer

        try:
            self.tok = Tokenizer.from_file(str(bundle.file("tokenizer.json")))
        except Exception as e:  # noqa: BLE001
            raise FirstEdgeError(f"cannot read tokenizer.json in {bundle.path}: {first_line(e, 200)}") from None
        chat = bundle.manifest.get("chat", {})
        self.prefix = chat.get("prefix", "")
        self.suffix = chat.get("suffix", "")

    def encode_prompt(self, prompt: str, chat: bool = True) -> List[int]:
        text = self.prefix + prompt + self.suffix if chat else prompt
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_text(self, text: str) -> List[int]:
        """Token ids of plain text (no template, no special tokens added): a chat session's user message."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)
