"""The PyTorch reference backend: one KV buffer per layer, decode runs only the kept layers.

This is the ground truth every exported graph and device runtime is tested against. It plugs
into the same generation loop as the device backends (``runtime.loop``); ``export.generate`` is
its command line.
"""
from __future__ import annotations

from collections import Counter
from typing import Optional

import numpy as np
import torch

from runtime.loop import GenerationResult, SamplingConfig, generate

from .chat import encode_prompt
from .model import FirstModel


def eos_ids(tokenizer, hf_config) -> list:
    """The ids that end a reply: the config's and the tokenizer's EOS and the known end-of-turn tokens."""
    ids = set()
    for src in (getattr(hf_config, "eos_token_id", None), tokenizer.eos_token_id):
        if src is None:
            continue
        ids.update(src if isinstance(src, (list, tuple)) else [src])
    gc = getattr(tokenizer, "added_tokens_encoder", {}) or {}
    for t in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "</s>"):
        if t in gc:
            ids.add(gc[t])
    return sorted(int(i) for i in ids)


class TorchBackend:
    """PyTorch backend of the generation loop, with per-layer KV buffers allocated once."""

    def __init__(self, fm: FirstModel, max_context: Optional[int] = None):
        self.fm = fm
        self.n_layers = fm.n_layers
        mpe = getattr(fm.cfg, "max_position_embeddings", 2048) or 2048
        self.max_context = int(max_context or min(mpe, 2048))
        shape = (1, fm.n_kv_heads, self.max_context, fm.head_dim)
        self.device = fm.inv_freq.device  # the model's device (CPU here; CUDA for a GPU evaluation)
        self.k = [torch.zeros(shape, device=self.device) for _ in range(self.n_layers)]
        self.v = [torch.zeros(shape, device=self.device) for _ in range(self.n_layers)]
        self.lengths = [0] * self.n_layers
        self.layer_calls = Counter()  # decode-time layer executions, for tests and stats
        self._mask_key = None
        self._kept = []

    @torch.inference_mode()
    def prefill(self, input_ids: np.ndarray, threshold: float):
        ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64)).view(1, -1).to(self.device)
        T = ids.shape[1]
        logits, g, mask, ks, vs = self.fm.prefill(ids, threshold)
        for l in range(self.n_layers):
            self.k[l][:, :, :T] = ks[l]
            self.v[l][:, :, :T] = vs[l]
            self.lengths[l] = T
        self.layer_calls.clear()
        return logits[0].cpu().numpy(), g.cpu().numpy(), mask.cpu().numpy()

    @torch.inference_mode()
    def extend(self, input_ids: np.ndarray, past_length: int):
        """A session's next turn: T new tokens at positions past_length.. through every layer, written into
        every layer's buffer at past_length (what any layer held there is overwritten); returns the last
        position's logits [V] and the new tokens' router probabilities [L, T]."""
        ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64)).view(1, -1).to(self.device)
        T, S = ids.shape[1], int(past_length)
        fm = self.fm
        cos, sin = fm.rope(torch.arange(S, S + T, dtype=torch.int64, device=self.device).view(1, -1))
        h = fm.embed(ids)
        probs = []
        for l in range(self.n_layers):
            probs.append(fm.router_probs(l, h)[0])
            h, _, _ = fm.layer(l, h, cos, sin, cache=(self.k[l], self.v[l], S))
            self.lengths[l] = S + T
        self.layer_calls.clear()
        return fm.head(h[:, -1:])[0, 0].cpu().numpy(), torch.stack(probs).cpu().numpy()

    @torch.inference_mode()
    def decode(self, token: int, position: int, mask: np.ndarray) -> np.ndarray:
        key = mask.tobytes()
        if key != self._mask_key:  # once per generation, not per token
            self._mask_key, self._kept = key, [int(i) for i in np.flatnonzero(mask)]
        fm = self.fm
        h = fm.embed(torch.tensor([[token]], dtype=torch.int64, device=self.device))
        cos, sin = fm.rope(torch.tensor([[position]], dtype=torch.int64, device=self.device))
        for l in self._kept:
            n = self.lengths[l]
            h, _, _ = fm.layer(l, h, cos, sin, cache=(self.k[l], self.v[l], n))
            self.lengths[l] = n + 1
            self.layer_calls[l] += 1
        return fm.head(h)[0, 0].cpu().numpy()


def run_generation(fm: FirstModel, tokenizer, prompt: str, *, max_new_tokens=64, temperature=0.0, top_p=1.0,
                   seed=None, threshold=None, keep=None, mask=None, on_token=None, chat=True,
                   max_context=None, ignore_eos=False, backend: Optional[TorchBackend] = None) -> GenerationResult:
    ids = encode_prompt(tokenizer, prompt, chat=chat)
    be = backend or TorchBackend(fm, max_context=max_context)
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                         eos_ids=eos_ids(tokenizer, fm.cfg), ignore_eos=ignore_eos)
    return generate(be, ids, cfg, threshold=threshold, keep=keep, pinned=fm.pinned, mask=mask,
                    default_threshold=fm.threshold, on_token=on_token)
