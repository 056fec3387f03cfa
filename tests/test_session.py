"""Chat sessions (issue 12): multi-turn generation that reuses the KV cache with a fresh route per turn, on the
PyTorch reference, ONNX Runtime (fused and split decode) and ExecuTorch (Python).

Exactness: after every turn each layer's K/V for the whole conversation so far equals a fresh all-layer
prefill of it, and each greedy reply equals single-shot generation on the full conversation with the same
mask; every runtime's replies equal the reference's. Also: end-of-turn stop, context-full error and opt-in
trimming, reset, bad input, a bundle whose template cannot continue a conversation, and the CLI."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from export.reference import TorchBackend
from helpers import VOCAB
from runtime.bundle import Bundle
from runtime.errors import FirstEdgeError
from runtime.loop import SamplingConfig, generate
from runtime.session import Session

ROOT = Path(__file__).resolve().parents[1]
MAX_CTX = 64
KV_ATOL = 1e-4
# four user turns (token ids of the tiny vocabulary) and the options of each: the routers' threshold mask,
# a budget of 4, an explicit mask, a budget of 2, so masks differ from turn to turn
TURNS = [[5, 17, 23, 9], [41, 8, 30], [12, 60, 7, 77, 19], [33]]
OPTS = [{}, {"keep": 4}, {"mask": np.array([1, 0, 1, 0, 1, 1], bool)}, {"keep": 2}]


@pytest.fixture(scope="module")
def fm(ref_model):
    return ref_model[0]  # the tiny model with the routers of conftest's ONNX bundle (bundle_dir)


def _kv(backend, l: int, E: int):
    """Layer l's first E cached K and V as [1, n_kv, E, hd] numpy, whatever the backend's buffer layout."""
    if hasattr(backend, "prog"):  # ExecuTorch: sequence-major [max_context, n_kv, hd]
        p = backend.prog
        return p.k[l][:E].transpose(1, 0, 2)[None], p.v[l][:E].transpose(1, 0, 2)[None]
    k, v = backend.k[l], backend.v[l]
    k, v = (k.numpy(), v.numpy()) if torch.is_tensor(k) else (k, v)
    return k[:, :, :E], v[:, :, :E]


def _session(backend, fm):
    """A session with one-token template pieces (prefix, suffix) and a two-token turn prefix ending a reply."""
    return Session(backend, prefix=[3], suffix=[4], turn_prefix=[2, 3], eos_ids=[2], pinned=fm.pinned,
                   default_threshold=fm.threshold, vocab_size=fm.vocab_size)


def run_conversation(backend, fm, session, max_new=6):
    """Four turns; after each, the cache against a fresh prefill and the reply against single-shot generation."""
    replies, masks = [], []
    for user, opts in zip(TURNS, OPTS):
        r = session.chat(user, SamplingConfig(max_new_tokens=max_new), **opts)
        hist = session.history
        E = len(hist)
        assert r.history_tokens == E
        with torch.inference_mode():
            _, _, _, ks, vs = fm.prefill(torch.tensor([hist], dtype=torch.int64))
        for l in range(fm.n_layers):
            k, v = _kv(backend, l, E)
            np.testing.assert_allclose(k, ks[l].numpy(), atol=KV_ATOL, err_msg=f"turn {r.turn} layer {l} K")
            np.testing.assert_allclose(v, vs[l].numpy(), atol=KV_ATOL, err_msg=f"turn {r.turn} layer {l} V")
        one = generate(TorchBackend(fm, MAX_CTX), hist, SamplingConfig(max_new_tokens=max_new, eos_ids=session.eos_ids),
                       mask=r.result.mask)
        assert r.reply_ids == one.reply_tokens(session.eos_ids), f"turn {r.turn}"
        if r.turn > 1:
            assert r.reused_tokens > 0 and r.prefilled_tokens == (len(session.turns[-2].reply) + len(session.turn_prefix)
                                                                  + len(user) + len(session.suffix))
        replies.append(r.reply_ids)
        masks.append(r.result.mask.astype(int).tolist())
    assert sum(len(x) for x in replies) > 4
    assert [sum(m) for m in masks[1:]] == [4, 4, 2] and masks[1] != masks[2], masks  # per-turn masks, skipping
    return replies, masks


@pytest.fixture(scope="module")
def reference_conversation(fm, bundle_dir):
    be = TorchBackend(fm, MAX_CTX)
    return run_conversation(be, fm, Session.from_bundle(Bundle(bundle_dir), be))


def test_reference_session_is_exact(reference_conversation):
    replies, masks = reference_conversation
    assert len(replies) == 4


@pytest.mark.parametrize("shape", ["fused", "split"])
def test_onnx_session_is_exact_and_matches_reference(bundle_dir, fm, reference_conversation, shape):
    from runtime.ort_backend import OrtBackend

    bundle = Bundle(bundle_dir)
    # the tiny template's pieces (tests/helpers.py); its word-level tokenizer reads the tags as unknown words
    assert bundle.manifest["chat"]["turn_prefix"] == " </s> <|user|> " and bundle.chat_ids("turn_prefix")[0] == 2
    be = OrtBackend(bundle, threads=2, decode_shape=shape)
    assert run_conversation(be, fm, Session.from_bundle(bundle, be)) == reference_conversation


def test_executorch_session_is_exact_and_matches_reference():
    from et_helpers import reference, tiny_bundle
    from runtime.et_backend import EtBackend

    fm = reference()
    bundle = Bundle(tiny_bundle())
    be = EtBackend(bundle, threads=1)
    ref_be = TorchBackend(fm, MAX_CTX)
    ref = run_conversation(ref_be, fm, Session.from_bundle(bundle, ref_be))
    assert run_conversation(be, fm, Session.from_bundle(bundle, be)) == ref
    assert be.prog.method_calls["extend"] == 3 and be.prog.method_calls["prefill"] == 1


def test_end_of_turn_stop_excludes_the_stop_token(fm):
    be = TorchBackend(fm, MAX_CTX)
    s = _session(be, fm)
    free = s.chat(TURNS[0], SamplingConfig(max_new_tokens=6, ignore_eos=True))
    toks = free.result.tokens
    stop = next(t for t in toks[1:] if t != toks[0])  # a token the reply produces after its first
    s2 = Session(be, prefix=[3], suffix=[4], turn_prefix=[2, 3], eos_ids=[stop], pinned=fm.pinned)
    r = s2.chat(TURNS[0], SamplingConfig(max_new_tokens=6))
    assert r.result.stop_reason == "eos" and stop not in r.reply_ids
    assert r.reply_ids == toks[:toks.index(stop)]
    r2 = s2.chat(TURNS[1], SamplingConfig(max_new_tokens=6))  # the next turn starts with the reply, not the stop
    assert r2.prefilled_tokens == len(r.reply_ids) + 2 + len(TURNS[1]) + 1


def test_context_full_error_and_trimming(fm):
    be = TorchBackend(fm, MAX_CTX)
    s = _session(be, fm)
    long_turn = list(range(5, 25))  # 20 tokens
    cfg = SamplingConfig(max_new_tokens=4, ignore_eos=True)
    s.chat(long_turn, cfg)
    s.chat(long_turn, cfg)
    before = (list(s.history), len(s.turns))
    with pytest.raises(FirstEdgeError, match="the conversation is full: this turn needs .* of 64 context tokens"):
        s.chat(long_turn, cfg)
    assert (s.history, len(s.turns)) == before  # refused: the session is unchanged and usable
    r = s.chat(long_turn, cfg, trim=True)
    assert r.dropped_turns == 1 and r.turn == 3 and len(s.turns) == 2
    hist = s.history
    assert hist[:1] == [3] and len(hist) < MAX_CTX
    with torch.inference_mode():
        _, _, _, ks, _ = fm.prefill(torch.tensor([hist], dtype=torch.int64))
    for l in range(fm.n_layers):
        np.testing.assert_allclose(_kv(be, l, len(hist))[0], ks[l].numpy(), atol=KV_ATOL)
    one = generate(TorchBackend(fm, MAX_CTX), hist, cfg, mask=r.result.mask)
    assert r.reply_ids == one.reply_tokens([2])
    with pytest.raises(FirstEdgeError, match="the user turn needs 66 tokens with the chat template, more than the context"):
        s.chat(list(range(5, 69)), cfg, trim=True)
    # bad options are refused before anything runs, also when the turn would trim (the cache is untouched)
    kv0 = [_kv(be, l, len(hist))[0].copy() for l in range(fm.n_layers)]
    for bad, match in (({"keep": 99}, "keep"), ({"mask": np.ones(3, bool)}, "layer mask has length 3"),
                       ({"threshold": 0.5, "keep": 2}, "not both")):
        with pytest.raises(FirstEdgeError, match=match):
            s.chat(long_turn, cfg, trim=True, **bad)
        assert s.history == hist and all(np.array_equal(_kv(be, l, len(hist))[0], kv0[l])
                                         for l in range(fm.n_layers))
    assert s.chat([7, 8], cfg).turn == 4  # still usable


def test_reset_and_bad_input(fm):
    be = TorchBackend(fm, MAX_CTX)
    s = _session(be, fm)
    first = s.chat(TURNS[0], SamplingConfig(max_new_tokens=5)).reply_ids
    s.chat(TURNS[1], SamplingConfig(max_new_tokens=5))
    s.reset()
    assert s.history == [] and s.chat(TURNS[0], SamplingConfig(max_new_tokens=5)).reply_ids == first
    for bad, match in (([], "the user turn is empty"), ("hello", "no tokenizer"), ([VOCAB + 3], f"token id {VOCAB + 3} is outside the vocabulary")):
        n = len(s.history)
        with pytest.raises(FirstEdgeError, match=match):
            s.chat(bad, SamplingConfig(max_new_tokens=5))
        assert len(s.history) == n
    assert s.chat(TURNS[1], SamplingConfig(max_new_tokens=5)).turn == 2


def test_template_without_turn_prefix_is_refused(fm):
    with pytest.raises(FirstEdgeError, match="cannot continue a conversation"):
        Session(TorchBackend(fm, MAX_CTX), prefix=[3], suffix=[4], turn_prefix=None, eos_ids=[2])


def _cli(args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "runtime"] + args, capture_output=True, text=True, env=env,
                          cwd=str(ROOT), timeout=120, **kw)


def test_cli_chat_script(bundle_dir, tmp_path):
    script = tmp_path / "turns.txt"
    script.write_text("w5 w6 w7\n\nw8 w9\nw10 w11 w12 w13\n")
    p = _cli(["--bundle", str(bundle_dir), "--chat", "--script", str(script), "--max-new-tokens", "4", "--json"])
    assert p.returncode == 0, p.stderr
    rows = [json.loads(x) for x in p.stdout.strip().splitlines()]
    assert [r["turn"] for r in rows] == [1, 2, 3]
    assert rows[0]["reused_tokens"] == 0 and 0 < rows[1]["reused_tokens"] < rows[2]["reused_tokens"]
    assert all(r["reply_tokens"] == len(r["reply_ids"]) for r in rows)
    p = _cli(["--bundle", str(bundle_dir), "--chat", "--script", str(script), "--max-new-tokens", "4"])
    assert p.returncode == 0 and p.stderr.count("reused") == 3 and "turn 3 | reused" in p.stderr, p.stderr
    p = _cli(["--bundle", str(bundle_dir), "--chat", "--script", str(tmp_path / "missing.txt")])
    assert p.returncode == 2 and "cannot read the chat script" in p.stderr and "Traceback" not in p.stderr
    p = _cli(["--bundle", str(bundle_dir), "--prompt", "w5", "--script", str(script)])
    assert p.returncode == 2 and "--script and --trim go with --chat" in p.stderr
    p = _cli(["--bundle", str(bundle_dir), "--chat"], input="w5 w6\n/reset\nw7\n/exit\n")
    assert p.returncode == 0 and p.stderr.count("turn 1 |") == 2 and "[session reset]" in p.stderr, p.stderr
