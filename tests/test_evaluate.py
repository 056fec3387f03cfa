"""Metrics, baselines and the evaluation protocol on tiny models and tiny data slices."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from export import baselines as B
from export import evaluate as ev
from export.generate import TorchBackend
from export.metrics import normalize_answer, score
from export.model import build_first_model
from helpers import randomize_routers
from runtime.errors import FirstEdgeError
from runtime.loop import SamplingConfig, generate


# ---------------------------------------------------------------- metrics
def test_metrics_on_known_strings():
    import sacrebleu
    from rouge_score import rouge_scorer

    assert normalize_answer("The  Cat, sat!") == "cat sat"
    # SQuAD token F1: pred {cat, sat} vs ref {cat, sat, down}: P=1, R=2/3 -> 0.8; max over references
    assert score("the cat sat", ["a cat sat down", "dog"], "f1") == pytest.approx(0.8)
    assert score("nothing", ["cat"], "f1") == 0.0
    assert score("The Eiffel Tower.", ["eiffel tower"], "exact") == 1.0
    assert score("Eiffel", ["eiffel tower"], "exact") == 0.0
    # numbers: the sign counts, surrounding words do not
    assert score("The answer is -153.", ["-153"], "exact") == 1.0
    assert score("153", ["-153"], "exact") == 0.0
    assert score("1,440", ["1440"], "exact") == 1.0
    ref = "a failure of the seller's guarantee of good title"
    pred = "failure of the guarantee"
    want = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(ref, pred)["rougeL"].fmeasure
    assert score(pred, [ref], "rougeL") == pytest.approx(want) and 0 < want < 1
    assert score(ref, [ref], "rougeL") == pytest.approx(1.0)
    de = "In der Nacht erwacht die Stadt zum Leben."
    assert score(de, [de], "chrf") == pytest.approx(1.0)
    part = "Die Stadt erwacht in der Nacht."
    assert score(part, [de], "chrf") == pytest.approx(sacrebleu.sentence_chrf(part, [de]).score / 100)
    assert score(part, [de], "bleu") == pytest.approx(sacrebleu.sentence_bleu(part, [de]).score / 100)
    with pytest.raises(FirstEdgeError, match="unknown metric"):
        score("a", ["a"], "meteor")


# ---------------------------------------------------------------- baselines
@pytest.mark.parametrize("L", [6, 30])
def test_baselines_skip_exactly_k_layers(L):
    rng = np.random.default_rng(0)
    bi = rng.random(L)
    for k in range(0, L):
        for m in [B.bi_mask(bi, k), B.even_mask(L, k)] + B.baseline_masks("random", L, k):
            assert m.dtype == bool and m.shape == (L,) and int((~m).sum()) == k
        if k:
            assert set(np.flatnonzero(~B.bi_mask(bi, k))) == set(np.argsort(bi)[:k])
        if k <= L - 2:
            e = B.even_mask(L, k)
            assert e[0] and e[-1]
    assert list(np.flatnonzero(~B.even_mask(30, 3))) == [8, 15, 21]
    r = [B.random_mask(L, L // 2, s) for s in (0, 1, 2)]
    assert not (np.array_equal(r[0], r[1]) and np.array_equal(r[1], r[2]))
    assert np.array_equal(B.random_mask(L, 2, 5), B.random_mask(L, 2, 5))
    with pytest.raises(FirstEdgeError, match="cannot skip"):
        B.even_mask(L, L)


def test_block_influence_scores(tiny_dir):
    fm, _ = build_first_model(str(tiny_dir), verbose=False)
    bi = B.block_influence(fm, [[5, 6, 7, 8], [9, 10, 11]])
    assert bi.shape == (fm.n_layers,) and np.all(bi >= 0) and np.all(bi <= 2) and bi.std() > 0


def test_shared_prefill_backend_equals_fresh_generator(tiny_dir):
    fm, _ = build_first_model(str(tiny_dir), verbose=False)
    randomize_routers(fm, seed=1)
    ids = [5, 9, 13, 20, 40, 41, 7]
    shared = ev.SharedPrefillBackend(fm, 64)
    masks = [np.ones(fm.n_layers, bool), B.even_mask(fm.n_layers, 2), B.random_mask(fm.n_layers, 3, 0)]
    sc = SamplingConfig(max_new_tokens=8, ignore_eos=True)
    for m in masks + masks[::-1]:
        a = generate(shared, ids, sc, mask=m)
        b = generate(TorchBackend(fm, 64), ids, sc, mask=m)
        assert a.tokens == b.tokens
    for thr in (0.3, 0.7):
        a = generate(shared, ids, sc, threshold=thr)
        b = generate(TorchBackend(fm, 64), ids, sc, threshold=thr)
        assert a.tokens == b.tokens and np.array_equal(a.mask, b.mask)
    assert shared.prefills == 1
    other = [5, 6, 7]
    for p in (other, ids, other):  # remembered prompts get their K/V back, not recomputed
        a = generate(shared, p, sc, mask=masks[1])
        assert a.tokens == generate(TorchBackend(fm, 64), p, sc, mask=masks[1]).tokens
    assert shared.prefills == 2


# ---------------------------------------------------------------- the protocol end to end
def _tiny_run(tmp_path, tiny_dir) -> Path:
    fm, _ = build_first_model(str(tiny_dir), verbose=False)
    randomize_routers(fm, seed=3)
    run = tmp_path / "run"
    fm.save_routers(run, extra={"model_dir": str(tiny_dir), "lora": False})
    return run


def _data(tmp_path, data_dir) -> Path:
    d = tmp_path / "data"
    for t in ("arithmetic", "define"):
        (d / t).mkdir(parents=True)
        for split in ("train", "val"):
            lines = (data_dir / t / f"{split}.jsonl").read_text().splitlines()[:3]
            (d / t / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    # a task the routers never saw, with word-level text the tiny tokenizer knows
    (d / "unseen").mkdir()
    recs = [{"task": "unseen", "prompt": f"w{5 + i} w{6 + i} w{7 + i}", "completion": f"w{8 + i}",
             "references": [f"w{8 + i}", "w9"], "metric": "chrf"} for i in range(3)]
    for split in ("train", "val"):
        (d / "unseen" / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return d


def test_evaluate_cli_writes_report_results_and_plots(tmp_path, tiny_dir, data_dir):
    run, data = _tiny_run(tmp_path, tiny_dir), _data(tmp_path, data_dir)
    out = tmp_path / "eval"
    ev.main(["--run", str(run), "--data", str(data), "--split", "val", "--limit", "2", "--thresholds", "0.3,0.6",
             "--max-new-tokens", "6", "--out", str(out), "--no-progress", "--calib", "2"])
    for f in ("report.md", "results.json", "samples.jsonl", "quality_vs_skip.png", "mask_heatmap.png"):
        assert (out / f).exists() and (out / f).stat().st_size > 0, f
    res = json.loads((out / "results.json").read_text())
    assert set(res["tasks"]) == {"arithmetic", "define", "unseen"}
    assert res["thresholds"] == [0.3, 0.5, 0.6]  # the run's default threshold is always included
    L = res["n_layers"]
    for t, tr in res["tasks"].items():
        assert tr["n"] == 2 and 0 <= tr["base"]["quality"] <= 1 and tr["base"]["skipped_layers"] == 0
        ks = {p["matched_k"] for p in tr["first"]} - {0}
        for kind in B.KINDS:
            assert {r["k"] for r in tr["baselines"][kind]} == ks
            for r in tr["baselines"][kind]:
                assert all(m.count("0") == r["k"] for m in r["masks"]) and len(r["masks"]) == (3 if kind == "random" else 1)
        for p in tr["first"]:
            assert len(p["mean_mask"]) == L and abs(L - sum(p["mean_mask"]) - p["skipped_layers"]) < 1e-3
    assert res["tasks"]["unseen"]["metric"] == "chrf"
    assert any(p["matched_k"] > 0 for tr in res["tasks"].values() for p in tr["first"]), "routers should skip"
    s = res["summary"]
    assert {"target_skip25_at_95", "target_beats_baselines", "target_adaptivity"} <= set(s)
    assert "## Targets" in (out / "report.md").read_text()


def test_evaluate_cli_errors(tmp_path, tiny_dir, capsys):
    with pytest.raises(SystemExit) as e:
        ev.main(["--run", str(tmp_path / "none"), "--data", str(tmp_path)])
    assert e.value.code == 2 and "not a finetuned run" in capsys.readouterr().err
    run = _tiny_run(tmp_path, tiny_dir)
    with pytest.raises(SystemExit) as e:
        ev.main(["--run", str(run), "--data", str(tmp_path), "--baselines", "shortgpt"])
    assert e.value.code == 2 and "unknown baseline 'shortgpt'" in capsys.readouterr().err
