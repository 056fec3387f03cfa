"""Chat formatting reduced to a prefix and a suffix around the user message.

The model's Jinja chat template is rendered once on the host with a marker as the user message;
the text before and after the marker is stored in the bundle manifest, so a device runtime builds
exactly the same prompt with plain string concatenation (no Jinja on the device).
"""
from __future__ import annotations

from typing import Optional, Tuple

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


MARKER2 = "\u2063FIRST_EDGE_NEXT\u2063"
REPLY = "\u2063FIRST_EDGE_REPLY\u2063"


def chat_turn_prefix(tokenizer) -> Optional[str]:
    """The text between an assistant reply and the next user message (e.g. ChatML's
    ``<|im_end|>\\n<|im_start|>user\\n``): a chat session's next turn is the previous reply, this, the user
    message and the suffix. Rendered from the model's template with a two-turn conversation; None where the
    template does not render a conversation as the single-turn prompt, the reply and the next turn (the bundle
    then refuses chat sessions with that reason)."""
    if not getattr(tokenizer, "chat_template", None):
        return "\n"
    pre, post = chat_parts(tokenizer)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": MARKER}, {"role": "assistant", "content": REPLY},
         {"role": "user", "content": MARKER2}], tokenize=False, add_generation_prompt=True)
    head = pre + MARKER + post
    if not text.startswith(head + REPLY) or text.count(REPLY) != 1 or not text.endswith(MARKER2 + post):
        return None
    return text[len(head + REPLY):-len(MARKER2 + post)]


def chat_ids(tokenizer, pre: str, post: str, turn_prefix: Optional[str]) -> dict:
    """Token ids of the template pieces a chat session joins around the user's tokens (no special tokens added)."""
    enc = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"] if t else []  # noqa: E731
    return {"prefix": enc(pre), "suffix": enc(post), "turn_prefix": None if turn_prefix is None else enc(turn_prefix)}


def encode_prompt(tokenizer, prompt: str, chat: bool = True):
    """Token ids of ``prompt`` wrapped in the chat template (no extra special tokens added)."""
    pre, post = chat_parts(tokenizer) if chat else ("", "")
    if not pre and not post:
        return tokenizer(prompt)["input_ids"]
    return tokenizer(pre + prompt + post, add_special_tokens=False)["input_ids"]
