"""Run a FiRST-Edge bundle on the device.

    python -m runtime --bundle dist/NAME --prompt "..." [--threshold T | --keep K] [--max-new-tokens N] [--stream]
    python -m runtime --bundle dist/NAME --chat [--script FILE] [--trim] [...]   (multi-turn chat, KV cache reused)

Imports no torch: numpy, tokenizers and the bundle's runtime (onnxruntime or executorch) only.
"""
from __future__ import annotations

import argparse
import json
import sys

from .backends import load_backend
from .bundle import Bundle
from .errors import FirstEdgeError, cli_main
from .loop import SamplingConfig, add_generation_args, generate
from .masks import parse_mask
from .tokenizer import BundleTokenizer


def _turns(script):
    """User turns: the script's non-empty lines, or lines typed at a prompt (readline editing) until EOF."""
    if script is not None:
        try:
            with open(script, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise FirstEdgeError(f"cannot read the chat script {script}: {e}") from None
        yield from (ln for ln in lines if ln.strip())
        return
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip():
            yield line


def chat(args, bundle, backend, tok, sampling, mask) -> None:
    from .session import Session

    session = Session.from_bundle(bundle, backend, tok)
    interactive = args.script is None
    for line in _turns(args.script):
        if line.strip() == "/reset":
            session.reset()
            print("[session reset]", file=sys.stderr)
            continue
        if not args.json:
            sys.stdout.write("bot> " if interactive else "")
        out = []

        def stream(t):
            out.append(t)
            if t not in sampling.eos_ids:
                sys.stdout.write(tok.decode([t]))
                sys.stdout.flush()

        try:
            r = session.chat(line, sampling, threshold=args.threshold, keep=args.keep, mask=mask, trim=args.trim,
                             on_token=None if args.json else stream)
        except FirstEdgeError as e:
            if not interactive:
                raise
            print(f"\nerror: {e}", file=sys.stderr)  # the session is unchanged: the user may go on
            continue
        if args.json:
            print(json.dumps(dict(r.stats(), reply=r.reply, reply_ids=r.reply_ids)))
        else:
            print()
            print(r.stats_line(), file=sys.stderr)


@cli_main
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m runtime", description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True, help="bundle folder written by python -m export.build")
    add_generation_args(ap, prompt_required=False)
    ap.add_argument("--chat", action="store_true", help="multi-turn chat: type user turns (or --script FILE); the "
                    "KV cache is reused across turns and the routers decide each turn's mask")
    ap.add_argument("--script", help="with --chat: one user turn per non-empty line of FILE (non-interactive)")
    ap.add_argument("--trim", action="store_true", help="with --chat: when a turn does not fit the context, drop "
                    "the oldest whole turns (else the turn is refused)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--trusted-key", metavar="FILE", help="refuse the bundle unless its manifest.sig verifies with "
                    "this key file (python -m export.build --sign-key); default: the file named by "
                    "FIRST_EDGE_TRUSTED_KEY, if set")
    ap.add_argument("--backend-opt", action="append", default=[], metavar="KEY=VALUE",
                    help="backend-specific option (e.g. decode_shape=split for ONNX bundles)")
    args = ap.parse_args(argv)
    if args.chat == (args.prompt is not None):
        raise FirstEdgeError("give either --prompt (one reply) or --chat (a conversation)")
    if (args.script or args.trim) and not args.chat:
        raise FirstEdgeError("--script and --trim go with --chat")

    bundle = Bundle(args.bundle, trusted_key=args.trusted_key)
    tok = BundleTokenizer(bundle)
    opts = dict(o.split("=", 1) for o in args.backend_opt)
    backend = load_backend(bundle, threads=args.threads, **opts)
    mask = parse_mask(args.mask, bundle.n_layers) if args.mask else None
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                         seed=args.seed, eos_ids=bundle.eos_ids, ignore_eos=args.ignore_eos)
    if args.chat:
        return chat(args, bundle, backend, tok, cfg, mask)
    ids = tok.encode_prompt(args.prompt)
    out = []

    def stream(t):
        out.append(t)
        sys.stdout.write(tok.decode(out[-1:]))
        sys.stdout.flush()

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
