#!/usr/bin/env python
"""Where the int4 loss comes from (issue 15, deliverable 3): KL(fp32 || variant) of the default model when only some
weights are 4-bit, in PyTorch with fake-quantized weights (each weight replaced by ONNX Runtime's rtn kernel output,
``export.quantize_onnx.quantize_rtn``, dequantized; block 32; the tied embedding and LM head quantized separately,
as in a bundle; activations stay float32).

    python bench/quant_sensitivity.py [--data ../shared/data] [--per-task 2] [--set kinds|combos]

Records: ``--per-task`` val records a task (``spread_sample``, seed 0), chat prompt (at most 160 tokens) + reference
completion (at most 32 tokens), teacher-forced; KL in nats per token over the completion positions (each record's
mean, then the mean over records). ``--set kinds``: every kind of weight at 8 bits in turn (the rest 4-bit), first /
last two layers at 8 bits, all 8-bit, and groups of five layers as the only 4-bit weights (the rest fp32);
``--set combos``: block 16 and combinations of 8-bit kinds.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KINDS = ("q", "k", "v", "o", "gate", "up", "down")


def main():
    import torch

    from export.data import Encoder, end_of_turn_id, load_split
    from export.importance import spread_sample
    from export.model import build_first_model
    from export.quantize_onnx import quantize_rtn

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=os.environ.get("FIRST_EDGE_DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--per-task", type=int, default=2)
    ap.add_argument("--set", choices=("kinds", "combos"), default="kinds")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fm, tok = build_first_model(None, verbose=False)
    L = fm.n_layers
    enc = Encoder(tok, end_of_turn_id(tok, fm.cfg), max_prompt_tokens=160, max_completion_tokens=32)
    seqs = []
    for task, recs in load_split(args.data, "val").items():
        for r in spread_sample(recs, args.per_task, seed=0):
            e = enc(r)
            seqs.append((np.asarray(e.prompt_ids + e.completion_ids, np.int64), len(e.prompt_ids)))
    print(f"{len(seqs)} records, {sum(len(s[0]) for s in seqs)} tokens", file=sys.stderr)

    def mod(l, kind):
        lay = fm.layers[l]
        return {"q": lay.self_attn.q_proj, "k": lay.self_attn.k_proj, "v": lay.self_attn.v_proj,
                "o": lay.self_attn.o_proj, "gate": lay.mlp.gate_proj, "up": lay.mlp.up_proj,
                "down": lay.mlp.down_proj}[kind]

    E = fm.base.embed_tokens.weight.detach().clone()
    orig = {(l, k): mod(l, k).weight.detach().clone() for l in range(L) for k in KINDS}
    orig["embed"], orig["head"] = E, E
    deq = {}  # (key, 4 | 8 | 16) -> dequantized weight; 16 = 4-bit with block 16
    for key, w in orig.items():
        wn = w.numpy()
        for bits in (4, 8):
            deq[(key, bits)] = torch.from_numpy(quantize_rtn(wn, bits, 32).dequantize(wn.shape[1], bits))
        if args.set == "combos":
            deq[(key, 16)] = torch.from_numpy(quantize_rtn(wn, 4, 16).dequantize(wn.shape[1], 4))
    cache = {}  # (record, layer) -> fp32 hidden state entering that layer

    def forward(prec, start=0):
        """prec(key) -> 4 | 8 | 16 | 32 (fp32); log-softmax over the completion positions. ``start``: begin at that
        layer from the cached fp32 hidden states (every earlier weight must be fp32)."""
        for l in range(L):
            for k in KINDS:
                p = prec((l, k))
                mod(l, k).weight.data = orig[(l, k)] if p == 32 else deq[((l, k), p)]
        We = E if prec("embed") == 32 else deq[("embed", prec("embed"))]
        Wh = E if prec("head") == 32 else deq[("head", prec("head"))]
        out = []
        with torch.inference_mode():
            for si, (ids, n_prompt) in enumerate(seqs):
                t = torch.from_numpy(ids).view(1, -1)
                cos, sin = fm.rope(torch.arange(t.shape[1]).view(1, -1))
                h = torch.nn.functional.embedding(t, We) if start == 0 else cache[(si, start)]
                for l in range(start, L):
                    cache.setdefault((si, l), h) if not ref_done else None
                    h = fm.layer(l, h, cos, sin)[0]
                lg = fm.base.norm(h)[0, n_prompt - 1:-1] @ Wh.T
                out.append(torch.log_softmax(lg.double(), -1))
        return out

    ref_done = False
    ref = forward(lambda k: 32)
    ref_done = True

    def kind_of(key):
        return key if isinstance(key, str) else key[1]

    def layer_of(key):
        return None if isinstance(key, str) else key[0]

    def run(name, prec, start=0):
        t = time.time()
        got = forward(prec, start)
        kl = float(np.mean([float((r.exp() * (r - g)).sum(-1).mean()) for r, g in zip(ref, got)]))
        print(f"{name:40s} KL {kl:.4f}  ({time.time() - t:.0f}s)", flush=True)

    Q = lambda k: kind_of(k) in ("q", "k", "v")  # noqa: E731
    D = lambda k: kind_of(k) == "down"  # noqa: E731
    if args.set == "kinds":
        run("all4", lambda k: 4)
        run("head8", lambda k: 8 if k == "head" else 4)
        run("down8", lambda k: 8 if D(k) else 4)
        run("embed8", lambda k: 8 if k == "embed" else 4)
        run("qkv8", lambda k: 8 if Q(k) else 4)
        run("gate_up8", lambda k: 8 if kind_of(k) in ("gate", "up") else 4)
        run("o8", lambda k: 8 if kind_of(k) == "o" else 4)
        run("layers0-1_8", lambda k: 8 if layer_of(k) in (0, 1) else 4)
        run(f"layers{L - 2}-{L - 1}_8", lambda k: 8 if layer_of(k) in (L - 2, L - 1) else 4)
        run("all8", lambda k: 8)
        for l0 in range(0, L, 5):
            run(f"only_layers{l0}-{l0 + 4}_4",
                lambda k, l0=l0: 4 if layer_of(k) is not None and l0 <= layer_of(k) < l0 + 5 else 32, start=l0)
    else:
        run("block16_all4", lambda k: 16)
        run("qkv8+down8", lambda k: 8 if Q(k) or D(k) else 4)
        run("qkv8+head8", lambda k: 8 if Q(k) or k == "head" else 4)
        run("qkv8+down8+head8", lambda k: 8 if Q(k) or D(k) or k == "head" else 4)
        run("qkv8+down8_first+last8",
            lambda k: 8 if Q(k) or (D(k) and (layer_of(k) < 4 or layer_of(k) >= L - 4)) else 4)


if __name__ == "__main__":
    main()
