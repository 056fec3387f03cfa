"""Run ``python -m runtime`` and also print the generated token ids (used by scripts/aarch64.sh).

    python scripts/aarch64_tokens.py --bundle DIR --prompt "..." [any other python -m runtime option]

This is the real CLI (``runtime.__main__.main``, same arguments, same output); it only wraps
``generate`` to keep its result, then prints one extra last line on stdout:

    FIRST_EDGE_TOKENS {"tokens": [...], "machine": "aarch64", "stop_reason": "..."}

Imports no torch, like the runtime: it runs under the emulated aarch64 interpreter as well.
"""
from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's runtime/, installed or not
import runtime.__main__ as cli  # noqa: E402

MARK = "FIRST_EDGE_TOKENS"


def main(argv=None) -> None:
    results = []
    generate = cli.generate

    def keep(*args, **kwargs):
        res = generate(*args, **kwargs)
        results.append(res)
        return res

    cli.generate = keep
    try:
        cli.main(argv)
    finally:
        cli.generate = generate
    if len(results) != 1:
        raise SystemExit(f"expected one generation, got {len(results)}")
    res = results[0]
    sys.stdout.flush()
    print(MARK, json.dumps({"tokens": [int(t) for t in res.tokens], "machine": platform.machine(),
                            "stop_reason": res.stop_reason}), flush=True)


if __name__ == "__main__":
    main()
