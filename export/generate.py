"""Reference generator (PyTorch) on the command line: ``export.reference`` with a prompt.

The backend (``export.reference.TorchBackend``) is the ground truth every exported graph and device
runtime is tested against; this module only parses the options and prints the reply.

    python -m export.generate --prompt "..." [--model DIR] [--routers PATH] [--threshold T | --keep K]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from runtime.errors import cli_main
from runtime.loop import add_generation_args
from runtime.masks import parse_mask

from .model import build_first_model
from .reference import run_generation


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
