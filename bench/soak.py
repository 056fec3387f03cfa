"""Soak: many generations in one process keep memory flat (docs/reliability.md).

    python bench/soak.py --bundle dist/NAME [--runtime py|cpp] [--generations 200] [--tokens 16]

Python runtimes (ONNX Runtime or ExecuTorch, whichever the bundle names): one backend, ``--generations``
generations of ``--tokens`` tokens on prompts that vary in length, the process's resident memory (RSS)
after each; reported: the peak over the first 20 and over all, and whether the whole run stays within
5% of the first 20. C++ runner (ExecuTorch bundles): ``first_edge_run --runs N`` with N = 20 and N =
``--generations``, each under ``/usr/bin/time -v``; the two peak RSS values are compared the same way.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtime.errors import FirstEdgeError, cli_main  # noqa: E402

LIMIT = 1.05


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def soak_python(bundle_dir: str, generations: int, tokens: int, threads: int) -> dict:
    from runtime.backends import load_backend
    from runtime.bundle import Bundle
    from runtime.loop import SamplingConfig, generate
    from runtime.tokenizer import BundleTokenizer

    bundle = Bundle(bundle_dir)
    be = load_backend(bundle, threads=threads)
    tok = BundleTokenizer(bundle)
    words = "Explain in one sentence why the sky is blue and what a rainbow is made of".split()
    cfg = SamplingConfig(max_new_tokens=tokens, ignore_eos=True)
    rss = []
    for i in range(generations):
        ids = tok.encode_prompt(" ".join(words[: 3 + i % (len(words) - 3)]))
        generate(be, ids, cfg, pinned=bundle.pinned, default_threshold=bundle.default_threshold)
        rss.append(rss_mb())
    return {"runtime": bundle.manifest["runtime"] + " (Python)", "first20_peak_mb": max(rss[:20]),
            "all_peak_mb": max(rss), "last_mb": rss[-1], "generations": generations}


def _peak_cpp(exe: Path, bundle_dir: str, runs: int, tokens: int, threads: int) -> float:
    cmd = ["/usr/bin/time", "-v", str(exe), "--bundle", bundle_dir, "--ids", "1,2,3,4,5,6,7,8", "--max-new-tokens",
           str(tokens), "--ignore-eos", "--threads", str(threads), "--runs", str(runs), "--warmup", "0"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise FirstEdgeError(f"first_edge_run failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)
    return int(m.group(1)) / 1024


def soak_cpp(bundle_dir: str, generations: int, tokens: int, threads: int) -> dict:
    from tools.cpp_build import cpp_build

    exe = cpp_build() / "first_edge_run"
    first = _peak_cpp(exe, bundle_dir, 20, tokens, threads)
    every = _peak_cpp(exe, bundle_dir, generations, tokens, threads)
    return {"runtime": "executorch (C++)", "first20_peak_mb": first, "all_peak_mb": every, "last_mb": None,
            "generations": generations}


@cli_main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--runtime", choices=["py", "cpp"], default="py")
    ap.add_argument("--generations", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="append the result as one JSON line to this file")
    args = ap.parse_args(argv)
    if args.generations < 20:
        raise FirstEdgeError("--generations must be at least 20 (the first 20 are the reference)")
    fn = soak_python if args.runtime == "py" else soak_cpp
    res = fn(args.bundle, args.generations, args.tokens, args.threads)
    res["within_5_percent"] = res["all_peak_mb"] <= LIMIT * res["first20_peak_mb"]
    print(f"{res['runtime']}: peak RSS {res['first20_peak_mb']:.1f} MB over the first 20 generations, "
          f"{res['all_peak_mb']:.1f} MB over {res['generations']} "
          f"({res['all_peak_mb'] / res['first20_peak_mb'] - 1:+.1%}; within 5%: {res['within_5_percent']})")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(res) + "\n")
    return 0 if res["within_5_percent"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
