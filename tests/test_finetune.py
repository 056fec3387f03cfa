"""Data loading, router training, checkpoints/resume and LoRA on tiny models and tiny data slices."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from export import finetune as ft
from export.data import Encoder, end_of_turn_id, load_split, mix_tasks, read_jsonl, resolve_tasks
from export.model import build_first_model
from runtime.errors import FirstEdgeError
from runtime.loop import SamplingConfig, generate
from export.reference import TorchBackend
from helpers import tiny_vocab_data


def tiny_cfg(**kw):
    cfg = ft.TrainConfig(**ft.PRESETS["tiny"])
    cfg.recipe = "e2e"  # the rank recipe has its own tests below
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def slice_data(src: Path, dst: Path, tasks=("arithmetic", "translate"), n=6) -> Path:
    """A tiny copy of the shared task data (first n records of each split), in the tiny model's
    vocabulary so that prompts are not all ``<unk>``."""
    return tiny_vocab_data(src, dst, tasks, n)


# ---------------------------------------------------------------- data
def test_real_data_loads_with_known_metrics(data_dir):
    per = load_split(data_dir, "val", limit=3)
    assert set(per) >= {"qa", "summarize", "arithmetic", "sql", "translate", "define"}
    for t, recs in per.items():
        assert len(recs) == 3 and all(r.task == t and r.references and r.metric for r in recs)
    mixed = mix_tasks(per, 2, seed=0)
    assert len(mixed) == 2 * len(per) and len({r.task for r in mixed}) == len(per)
    with pytest.raises(FirstEdgeError, match="task 'nope' not found"):
        resolve_tasks(data_dir, "qa,nope")


@pytest.mark.parametrize("line,msg", [
    ('{"prompt": "p", "completion": "c", "metric": "f1"', "not valid JSON"),
    ('{"prompt": "p", "metric": "f1"}', "missing field 'completion'"),
    ('{"prompt": "p", "completion": "c", "metric": "bleurt"}', "unknown metric 'bleurt'"),
    ('{"prompt": "p", "completion": "c", "metric": "f1", "references": "c"}', "'references' must be"),
    ('[1, 2]', "must be a JSON object"),
    ('{"prompt": "", "completion": "c", "metric": "f1"}', "empty 'prompt'"),
])
def test_malformed_record_names_file_and_line(tmp_path, line, msg):
    f = tmp_path / "t" / "train.jsonl"
    f.parent.mkdir()
    good = json.dumps({"task": "t", "prompt": "p", "completion": "c", "references": ["c"], "metric": "exact"})
    f.write_text(good + "\n\n" + line + "\n")
    with pytest.raises(FirstEdgeError) as e:
        read_jsonl(f)
    assert f"{f}:3" in str(e.value) and msg in str(e.value)


def test_missing_data_folder_and_split_errors(tmp_path):
    with pytest.raises(FirstEdgeError, match="data folder not found"):
        load_split(tmp_path / "nope", "train")
    with pytest.raises(FirstEdgeError, match="no task folders"):
        load_split(tmp_path, "train")
    with pytest.raises(FirstEdgeError, match="unknown split"):
        load_split(tmp_path, "test")


def test_encoder_truncates_inside_the_user_message(tiny_dir):
    fm, tok = build_first_model(str(tiny_dir), verbose=False)
    enc = Encoder(tok, end_of_turn_id(tok, fm.cfg), max_prompt_tokens=20, max_completion_tokens=3, head_tokens=4)
    long = " ".join(f"w{5 + i % 80}" for i in range(50))
    ids = enc.prompt(long)
    assert len(ids) == 20 and ids[:len(enc.pre_ids)] == enc.pre_ids and ids[-len(enc.post_ids):] == enc.post_ids
    assert enc.completion("w5") == tok("w5", add_special_tokens=False)["input_ids"] + [enc.end_id]
    assert len(enc.completion("w5 w6 w7 w8 w9")) == 3  # cut, no end token


# ---------------------------------------------------------------- training
@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_dir, data_dir):
    """One tiny run (soft + hard phases) with its cache kept; the initial routers for comparison."""
    root = tmp_path_factory.mktemp("ft")
    data = slice_data(data_dir, root / "data")
    fm, tok = build_first_model(str(tiny_dir), verbose=False)
    init = {k: v.clone() for k, v in fm.routers.state_dict().items()}
    cfg = tiny_cfg(soft_steps=6, hard_steps=4, batch_size=8, lam=0.5, target_keep=0.5, lr=5e-2)
    summary = ft.train(str(tiny_dir), str(data), str(root / "run"), cfg, progress=False, verbose=False,
                       fm=fm, tok=tok)
    return dict(root=root, data=data, run=root / "run", fm=fm, tok=tok, init=init, cfg=cfg, summary=summary)


def _full_loss(fm, run, cfg, phase="soft"):
    cache = ft.PromptCache(run / "cache", fm).open()
    b = cache.batch(list(range(len(cache))))
    with torch.no_grad():
        logits, g, gates = ft.cached_forward(fm, b, ft.make_gate_fn(phase, cfg.tau))
        return ft.losses(logits, b, gates, cfg)[1]


def test_training_lowers_loss_and_changes_routers(trained, tiny_dir):
    fm, run = trained["fm"], trained["run"]
    cfg = tiny_cfg(lam=0.0, kd=1.0, ce=1.0, bf16=False)
    after = _full_loss(fm, run, cfg)
    fm2, _ = build_first_model(str(tiny_dir), verbose=False)
    fm2.routers.load_state_dict(trained["init"])
    before = _full_loss(fm2, run, cfg)
    # the same objective the run minimised (latency term included)
    cfg_run = trained["cfg"]
    assert _full_loss(fm, run, cfg_run)["loss"] < _full_loss(fm2, run, cfg_run)["loss"]
    assert after["loss"] != before["loss"]
    moved = max(float((fm.routers.state_dict()[k] - v).abs().max()) for k, v in trained["init"].items())
    assert moved > 1e-3
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 11))
    assert {r["phase"] for r in log} == {"soft", "hard"}
    assert all({"loss", "gate", "skipped"} <= set(r) for r in log)
    saved = json.loads((run / "routers.json").read_text())
    assert saved["train"]["steps"] == 10 and saved["lora"] is False


def test_cached_training_forward_equals_mixed_forward_fp32(trained):
    """The completion-only forward over cached prompt K/V is the mixed forward of the core."""
    fm, run, cfg = trained["fm"], trained["run"], trained["cfg"]
    cfg32 = tiny_cfg(bf16=False)
    cache = ft.PromptCache(run / "cache2", fm).build(fm, _encoded(trained, cfg32), "k", cfg32, progress=False)
    idx = [0, 1, 2, 3]
    b = ft.lora_batch(cache, idx)
    hard = ft.make_gate_fn("hard", 0.5)
    with torch.no_grad():
        lc, gc, gatec = ft.cached_forward(fm, b, hard)
        lm, gm, gatem = fm.mixed_forward(b["full_ids"], b["full_pmask"], gate_fn=lambda l, g: hard(g))
    lm = lm.gather(1, b["sel"].unsqueeze(-1).expand(-1, -1, lm.shape[-1]))
    m = b["tmask"]
    assert torch.allclose(gc, gm, atol=1e-5) and torch.equal(gatec, gatem)
    assert (lc - lm)[m].abs().max() < 1e-4


def _encoded(tr, cfg):
    fm, tok = tr["fm"], tr["tok"]
    enc = Encoder(tok, end_of_turn_id(tok, fm.cfg), cfg.max_prompt_tokens, cfg.max_completion_tokens)
    recs = mix_tasks(load_split(tr["data"], "train"), cfg.per_task, seed=cfg.seed)
    return [e for e in (enc(r) for r in recs) if len(e.completion_ids) >= 2]


def test_hard_gate_forward_of_trained_checkpoint_equals_generator(trained, tiny_dir):
    fm, tok = build_first_model(str(tiny_dir), str(trained["run"]), verbose=False)
    rng = np.random.default_rng(0)
    masks = []
    for trial in range(3):
        ids = [int(x) for x in rng.integers(5, 96, 8 + trial)]
        be = TorchBackend(fm, 64)
        res = generate(be, ids, SamplingConfig(max_new_tokens=6, ignore_eos=True), threshold=0.5, keep_logits=True)
        masks.append(res.mask)
        full = torch.tensor([ids + res.tokens])
        pm = torch.zeros_like(full, dtype=torch.bool)
        pm[:, :len(ids)] = True
        with torch.no_grad():
            logits, g, gates = fm.mixed_forward(full, pm, gate_fn=lambda l, g: (g >= 0.5).float())
        assert np.array_equal(gates[0].numpy().astype(bool), res.mask)
        gen = np.stack([res.first_logits] + res.step_logits)
        ref = logits[0, len(ids) - 1: len(ids) - 1 + len(gen)].numpy()
        assert np.abs(gen - ref).max() <= 1e-4
    assert any(not m.all() for m in masks), "the trained routers should skip some layer"


def test_resume_continues_from_saved_step(tmp_path, tiny_dir, data_dir):
    data = slice_data(data_dir, tmp_path / "data", n=4)
    cfg = dict(soft_steps=3, hard_steps=2, save_every=2)
    full = ft.train(str(tiny_dir), str(data), str(tmp_path / "a"), tiny_cfg(**cfg), progress=False, verbose=False)
    stop = ft.train(str(tiny_dir), str(data), str(tmp_path / "b"), tiny_cfg(**cfg), progress=False, verbose=False,
                    stop_after=3)
    assert stop == {"stopped_at": 3} and not (tmp_path / "b" / "routers.json").exists()
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["step"] == 3
    ft.train(str(tiny_dir), str(data), str(tmp_path / "b"), tiny_cfg(**cfg), progress=False, verbose=False, resume=True)
    log = [json.loads(x)["step"] for x in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4, 5]
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "a" / "routers.safetensors")), load_file(str(tmp_path / "b" / "routers.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    assert full["steps"] == 5
    with pytest.raises(FirstEdgeError, match="already holds a trained run"):
        ft.train(str(tiny_dir), str(data), str(tmp_path / "a"), tiny_cfg(**cfg), progress=False, verbose=False)
    with pytest.raises(FirstEdgeError, match="nothing to resume"):
        ft.train(str(tiny_dir), str(data), str(tmp_path / "c"), tiny_cfg(**cfg), progress=False, verbose=False,
                 resume=True)


def test_lora_phase_writes_peft_adapter_that_loads(tmp_path, tiny_dir, data_dir):
    """The adapter is written in peft format, loads with the routers, and is merged: every adapted
    weight equals base + scale * B @ A from the saved file (no single module's gradient decides)."""
    from safetensors.torch import load_file

    data = slice_data(data_dir, tmp_path / "data", n=4)
    cfg = tiny_cfg(soft_steps=1, hard_steps=1, lora_steps=2, lora_lr=1e-2)
    ft.train(str(tiny_dir), str(data), str(tmp_path / "run"), cfg, lora=True, progress=False, verbose=False)
    run = tmp_path / "run"
    conf = json.loads((run / "lora" / "adapter_config.json").read_text())
    assert json.loads((run / "routers.json").read_text())["lora"]
    ad = load_file(str(run / "lora" / "adapter_model.safetensors"))
    scale = conf["lora_alpha"] / conf["r"]
    fm_l, _ = build_first_model(str(tiny_dir), str(run), verbose=False)
    fm_b, _ = build_first_model(str(tiny_dir), verbose=False)
    assert not hasattr(fm_l.hf, "peft_config"), "the adapter must be merged into plain modules"
    wl, wb = dict(fm_l.hf.named_parameters()), dict(fm_b.hf.named_parameters())
    checked, moved = 0, 0
    for key, a in ad.items():
        if ".lora_A." not in key:
            continue
        bmat = ad[key.replace(".lora_A.", ".lora_B.")]
        name = key.split("base_model.model.", 1)[1].replace(".lora_A.weight", ".weight")
        want = wb[name] + scale * (bmat.float() @ a.float())
        assert torch.allclose(wl[name], want, atol=1e-5), name
        checked += 1
        moved += bool(bmat.abs().max() > 0)
    assert checked == 7 * fm_b.n_layers  # q, k, v, o, gate, up, down in every layer
    assert moved >= checked // 2, f"only {moved} of {checked} adapters were trained"
    ids = torch.tensor([[5, 17, 33, 41, 60, 7, 88]])
    with torch.no_grad():
        assert not torch.allclose(fm_l.hf(ids).logits, fm_b.hf(ids).logits, atol=1e-4)


def test_cli_errors(tmp_path, tiny_dir, capsys):
    with pytest.raises(SystemExit) as e:
        ft.main(["--data", str(tmp_path / "none"), "--out", str(tmp_path / "r"), "--model", str(tiny_dir)])
    assert e.value.code == 2 and "data folder not found" in capsys.readouterr().err
    base = ["--data", str(tmp_path), "--out", str(tmp_path / "r"), "--recipe", "e2e"]
    with pytest.raises(SystemExit) as e:
        ft.main(base + ["--target-keep", "-1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--no-target-keep" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as e:
        ft.main(base + ["--target-keep", "0.6", "--no-target-keep"])
    assert e.value.code == 2 and "not both" in capsys.readouterr().err


def test_cli_target_keep_options(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(ft, "train", lambda model, data, out, cfg, **kw: seen.update(cfg=cfg) or {"stopped_at": 0})
    base = ["--data", str(tmp_path), "--out", str(tmp_path / "r"), "--recipe", "e2e", "--preset", "tiny"]
    ft.main(base + ["--no-target-keep"])
    assert seen["cfg"].target_keep is None
    ft.main(base + ["--target-keep", "0.6"])
    assert seen["cfg"].target_keep == 0.6
    ft.main(base)
    assert seen["cfg"].target_keep == ft.TrainConfig().target_keep


# ---------------------------------------------------------------- rank recipe (training v2)
def test_importance_initialised_routers_reproduce_the_static_mask_in_budget_mode():
    from export.importance import importance_order, static_mask
    from export.rank import init_from_importance
    from helpers import tiny_first
    from runtime.masks import budget_mask

    fm = tiny_first("llama")
    L = fm.n_layers
    costs = np.array([5.0, 0.3, 0.1, 0.1, 0.7, 2.0])[:L]
    order = importance_order(costs, pinned=[0])
    assert list(order) == [3, 2, 1, 4, 5, 0]  # ties: the higher index first; pinned last
    init_from_importance(fm, order)
    for seed in range(3):
        ids = torch.randint(5, 90, (1, 7 + seed), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            _, g, mask, _, _ = fm.prefill(ids)
        assert bool(mask.all())  # threshold 0.5 keeps every layer before training
        for k in range(1, L):
            got = budget_mask(g.numpy(), L - k)
            assert np.array_equal(got, static_mask(order, k, L)), k


def test_toggle_labels_match_a_direct_two_forward_kl():
    """Labels from the batched teacher-forced scorer equal KL computed from two plain forwards."""
    from export.importance import Scorer, toggle_labels
    from helpers import tiny_first

    fm = tiny_first("llama")
    L = fm.n_layers
    sc = Scorer(fm, bf16=False, chunk=3)
    ids = [int(x) for x in torch.randint(5, 90, (9,), generator=torch.Generator().manual_seed(1))]
    ps = sc.prepare(ids, 6)
    assert len(ps.cont) == 6
    static = np.array([True, False, True, True, False, True])
    u, k0 = toggle_labels(sc, ps, static)

    def direct_kl(mask):
        full = torch.tensor([ids + ps.cont])
        pm = torch.zeros_like(full, dtype=torch.bool)
        pm[:, :len(ids)] = True
        with torch.no_grad():
            base = fm.mixed_forward(full, pm, gates=torch.ones(L))[0]
            alt = fm.mixed_forward(full, pm, gates=torch.tensor(mask, dtype=torch.float32))[0]
        sl = slice(len(ids), len(ids) + len(ps.cont) - 1)  # positions fed with y_1 .. y_{n-1}
        lb, la = torch.log_softmax(base[0, sl], -1), torch.log_softmax(alt[0, sl], -1)
        return float((lb.exp() * (lb - la)).sum(-1).mean())

    assert abs(k0 - direct_kl(static)) < 1e-4
    for l in range(L):
        t = static.copy()
        t[l] = ~t[l]
        want = direct_kl(t) - k0 if static[l] else k0 - direct_kl(t)
        assert abs(u[l] - want) < 1e-4, l
    assert np.abs(u).max() > 1e-3


def test_rank_loss_prefers_the_measured_order():
    from export.rank import rank_loss

    u = torch.tensor([[0.9, 0.1, 0.5, 0.0]])
    free = torch.tensor([True, True, True, False])
    right = rank_loss(torch.tensor([[3.0, 1.0, 2.0, 0.0]]), u, free, 1.0, 0.25)
    wrong = rank_loss(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), u, free, 1.0, 0.25)
    pinned_only = rank_loss(torch.tensor([[3.0, 1.0, 2.0, 9.0]]), u, free, 1.0, 0.25)
    assert right < wrong and torch.isclose(right, pinned_only)


@pytest.fixture(scope="module")
def rank_run(tmp_path_factory, tiny_dir, data_dir):
    root = tmp_path_factory.mktemp("rank")
    data = slice_data(data_dir, root / "data", n=6)
    cfg = ft.TrainConfig(**ft.PRESETS["tiny"])
    cfg.rank_steps, cfg.label_k, cfg.pin_nats = 8, 2, 50.0
    summary = ft.train(str(tiny_dir), str(data), str(root / "run"), cfg, progress=False, verbose=False)
    return dict(root=root, data=data, run=root / "run", cfg=cfg, summary=summary)


def test_rank_recipe_measures_fits_and_calibrates(rank_run, tiny_dir):
    run, data, cfg, summary = rank_run["run"], rank_run["data"], rank_run["cfg"], rank_run["summary"]
    assert ft.TrainConfig(**ft.PRESETS["tiny"]).recipe == "rank"
    rj = json.loads((run / "routers.json").read_text())
    assert rj["recipe"] == "rank" and summary["examples"] == 8
    imp = rj["importance"]
    assert len(imp["kl_skip_one"]) == 6 and imp["label_k"] == 2 and len(imp["static_mask_skips"]) == 2
    assert rj["pool_start"] > 0  # the chat prefix is not pooled
    pts = rj["calibration"]["points"]
    assert pts and all(p["mean_skipped"] <= p["target_skipped"] for p in pts if p["target_skipped"] is not None)
    # the level term (default): threshold 0.5 = --level-budget nats a token, measured as a calibration point
    assert rj["train"]["level_weight"] == 1.0 and rj["threshold"] == 0.5
    assert [p["target_skipped"] for p in pts if p["threshold"] == 0.5] == [None]
    assert [p["threshold"] for p in pts] == sorted(p["threshold"] for p in pts)
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 9))
    fm, _ = build_first_model(str(tiny_dir), str(run), verbose=False)
    moved = max(float(r.fc2.weight.abs().max()) for r in fm.routers)
    assert moved > 0  # learnt per-prompt deviations from the prior
    with pytest.raises(FirstEdgeError, match="already holds a trained run"):
        ft.train(str(tiny_dir), str(data), str(run), cfg, progress=False, verbose=False)
    with pytest.raises(FirstEdgeError, match="--lora needs the end-to-end recipe"):
        ft.train(str(tiny_dir), str(data), str(run.parent / "r2"), cfg, lora=True, progress=False, verbose=False)


def test_rank_resume_reuses_the_measured_labels(rank_run, tiny_dir, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(rank_run["run"], run)
    t = (run / "labels" / "meta.json").stat().st_mtime
    before = (run / "routers.safetensors").read_bytes()
    ft.train(str(tiny_dir), str(rank_run["data"]), str(run), rank_run["cfg"], progress=False, verbose=False, resume=True)
    assert (run / "labels" / "meta.json").stat().st_mtime == t  # not measured again
    assert (run / "routers.safetensors").read_bytes() == before  # the same seeded fit


def test_bundle_manifest_carries_the_threshold_calibration(rank_run, tiny_dir, tmp_path):
    from export.build import build

    out = build("rpi", tmp_path / "b", model=str(tiny_dir), run=str(rank_run["run"]), max_context=128, verbose=False)
    man = json.loads((out / "manifest.json").read_text())
    rj = json.loads((rank_run["run"] / "routers.json").read_text())
    assert man["routing"]["calibration"] == rj["calibration"]
    assert man["routing"]["default_threshold"] == pytest.approx(rj["threshold"])


def test_leave_one_task_out_fits_without_the_held_out_task(rank_run, capsys):
    from export import loto

    out = rank_run["root"] / "loto"
    loto.main(["--run", str(rank_run["run"]), "--data", str(rank_run["data"]), "--prompts", "2", "--budgets", "1,2",
               "--continuation", "5", "--calib", "2", "--out", str(out), "--no-progress"])
    res = json.loads((out / "loto.json").read_text())
    assert set(res["tasks"]) == {"arithmetic", "translate"}
    for x, tr in res["tasks"].items():
        assert tr["trained_on"] == [t for t in ("arithmetic", "translate") if t != x]
        assert tr["fit_prompts"] == 4  # the other task's labelled prompts only
        for k in ("1", "2"):
            r = tr["budget"][k]
            assert r["verdict"] in ("win", "tie", "loss")
            assert "bi_task" not in r["baselines"] and "static_task" not in r["baselines"]  # no held-out calibration
    assert "held-out" in (out / "loto.md").read_text()


def test_predicted_delta_counts_dropped_and_added_layers():
    from export.rank import predicted_delta

    static = np.array([True, True, False, True, False])
    u = np.array([[9.0, 0.5, 0.25, 0.75, 0.125]])
    same = np.array([[0.9, 0.8, 0.1, 0.7, 0.2]])  # keeps the static mask's layers
    swap = np.array([[0.9, 0.1, 0.8, 0.7, 0.2]])  # drops layer 1 (costs 0.5), adds layer 2 (gains 0.25)
    assert predicted_delta(same, u, static, [0])[0] == 0.0
    assert predicted_delta(swap, u, static, [0])[0] == pytest.approx(0.5 - 0.25)
