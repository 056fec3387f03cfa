"""Run a FiRST-Edge bundle on the device.

    python -m runtime --bundle dist/NAME --prompt "..." [--threshold T | --keep K] [--max-new-tokens N] [--stream]

Imports no torch: numpy, tokenizers and the bundle's runtime (onnxruntime or executorch) only.
"""
from __future__ import annotations

import argparse
import json
import sys

from .backends import load_backend
from .bundle import Bundle
from .errors import cli_main
from .loop import SamplingConfig, add_generation_args, generate
from .masks import parse_mask
from .tokenizer import BundleTokenizer


@cli_main
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m runtime", description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True, help="bundle folder written by python -m export.build")
    add_generation_args(ap)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend-opt", action="append", default=[], metavar="KEY=VALUE",
                    help="backend-specific option (e.g. decode_shape=split for ONNX bundles)")
    args = ap.parse_args(argv)

    bundle = Bundle(args.bundle)
    tok = BundleTokenizer(bundle)
    opts = dict(o.split("=", 1) for o in args.backend_opt)
    backend = load_backend(bundle, threads=args.threads, **opts)
    ids = tok.encode_prompt(args.prompt)
    mask = parse_mask(args.mask, bundle.n_layers) if args.mask else None
    out = []

    def stream(t):
        out.append(t)
        sys.stdout.write(tok.decode(out[-1:]))
        sys.stdout.flush()

    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                         seed=args.seed, eos_ids=bundle.eos_ids, ignore_eos=args.ignore_eos)
    res = generate(backend, ids, cfg, threshold=args.threshold, keep=args.keep, mask=mask, pinned=bundle.pinned,
                   default_threshold=bundle.default_threshold, on_token=stream if args.stream else None)
    if args.stream:
        print()
    else:
        print(tok.decode(res.tokens))
    stats = dict(res.stats(), runtime=bundle.manifest["runtime"], bundle=str(bundle.path))
    if args.json:
        print(json.dumps(stats))
    else:
        print(res.stats_line(), file=sys.stderr)


if __name__ == "__main__":
    main()
