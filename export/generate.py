"""Reference generator (PyTorch): one KV buffer per layer, decode runs only the kept layers.

This is the ground truth every exported graph and device runtime is tested against. It plugs
into the same generation loop as the device backends (``runtime.loop``).

    python -m export.generate --prompt "..." [--model DIR] [--routers PATH] [--threshold T | --keep K]
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Optional

import numpy as np
import torch

from runtime.errors import FirstEdgeError, cli_main
from runtime.loop import GenerationResult, SamplingConfig, add_generation_args, generate
from runtime.masks import parse_mask

from .chat import encode_prompt
from .model import FirstModel, build_first_model


def eos_ids(tokenizer, hf_config) -> list:
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
        self.k = [torch.zeros(shape) for _ in range(self.n_layers)]
        self.v = [torch.zeros(shape) for _ in range(self.n_layers)]
        self.lengths = [0] * self.n_layers
        self.layer_calls = Counter()  # decode-time layer executions, for tests and stats
        self._mask_key = None
        self._kept = []

    @torch.inference_mode()
    def prefill(self, input_ids: np.ndarray, threshold: float):
        ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64)).view(1, -1)
        T = ids.shape[1]
        logits, g, mask, ks, vs = self.fm.prefill(ids, threshold)
        for l in range(self.n_layers):
            self.k[l][:, :, :T] = ks[l]
            self.v[l][:, :, :T] = vs[l]
            self.lengths[l] = T
        self.layer_calls.clear()
        return logits[0].numpy(), g.numpy(), mask.numpy()

    @torch.inference_mode()
    def decode(self, token: int, position: int, mask: np.ndarray) -> np.ndarray:
        key = mask.tobytes()
        if key != self._mask_key:  # once per generation, not per token
            self._mask_key, self._kept = key, [int(i) for i in np.flatnonzero(mask)]
        fm = self.fm
        h = fm.embed(torch.tensor([[token]], dtype=torch.int64))
        cos, sin = fm.rope(torch.tensor([[position]], dtype=torch.int64))
        for l in self._kept:
            n = self.lengths[l]
            h, _, _ = fm.layer(l, h, cos, sin, cache=(self.k[l], self.v[l], n))
            self.lengths[l] = n + 1
            self.layer_calls[l] += 1
        return fm.head(h)[0, 0].numpy()


def run_generation(fm: FirstModel, tokenizer, prompt: str, *, max_new_tokens=64, temperature=0.0, top_p=1.0,
                   seed=None, threshold=None, keep=None, mask=None, on_token=None, chat=True,
                   max_context=None, ignore_eos=False, backend: Optional[TorchBackend] = None) -> GenerationResult:
    ids = encode_prompt(tokenizer, prompt, chat=chat)
    be = backend or TorchBackend(fm, max_context=max_context)
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                         eos_ids=eos_ids(tokenizer, fm.cfg), ignore_eos=ignore_eos)
    return generate(be, ids, cfg, threshold=threshold, keep=keep, pinned=fm.pinned, mask=mask,
                    default_threshold=fm.threshold, on_token=on_token)


@cli_main
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m export.generate", description=__doc__.split("\n\n")[0])
    add_generation_args(ap)
    ap.add_argument("--model", help="local Hugging Face model folder (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--routers", help="router checkpoint folder (routers.json + routers.safetensors)")
    ap.add_argument("--max-context", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    fm, tok = build_first_model(args.model, args.routers)
    mask = parse_mask(args.mask, fm.n_layers) if args.mask else None
    printed = []

    def stream(t):
        printed.append(t)
        sys.stdout.write(tok.decode(printed[-1:], skip_special_tokens=True))
        sys.stdout.flush()

    res = run_generation(fm, tok, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_p=args.top_p, seed=args.seed, threshold=args.threshold, keep=args.keep, mask=mask,
                         on_token=stream if args.stream else None, max_context=args.max_context,
                         ignore_eos=args.ignore_eos)
    if args.stream:
        print()
    else:
        print(tok.decode(res.tokens, skip_special_tokens=True))
    print(json.dumps(res.stats()) if args.json else res.stats_line(), file=sys.stderr if not args.json else sys.stdout)


if __name__ == "__main__":
    main()
