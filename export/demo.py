"""The main job on the embedded default model, end to end.

Steps: load the model (converting the embedded GGUF once), generate with every layer and with a
FiRST mask, and print the stats side by side.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from runtime.errors import cli_main

from .generate import run_generation
from .model import build_first_model

PROMPT = ("Explain in a few short paragraphs how a rainbow forms, why its colors always appear in the same "
          "order, and why the sky is blue.")


@cli_main
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m export.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="task data folder (JSONL, see ../shared/data/README.md)")
    ap.add_argument("--model", help="local HF model folder (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    fm, tok = build_first_model(args.model)
    print(f"\n== reference generator (PyTorch), {fm.name}, {fm.n_layers} layers")
    rows = []
    skip = np.ones(fm.n_layers, bool)
    skip[np.round(np.linspace(1, fm.n_layers - 2, fm.n_layers // 3)).astype(int)] = False
    for label, mask in [("all layers", None), (f"{int((~skip).sum())} layers skipped", skip)]:
        res = run_generation(fm, tok, PROMPT, max_new_tokens=args.max_new_tokens, mask=mask, ignore_eos=True)
        print(f"-- {label}: {tok.decode(res.tokens, skip_special_tokens=True)[:200]!r}")
        print("   " + res.stats_line())
        rows.append(res)
    sp = rows[1].decode_tokens_per_s / rows[0].decode_tokens_per_s
    print(f"\nspeedup of the skip mask over all layers (PyTorch reference): {sp:.2f}x")


if __name__ == "__main__":
    main()
