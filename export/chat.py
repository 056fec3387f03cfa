"""Chat formatting reduced to a prefix and a suffix around the user message.

The model's Jinja chat template is rendered once on the host with a marker as the user message;
the text before and after the marker is stored in the bundle manifest, so a device runtime builds
exactly the same prompt with plain string concatenation (no Jinja on the device).
"""
from __future__ import annotations

from typing import Tuple

from runtime.errors import FirstEdgeError

MARKER = "\u2063FIRST_EDGE_PROMPT\u2063"


def chat_parts(tokenizer) -> Tuple[str, str]:
    if not getattr(tokenizer, "chat_template", None):
        return "", ""
    text = tokenizer.apply_chat_template([{"role": "user", "content": MARKER}], tokenize=False,
                                         add_generation_prompt=True)
    if text.count(MARKER) != 1:
        raise FirstEdgeError("the model's chat template does not render the user message verbatim")
    pre, post = text.split(MARKER)
    return pre, post


def encode_prompt(tokenizer, prompt: str, chat: bool = True):
    """Token ids of ``prompt`` wrapped in the chat template (no extra special tokens added)."""
    pre, post = chat_parts(tokenizer) if chat else ("", "")
    if not pre and not post:
        return tokenizer(prompt)["input_ids"]
    return tokenizer(pre + prompt + post, add_special_tokens=False)["input_ids"]
