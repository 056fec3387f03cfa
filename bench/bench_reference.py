"""Decode speed of the PyTorch reference generator: all layers vs. a mask that skips layers.

    python bench/bench_reference.py [--model DIR] [--threads 2] [--skip 10]

Prints a table (median of 3 timed runs after a warm-up, 128 greedy tokens, EOS ignored).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import N_NEW, USER_MSG, median_runs, peak_rss_mb, table  # noqa: E402
from export.chat import encode_prompt  # noqa: E402
from export.reference import TorchBackend  # noqa: E402
from export.model import build_first_model  # noqa: E402
from runtime.loop import SamplingConfig, generate  # noqa: E402
from runtime.masks import mask_str  # noqa: E402


def evenly_spaced_skip(n_layers: int, n_skip: int) -> np.ndarray:
    """Skip n_skip layers spread over the middle (first and last layer kept)."""
    mask = np.ones(n_layers, bool)
    idx = np.round(np.linspace(1, n_layers - 2, n_skip)).astype(int)
    mask[idx] = False
    return mask


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fm, tok = build_first_model(args.model, verbose=False)
    ids = encode_prompt(tok, USER_MSG)
    cfg = SamplingConfig(max_new_tokens=N_NEW, ignore_eos=True)
    rows = []
    for label, mask in [("all layers", np.ones(fm.n_layers, bool)),
                        (f"{args.skip} of {fm.n_layers} skipped", evenly_spaced_skip(fm.n_layers, args.skip))]:
        be = TorchBackend(fm, max_context=1024)
        pre, dec, res, all_dec = median_runs(lambda: generate(be, ids, cfg, mask=mask))
        rows.append({"generator": "PyTorch reference", "mask": label, "kept": int(mask.sum()),
                     "prefill ms": f"{pre:.1f}", "decode tok/s": f"{dec:.2f}",
                     "runs": " ".join(f"{d:.1f}" for d in all_dec), "mask bits": mask_str(mask)})
    ideal = fm.n_layers / (fm.n_layers - args.skip)
    print(f"model {fm.name}, prompt {len(ids)} tokens, {N_NEW} new tokens, {args.threads} threads, "
          f"peak RSS {peak_rss_mb():.0f} MB")
    print(table(rows, ["generator", "mask", "kept", "prefill ms", "decode tok/s", "runs", "mask bits"]))
    sp = float(rows[1]["decode tok/s"]) / float(rows[0]["decode tok/s"])
    print(f"speedup {sp:.2f}x (layer-count ideal {ideal:.2f}x; embedding/LM head and Python overhead not skipped)")


if __name__ == "__main__":
    main()
