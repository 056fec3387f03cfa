"""Chat sessions: multi-turn generation that reuses the KV cache, with a fresh route per turn (DESIGN.md
section 5).

A :class:`Session` holds a backend (its per-layer KV buffers) and the conversation's tokens. The first turn
is the single-turn prompt (chat prefix, user message, suffix) through ``prefill``. Every later turn's new
tokens are the previous reply, the template's ``turn_prefix`` (e.g. ``<|im_end|>\\n<|im_start|>user\\n``), the
user message and the suffix; they run through **every** layer with the backend's ``extend`` from the end of
the last turn's prompt. The previous reply was decoded with layers skipped, so some layers hold no K/V for it
and the kept layers' entries came from a residual stream that skipped layers: the extend overwrites all of
them, and afterwards every layer holds exactly the K/V a full prefill of the whole conversation would give.
The routers read the turn's user message (the single-turn pooling rule over the new tokens from the user
message on) and decide this turn's mask; decode then skips as in single-turn generation.

Token ids in, token ids out; with a tokenizer (``Session.from_bundle``) text in, text out.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Union

import numpy as np

from .errors import FirstEdgeError
from .loop import GenerationResult, SamplingConfig, generate
from .masks import check_mask, make_mask


@dataclass
class Turn:
    user: List[int]
    reply: List[int]


@dataclass
class TurnResult:
    reply_ids: List[int]
    reply: Optional[str]
    result: GenerationResult
    turn: int
    reused_tokens: int  # cached tokens this turn did not recompute
    prefilled_tokens: int  # tokens run through every layer this turn (the new tokens, plus a re-prefill)
    history_tokens: int  # the conversation's tokens after this turn's prompt (exact in every layer)
    dropped_turns: int = 0

    def stats(self) -> dict:
        s = self.result.stats()
        s.update(turn=self.turn, reused_tokens=self.reused_tokens, prefilled_tokens=self.prefilled_tokens,
                 history_tokens=self.history_tokens, dropped_turns=self.dropped_turns, reply_tokens=len(self.reply_ids))
        return s

    def stats_line(self) -> str:
        s = self.stats()
        drop = f" | dropped {self.dropped_turns} oldest turn(s)" if self.dropped_turns else ""
        return (f"turn {self.turn} | reused {s['reused_tokens']} tok | prefill {s['prefilled_tokens']} new tok "
                f"{s['prefill_ms']:.1f} ms | decode {s['decode_tokens_per_s']:.2f} tok/s over {s['new_tokens']} tok | "
                f"layers kept {s['layers_kept']}/{s['n_layers']} | stop: {s['stop_reason']}{drop}")


class Session:
    """A multi-turn conversation on one backend (``runtime.loop.Backend`` with ``extend``). Not thread-safe."""

    def __init__(self, backend, *, prefix: Sequence[int], suffix: Sequence[int], turn_prefix: Optional[Sequence[int]],
                 eos_ids: Sequence[int], pinned: Sequence[int] = (), default_threshold: float = 0.5, tokenizer=None,
                 vocab_size: Optional[int] = None):
        if turn_prefix is None:
            raise FirstEdgeError("this bundle's chat template cannot continue a conversation (no chat.ids.turn_prefix "
                                 "in the manifest); rebuild it, or use single-turn generation")
        self.backend = backend
        self.prefix, self.suffix, self.turn_prefix = list(prefix), list(suffix), list(turn_prefix)
        self.eos_ids = [int(e) for e in eos_ids]
        self.pinned = list(pinned)
        self.default_threshold = float(default_threshold)
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        if hasattr(backend, "load_extend"):  # the device backends load the extend graph lazily: load it now
            backend.load_extend()
        self.reset()

    @classmethod
    def from_bundle(cls, bundle, backend, tokenizer=None) -> "Session":
        if bundle.chat_ids("prefix") is None or bundle.chat_ids("suffix") is None:
            raise FirstEdgeError("manifest chat.ids lacks the prefix or suffix token ids; rebuild the bundle")
        return cls(backend, prefix=bundle.chat_ids("prefix"), suffix=bundle.chat_ids("suffix"),
                   turn_prefix=bundle.chat_ids("turn_prefix"), eos_ids=bundle.eos_ids, pinned=bundle.pinned,
                   default_threshold=bundle.default_threshold, tokenizer=tokenizer,
                   vocab_size=int(bundle.model["vocab_size"]))

    def reset(self) -> None:
        """Forget the conversation (the buffers are overwritten by the next turn's prefill)."""
        self.turns: List[Turn] = []
        self.turn_count = 0
        self.exact = 0  # tokens whose K/V every layer holds exactly (the history up to the last turn's prompt)

    @property
    def history(self) -> List[int]:
        """The conversation's tokens whose K/V the cache holds exactly (up to the last turn's prompt)."""
        return self._history(self.turns)

    def _history(self, turns: List[Turn]) -> List[int]:
        out: List[int] = []
        for i, t in enumerate(turns):
            out += (self.prefix if i == 0 else turns[i - 1].reply + self.turn_prefix) + t.user + self.suffix
        return out

    def _user_ids(self, user: Union[str, Sequence[int]]) -> List[int]:
        if isinstance(user, str):
            if self.tokenizer is None:
                raise FirstEdgeError("this session has no tokenizer: pass the user turn as token ids")
            if not user.strip():
                raise FirstEdgeError("the user turn is empty")
            ids = self.tokenizer.encode_text(user)
            if not ids:
                raise FirstEdgeError("the user turn is empty (no tokens)")
            return ids
        ids = [int(i) for i in user]
        if not ids:
            raise FirstEdgeError("the user turn is empty")
        bad = [i for i in ids if i < 0 or (self.vocab_size is not None and i >= self.vocab_size)]
        if bad:
            raise FirstEdgeError(f"token id {bad[0]} is outside the vocabulary"
                                 + (f" (0..{self.vocab_size - 1})" if self.vocab_size else ""))
        return ids

    def chat(self, user: Union[str, Sequence[int]], sampling: Optional[SamplingConfig] = None, *,
             threshold: Optional[float] = None, keep: Optional[int] = None, mask: Optional[np.ndarray] = None,
             on_token: Optional[Callable[[int], None]] = None, trim: bool = False,
             keep_logits: bool = False) -> TurnResult:
        """One turn: the user's message (text, or token ids without template tokens) in, the reply out.

        Generation stops at the end-of-turn / EOS ids; the reply excludes them. When the turn does not fit the
        context, a FirstEdgeError says so, or with ``trim`` the oldest whole turns are dropped (the chat prefix
        stays) and what remains is prefilled again. A refused turn leaves the session as it was."""
        sampling = sampling or SamplingConfig()
        sampling = SamplingConfig(**{**sampling.__dict__, "eos_ids": list(sampling.eos_ids) or self.eos_ids})
        sampling.check()
        u = self._user_ids(user)
        L = int(self.backend.n_layers)
        if mask is not None:  # the options are checked before anything runs: a refused turn touches no cache
            check_mask(mask, L)
        else:
            make_mask(np.zeros(L, np.float32), threshold=threshold, keep=keep, pinned=self.pinned,
                      default_threshold=self.default_threshold)
        C = int(self.backend.max_context)
        turns = list(self.turns)
        if turns:
            new = turns[-1].reply + self.turn_prefix + u + self.suffix
            pool_from = len(turns[-1].reply) + len(self.turn_prefix)
        else:
            new, pool_from = self.prefix + u + self.suffix, 0
        dropped, exact = 0, self.exact
        if exact + len(new) >= C:  # at least one position must be left to generate
            alone = len(self.prefix) + len(u) + len(self.suffix)
            if alone >= C:
                raise FirstEdgeError(f"the user turn needs {alone} tokens with the chat template, more than the "
                                     f"context of {C} tokens leaves to generate")
            if not trim:
                raise FirstEdgeError(f"the conversation is full: this turn needs {exact + len(new) + 1} of {C} context "
                                     f"tokens; reset the session or allow dropping the oldest turns")
            while turns:  # drop the oldest whole turns until the rest and this turn fit
                turns.pop(0)
                dropped += 1
                if turns and len(self._history(turns)) + len(new) < C:
                    break
            if not turns:
                new, pool_from = self.prefix + u + self.suffix, 0
            exact = len(self._history(turns))
        reprefill, reprefill_ms = 0, 0.0
        if dropped and turns:
            # the kept turns' K/V were computed at other positions: prefill them again (outputs unused)
            t0 = time.perf_counter()
            hist = np.asarray(self._history(turns), np.int64)
            self.backend.prefill(hist, self.default_threshold)
            reprefill, reprefill_ms = len(hist), (time.perf_counter() - t0) * 1e3
            self.turns, self.exact = list(turns), exact  # what the cache now holds, whatever happens next
        kwargs = dict(threshold=threshold, keep=keep, mask=mask, pinned=self.pinned, default_threshold=self.default_threshold,
                      on_token=on_token, keep_logits=keep_logits)
        if turns:
            res = generate(self.backend, new, sampling, past_length=exact, pool_from=pool_from, **kwargs)
        else:
            res = generate(self.backend, new, sampling, **kwargs)
        res.prefill_ms += reprefill_ms
        reply = res.reply_tokens(sampling.eos_ids)
        reused = exact if turns else 0
        self.turns = turns + [Turn(u, reply)]
        self.exact = exact + len(new) if turns else len(new)
        self.turn_count += 1
        text = self.tokenizer.decode(reply) if self.tokenizer is not None else None
        return TurnResult(reply_ids=reply, reply=text, result=res, turn=self.turn_count,
                          reused_tokens=reused, prefilled_tokens=len(new) + reprefill, history_tokens=self.exact,
                          dropped_turns=dropped)
