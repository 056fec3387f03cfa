"""The main command's speed table (export/demo.py, issue 15 deliverable 5): every-layer and FiRST runs
interleaved (ABAB, medians of the pairs), and the printed reply stops at the end-of-turn token while the
timing covers the fixed token count."""
import itertools

import pytest

from export import demo
from runtime.bundle import Bundle
from runtime.errors import FirstEdgeError


class _Clock:
    """A fake machine whose load changes over time: run k of either configuration is slowed by load[k]."""

    def __init__(self, load):
        self.load = iter(load)
        self.calls = []

    def runner(self, name, base):
        def run():
            self.calls.append(name)
            return base / next(self.load)
        return run


def test_interleaved_runs_abab_and_takes_medians():
    c = _Clock(itertools.repeat(1.0))
    r = demo.interleaved(c.runner("A", 10.0), c.runner("B", 15.0), speed=lambda x: x, pairs=5, warmup=1)
    assert c.calls == ["A", "B"] * 6  # one untimed warm-up pair, then 5 timed pairs, alternating
    assert r["speeds_a"] == [10.0] * 5 and r["speeds_b"] == [15.0] * 5
    assert r["a"] == 10.0 and r["b"] == 15.0 and r["ratio"] == pytest.approx(1.5)
    assert len(r["results_a"]) == len(r["results_b"]) == 5


def test_interleaving_survives_load_that_would_invert_a_sequential_measurement():
    # B (the FiRST mask) is 1.3x faster than A (every layer). Load arrives after the first few runs and
    # stays: run A five times then B five times and B lands in the loaded half and looks slower.
    load = [1.0] * 6 + [3.0] * 100
    seq = _Clock(load)
    a = [seq.runner("A", 10.0)() for _ in range(5)]
    b = [seq.runner("B", 13.0)() for _ in range(5)]
    assert sorted(b)[2] < sorted(a)[2]  # the sequential medians invert the speedup
    # interleaved (with a warm-up pair eating two of the unloaded runs, as in the demo), each pair sees the
    # same load, so the per-pair ratio is the true 1.3x and B's median stays above A's
    c = _Clock(load)
    r = demo.interleaved(c.runner("A", 10.0), c.runner("B", 13.0), speed=lambda x: x, pairs=5)
    assert r["ratio"] == pytest.approx(1.3)
    assert r["b"] > r["a"]
    # a noisy spike on single runs moves a median of 5 pairs' ratios by nothing
    spikes = [1.0, 1.0, 4.0, 1.0, 1.0, 1.0, 1.0, 5.0, 1.0, 1.0, 1.0, 1.0]
    r = demo.interleaved(_Clock(spikes).runner("A", 10.0), _Clock(spikes[1:] + [1.0]).runner("B", 13.0),
                         speed=lambda x: x, pairs=5)
    assert r["ratio"] == pytest.approx(1.3)


def test_interleaved_needs_a_pair():
    with pytest.raises(FirstEdgeError, match="pairs must be at least 1"):
        demo.interleaved(lambda: 1.0, lambda: 1.0, speed=float, pairs=0)


def test_demo_refuses_fewer_than_five_pairs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        demo.main(["--data", str(tmp_path), "--pairs", "3"])
    assert "--pairs must be at least 5" in capsys.readouterr().err


def test_run_prompts_times_fixed_count_and_prints_reply_to_end_of_turn(bundle_dir, monkeypatch, capsys):
    """On the tiny bundle: every timed run decodes the full token count (ignore_eos), while the printed reply
    is the text before the first end-of-turn token."""
    from runtime.tokenizer import BundleTokenizer

    prompt = "w5 w6 w7 w8 w9"
    b0, tok, r0 = demo.measure(bundle_dir, prompt, new_tokens=12, threads=1, pairs=5)
    toks = r0["results_b"][-1].tokens
    assert len(r0["results_a"]) == len(r0["results_b"]) == 5
    # pick an end-of-turn id that the FiRST run generates early (not at position 0), as the real model's
    # <|im_end|> comes before the timed count is reached
    stop_at = next(i for i in range(1, len(toks)) if toks[i] not in toks[:i])
    eot = toks[stop_at]
    monkeypatch.setattr(Bundle, "eos_ids", property(lambda self: [eot]))
    capsys.readouterr()
    rows = demo.run_prompts(bundle_dir, "ORT", [prompt], new_tokens=12, threads=1, pairs=5)
    out = capsys.readouterr().out
    (row,) = rows
    assert len(row["all_runs"]) == len(row["first_runs"]) == 5
    assert row["speedup"] > 0 and row["all"] > 0 and row["first"] > 0
    expected = BundleTokenizer(Bundle(bundle_dir)).decode(toks[:stop_at])
    full = BundleTokenizer(Bundle(bundle_dir)).decode(toks)
    assert expected != full
    lines = out.splitlines()
    assert lines[1].strip() == repr(expected[:160])  # the reply, cut at the end-of-turn token
    assert "over 12 tok" in lines[2]  # ... while the timing covered all 12 tokens
