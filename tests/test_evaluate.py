"""Metrics, baselines and the evaluation protocol on tiny models and tiny data slices."""
import json
from pathlib import Path

import numpy as np
import pytest

from export import baselines
from export import evaluate as ev
from export.metrics import normalize_answer, score
from export.model import build_first_model
from helpers import randomize_routers
from runtime.errors import FirstEdgeError


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


def test_record_metrics_are_the_scored_metrics():
    """The data reader accepts exactly the metrics ``score`` computes (one list: export.metrics.METRICS)."""
    from export import data, metrics

    assert data.METRICS == tuple(metrics.METRICS) and "bleu" in data.METRICS
    for name in data.METRICS:
        rec = data.parse_record(json.dumps({"prompt": "p", "completion": "c", "metric": name}), "f:1")
        assert score("c", rec.references, rec.metric) == pytest.approx(1.0)  # the completion is the reference
    with pytest.raises(FirstEdgeError, match="unknown metric 'meteor' \\(known: " + ", ".join(metrics.METRICS)):
        data.parse_record(json.dumps({"prompt": "p", "completion": "c", "metric": "meteor"}), "f:1")


# ---------------------------------------------------------------- baselines
@pytest.mark.parametrize("L", [6, 30])
def test_baselines_skip_exactly_k_layers(L):
    rng = np.random.default_rng(0)
    bi = rng.random(L)
    for k in range(0, L):
        for m in [baselines.bi_mask(bi, k), baselines.even_mask(L, k)] + baselines.baseline_masks("random", L, k):
            assert m.dtype == bool and m.shape == (L,) and int((~m).sum()) == k
        if k:
            assert set(np.flatnonzero(~baselines.bi_mask(bi, k))) == set(np.argsort(bi)[:k])
        if k <= L - 2:
            e = baselines.even_mask(L, k)
            assert e[0] and e[-1]
    assert list(np.flatnonzero(~baselines.even_mask(30, 3))) == [8, 15, 21]
    r = [baselines.random_mask(L, L // 2, s) for s in (0, 1, 2)]
    assert not (np.array_equal(r[0], r[1]) and np.array_equal(r[1], r[2]))
    assert np.array_equal(baselines.random_mask(L, 2, 5), baselines.random_mask(L, 2, 5))
    with pytest.raises(FirstEdgeError, match="cannot skip"):
        baselines.even_mask(L, L)


def test_block_influence_scores(tiny_dir):
    fm, _ = build_first_model(str(tiny_dir), verbose=False)
    bi = baselines.block_influence(fm, [[5, 6, 7, 8], [9, 10, 11]])
    assert bi.shape == (fm.n_layers,) and np.all(bi >= 0) and np.all(bi <= 2) and bi.std() > 0


# ---------------------------------------------------------------- protocol v2 pieces
def test_spread_sample_is_seeded_and_spread_over_the_file():
    from export.importance import spread_sample

    items = list(range(1000))
    a = spread_sample(items, 10, seed=0)
    assert a == spread_sample(items, 10, seed=0) and a != spread_sample(items, 10, seed=1)
    assert [x // 100 for x in a] == list(range(10))  # one per stratum: not the head of the file
    assert spread_sample(items[:7], 10, seed=0) == items[:7]


def test_paired_bootstrap_gives_the_known_interval():
    from export.importance import paired_bootstrap, verdict

    c = paired_bootstrap([0.3] * 50)
    assert c["lo"] == pytest.approx(0.3) and c["hi"] == pytest.approx(0.3) and verdict(c) == "win"
    # +-1 in equal numbers: mean 0, standard error 1/sqrt(n) = 0.05, interval about +-1.96 * 0.05
    d = paired_bootstrap([1.0, -1.0] * 200, n_boot=4000, seed=3)
    assert d["mean"] == pytest.approx(0.0) and d["lo"] == pytest.approx(-0.098, abs=0.012)
    assert d["hi"] == pytest.approx(0.098, abs=0.012) and verdict(d) == "tie"
    assert verdict(paired_bootstrap([-1.0, -0.9, -1.1] * 10)) == "loss"


def _fake_cal(L, tasks=("t",)):
    rng = np.random.default_rng(0)
    bi, cost = {t: rng.random(L) for t in tasks}, {t: rng.random(L) for t in tasks}
    return {"bi_task": bi, "cost_task": cost, "bi_global": rng.random(L), "cost_global": rng.random(L)}


def test_budget_mode_skips_exactly_k_and_threshold_baselines_match_first():
    from helpers import tiny_first

    fm = randomize_routers(tiny_first("llama"), seed=2)
    fm.set_pinned([0])
    L = fm.n_layers
    cal = _fake_cal(L)
    for seed in range(4):
        g = np.random.default_rng(seed).random(L).astype(np.float32)
        cfgs = ev.prompt_configs(g, fm, [1, 2, 4], [0.3, 0.6], cal, "t")
        for k in (1, 2, 4):
            for m in ev.METHODS + ("first",):
                ms = cfgs[f"budget/{k}/{m}"]
                assert len(ms) == (3 if m == "random" else 1)
                assert all(int((~x).sum()) == k for x in ms), (k, m)
            assert cfgs[f"budget/{k}/first"][0][0]  # pinned layer kept
        for t in (0.3, 0.6):
            c = int((~cfgs[f"threshold/{t:g}/first"][0]).sum())
            assert all(int((~x).sum()) == c for m in ev.METHODS for x in cfgs[f"threshold/{t:g}/{m}"])
    # a task the routers were not trained on gets only the globally calibrated baselines
    other = ev.prompt_configs(g, fm, [2], [], cal, "unseen")
    assert "budget/2/bi_task" not in other and "budget/2/static_task" not in other and "budget/2/bi_global" in other


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
    ev.main(["--run", str(run), "--data", str(data), "--split", "val", "--prompts", "3", "--budgets", "1,2",
             "--thresholds", "0.3,0.6", "--continuation", "6", "--calib", "2", "--gen-prompts", "2",
             "--gen-tokens", "5", "--oracle", "2", "--bootstrap", "200", "--out", str(out), "--no-progress"])
    for f in ("report.md", "results.json", "kl_vs_k.png", "mask_heatmap.png"):
        assert (out / f).exists() and (out / f).stat().st_size > 0, f
    res = json.loads((out / "results.json").read_text())
    assert res["protocol"] == 2 and set(res["tasks"]) == {"arithmetic", "define", "unseen"}
    assert res["thresholds"] == [0.3, 0.5, 0.6]  # the run's default threshold is always included
    for t, tr in res["tasks"].items():
        assert tr["n"] == 3
        for k in ("1", "2"):
            b = tr["budget"][k]
            assert b["first"]["kl"] >= 0 and b["best"] in b["baselines"]
            assert set(b["baselines"]) >= {"bi_global", "static_global", "even", "random"}
            for x in b["baselines"].values():
                assert x["diff"]["lo"] <= x["diff"]["mean"] <= x["diff"]["hi"] and x["verdict"] in ("win", "tie", "loss")
            assert "first" in b["nll"]
        assert len(tr["per_prompt"]["budget/1/first"]) == 3
        g = tr["generation"]
        assert g["base"]["agreement"] == 1.0 and g["base"]["n"] == 2 and "budget/6/first" not in g
    # calibrated per task only for tasks the routers were trained on (all, for a run without a record)
    assert "bi_task" in res["tasks"]["unseen"]["budget"]["1"]["baselines"]
    assert res["tasks"]["unseen"]["metric"] == "chrf"
    assert res["summary"]["target_budget"] == {}  # k = 6, 9 were not asked for
    o = res["tasks"]["arithmetic"]["oracle"]
    assert o["prompts"] == 2 and set(o) >= {"1", "2"}
    for k in ("1", "2"):
        assert o[k]["task_mask"].count("0") == int(k)
        # the per-prompt oracle is chosen on the first half, so it need not win the second; it exists
        assert set(o[k]["kl_second_half"]) >= {"oracle_task", "oracle_prompt", "first", "bi_global"}
    text = (out / "report.md").read_text()
    assert "## Targets" in text and "## Budget mode" in text


def test_evaluate_cli_errors(tmp_path, tiny_dir, capsys):
    with pytest.raises(SystemExit) as e:
        ev.main(["--run", str(tmp_path / "none"), "--data", str(tmp_path)])
    assert e.value.code == 2 and "not a finetuned run" in capsys.readouterr().err
    run = _tiny_run(tmp_path, tiny_dir)
    with pytest.raises(SystemExit) as e:
        ev.main(["--run", str(run), "--data", str(tmp_path), "--budgets", "3,x"])
    assert e.value.code == 2 and "--budgets must be comma-separated numbers" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        ev.main(["--run", str(run), "--data", str(tmp_path), "--prompts", "0"])
    assert e.value.code == 2 and "--prompts must be at least 1" in capsys.readouterr().err
