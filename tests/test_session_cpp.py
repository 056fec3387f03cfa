"""Chat sessions on the C++ runner (first_edge::Session through `first_edge_run --chat`, issue 12).

On the shared tiny ExecuTorch bundle: a 4-turn script gives the same reply tokens, masks, router scores and
per-turn stats as the Python runtime.Session with EtBackend on the same bundle (explicit budgets and the
routers' threshold); after every turn the C++ session's K/V (dumped with --dump-kv) equals a fresh all-layer
prefill of the conversation (ExecuTorch Python and the PyTorch reference, 1e-4); the context-full error, the
opt-in trimming (also against Python), a refused turn that leaves the session usable, /reset, bad scripts.
The empty-turn error and the rest of the API are in the ctest program (runtime/cpp/tests/test_runner.cpp).
"""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from et_helpers import MAX_CONTEXT, cpp_build, reference, tiny_bundle, workdir

from runtime.bundle import Bundle
from runtime.loop import SamplingConfig

TURNS = [[5, 17, 23, 9], [41, 8, 30], [12, 60, 7, 77], [33]]
LONG = list(range(5, 25))  # 20 tokens: the third such turn does not fit the 64-token context
N_NEW = 5
KV_ATOL = 1e-4


@pytest.fixture(scope="module")
def build_dir():
    return cpp_build(asan=os.environ.get("FIRST_EDGE_ASAN") == "1")


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle("none")


@pytest.fixture(scope="module")
def fresh(bundle):
    """A second ExecuTorch Python program: the fresh all-layer prefill that the session's cache must equal."""
    from runtime.et_backend import EtBackend

    return EtBackend(Bundle(bundle), threads=1)


def chat_cli(build_dir, bundle, turns, *args, script=True, input_text=None):
    """(process, [JSON rows]) of `first_edge_run --chat` over `turns` (lists of ids, or raw lines)."""
    lines = "".join((t if isinstance(t, str) else ",".join(map(str, t))) + "\n" for t in turns)
    cmd = [str(build_dir / "first_edge_run"), "--bundle", str(bundle), "--chat", "--threads", "1",
           "--max-new-tokens", str(N_NEW), *map(str, args)]
    if script:
        path = workdir() / "chat_script.txt"
        path.write_text(lines)
        cmd += ["--script", str(path)]
    p = subprocess.run(cmd, capture_output=True, text=True, input=lines if not script else input_text, timeout=120)
    rows = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    return p, rows


def py_session(bundle):
    from runtime.et_backend import EtBackend
    from runtime.session import Session

    b = Bundle(bundle)
    be = EtBackend(b, threads=1)
    return be, Session.from_bundle(b, be)


def py_turn(session, user, *, keep=None, threshold=None, trim=False, ignore_eos=False):
    r = session.chat(user, SamplingConfig(max_new_tokens=N_NEW, ignore_eos=ignore_eos), keep=keep, threshold=threshold,
                     trim=trim)
    return dict(r.stats(), reply_ids=r.reply_ids, tokens=r.result.tokens, scores=r.result.scores)


STATS = ("turn", "reused_tokens", "prefilled_tokens", "history_tokens", "dropped_turns", "reply_tokens",
         "prompt_tokens", "new_tokens", "layers_kept", "mask", "stop_reason", "reply_ids", "tokens")


def assert_same_turn(c, p, what):
    for k in STATS:
        assert c[k] == p[k], (what, c["turn"], k, c[k], p[k])
    np.testing.assert_allclose(c["scores"], p["scores"], atol=1e-6, err_msg=f"{what} turn {c['turn']} scores")


def kv_check(row, fresh, history):
    """The dumped K/V of a C++ turn against a fresh prefill of `history` (ExecuTorch Python and the PyTorch
    reference); returns the largest differences."""
    import torch

    E = row["history_tokens"]
    assert len(history) == E
    prog = fresh.prog
    L, nkv, hd = prog.n_layers, prog.n_kv, prog.hd
    kv = np.fromfile(row["kv_file"], dtype=np.float32).reshape(L, 2, E, nkv, hd)
    prog.prefill(np.asarray(history, np.int64), 0.5)
    with torch.inference_mode():
        _, _, _, ks, vs = reference().prefill(torch.tensor([history], dtype=torch.int64))
    d_et = d_ref = 0.0
    for l in range(L):
        d_et = max(d_et, float(np.abs(kv[l, 0] - prog.k[l][:E]).max()), float(np.abs(kv[l, 1] - prog.v[l][:E]).max()))
        rk, rv = ks[l].numpy()[0].transpose(1, 0, 2), vs[l].numpy()[0].transpose(1, 0, 2)  # -> [E, n_kv, hd]
        d_ref = max(d_ref, float(np.abs(kv[l, 0] - rk).max()), float(np.abs(kv[l, 1] - rv).max()))
    assert d_et <= KV_ATOL and d_ref <= KV_ATOL, (row["turn"], d_et, d_ref)
    return d_et, d_ref


def test_cpp_session_matches_python_and_its_cache_is_exact(build_dir, bundle, fresh):
    """4 turns with budgets and the routers' threshold: the C++ CLI's replies, masks, scores and stats equal the
    Python Session's on the same bundle; after every turn the C++ cache equals a fresh prefill (1e-4)."""
    masks, worst = set(), [0.0, 0.0]
    for opts in ({"keep": 2}, {"keep": 4}, {}, {"threshold": 0.45}):
        args = [a for k, v in opts.items() for a in (f"--{k}", v)]
        kv_prefix = workdir() / "session_kv"
        p, rows = chat_cli(build_dir, bundle, TURNS, *args, "--dump-kv", kv_prefix)
        assert p.returncode == 0, p.stderr[-2000:]
        assert len(rows) == 4
        _, s = py_session(bundle)
        for user, c in zip(TURNS, rows):
            py = py_turn(s, user, **opts)
            assert_same_turn(c, py, opts)
            d = kv_check(c, fresh, s.history)
            worst = [max(worst[0], d[0]), max(worst[1], d[1])]
            masks.add(c["mask"])
            if c["turn"] > 1:
                assert c["reused_tokens"] > 0 and c["reused_tokens"] + c["prefilled_tokens"] == c["history_tokens"]
    print(f"C++ session K/V vs a fresh prefill: max |diff| {worst[0]:.3g} (ExecuTorch Python), "
          f"{worst[1]:.3g} (PyTorch reference); masks {sorted(masks)}")
    assert len(masks) > 1 and any("0" in m for m in masks), masks


def test_cpp_session_context_full_and_trim(build_dir, bundle, fresh):
    """Three 20-token turns overflow the 64-token context: without --trim the third is refused (exit 2, the first
    two printed); with --trim the oldest turn is dropped, the rest re-prefilled, as in Python, and the cache is
    exact."""
    p, rows = chat_cli(build_dir, bundle, [LONG] * 3, "--ignore-eos")
    assert p.returncode == 2 and len(rows) == 2, (p.returncode, p.stderr[-500:])
    assert "error: the conversation is full: this turn needs" in p.stderr and f"of {MAX_CONTEXT} context" in p.stderr
    turns = [LONG, LONG, LONG, [7, 8], LONG]
    p, rows = chat_cli(build_dir, bundle, turns, "--ignore-eos", "--trim", "--dump-kv", workdir() / "trim_kv")
    assert p.returncode == 0, p.stderr[-2000:]
    _, s = py_session(bundle)
    for user, c in zip(turns, rows):
        assert_same_turn(c, py_turn(s, user, trim=True, ignore_eos=True), "trim")
        kv_check(c, fresh, s.history)
    assert [r["dropped_turns"] for r in rows][:3] == [0, 0, 1] and sum(r["dropped_turns"] for r in rows) >= 2
    assert rows[2]["prefilled_tokens"] > rows[2]["prompt_tokens"]  # the kept turn was prefilled again


def test_cpp_session_refused_turn_leaves_it_usable(build_dir, bundle):
    """Interactive (stdin): a turn longer than the context and a line that is not ids are refused with a one-line
    error and the session goes on; /reset starts over (same first reply); /exit ends."""
    too_long = list(range(5, 5 + MAX_CONTEXT))
    lines = [TURNS[0], too_long, "5,x", TURNS[1], "/reset", TURNS[0], "/exit", TURNS[2]]
    p, rows = chat_cli(build_dir, bundle, lines, script=False)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "error: the user turn needs" in p.stderr and "more than the context" in p.stderr
    assert "error: a user turn must be a comma-separated list of token ids" in p.stderr
    assert "[session reset]" in p.stderr and "Traceback" not in p.stderr
    assert [r["turn"] for r in rows] == [1, 2, 1]
    assert rows[1]["reused_tokens"] == rows[0]["history_tokens"]  # the refused turns changed nothing
    assert rows[2]["reply_ids"] == rows[0]["reply_ids"] and rows[2]["mask"] == rows[0]["mask"]


@pytest.mark.parametrize("args,expect", [
    (["--script", "/nonexistent/turns.txt"], "cannot read the chat script"),
    (["--ids", "1,2"], "either --ids"),
    (["--runs", "3"], "do not go with --chat"),
])
def test_cpp_chat_cli_errors(build_dir, bundle, args, expect):
    p = subprocess.run([str(build_dir / "first_edge_run"), "--bundle", str(bundle), "--chat", *args],
                       capture_output=True, text=True, input="", timeout=60)
    assert p.returncode == 2 and expect in p.stderr, (p.returncode, p.stderr[-500:])


def test_cpp_chat_script_errors(build_dir, bundle):
    p, rows = chat_cli(build_dir, bundle, [TURNS[0], "1,,2"])
    assert p.returncode == 2 and "chat script line '1,,2'" in p.stderr and rows == []  # checked before any turn
    for opt in ("--script", "--trim"):
        q = subprocess.run([str(build_dir / "first_edge_run"), "--bundle", str(bundle), "--ids", "5",
                            *([opt, "x"] if opt == "--script" else [opt])], capture_output=True, text=True)
        assert q.returncode == 2 and "go with --chat" in q.stderr
