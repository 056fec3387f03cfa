"""Task targets of the rank recipe: greedy skip orders per task and routers fitted to reproduce them."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from export.importance import PromptState, Scorer, greedy_masks, greedy_order, single_skip_costs
from export.rank import LabelSet, fit, init_from_importance, level_loss, level_targets, pooled_scores, task_targets
from helpers import tiny_first
from runtime.errors import FirstEdgeError
from runtime.masks import budget_mask, threshold_mask


def test_greedy_order_follows_an_interacting_score():
    # cost of a mask: each skipped layer's own cost, plus a penalty when layers 2 and 3 are both skipped
    own = np.array([9.0, 0.5, 0.1, 0.2, 0.3, 0.4])

    def score(masks):
        off = ~np.asarray(masks, dtype=bool)
        return (off * own).sum(1) + 5.0 * (off[:, 2] & off[:, 3])

    g = greedy_order(score, 6, 4, pinned=[0])
    assert g["order"] == [2, 4, 5, 1]  # 3 is passed over once 2 is skipped
    assert g["score"] == pytest.approx([0.1, 0.4, 0.8, 1.3])
    assert g["last"] == pytest.approx({3: 0.8 + 0.2 + 5.0})  # the last step's other candidate; pinned 0 never tried
    assert g["first"] == pytest.approx({1: 0.5, 2: 0.1, 3: 0.2, 4: 0.3, 5: 0.4})
    pruned = greedy_order(score, 6, 3, pinned=[0], prune=3)  # after step 1 only 2, 3, 4 are candidates
    assert pruned["order"] == [2, 4, 3] and pruned["score"] == pytest.approx([0.1, 0.4, 5.6])
    masks = greedy_masks(score, 6, 4, pinned=[0])
    assert [int((~m).sum()) for m in masks.values()] == [1, 2, 3, 4]
    assert list(np.flatnonzero(~masks[2])) == [2, 4]


def test_task_targets_rank_layers_by_each_tasks_greedy_order():
    fm = tiny_first("llama")
    L = fm.n_layers
    sc = Scorer(fm, bf16=False, chunk=8)
    gen = torch.Generator().manual_seed(3)
    states = {t: [sc.prepare([int(x) for x in torch.randint(lo, lo + 30, (10,), generator=gen)], 5) for _ in range(2)]
              for t, lo in (("a", 5), ("b", 50))}
    got = task_targets(sc, states, k_max=3, pinned=[0])
    for t, v in got.items():
        u = np.array(v["u"])
        order = v["order"]
        assert len(order) == 3 and 0 not in order
        mean_single = np.mean([single_skip_costs(sc, ps) for ps in states[t]], 0)
        free = [l for l in range(L) if l != 0]
        assert order[0] == free[int(np.argmin(mean_single[free]))]  # step 1 = the cheapest single skip
        assert np.all(np.diff(u[order]) >= 0)  # labels rise along the order
        rest = [l for l in free if l not in order]
        assert u[rest].min() >= u[order].max()  # never-skipped layers rank above the skipped ones
        assert u[0] > u[free].max()  # pinned: the most important
        # what the labels encode: a budget mask from u at k reproduces the greedy prefix
        for k in (1, 2, 3):
            assert set(np.flatnonzero(~budget_mask(u, L - k, [0]))) == set(order[:k])


def _label_set(tmp_path, fm, n_per_task=12):
    """A LabelSet whose prompts' router inputs differ by task (task a near +v, task b near -v)."""
    L, D = fm.n_layers, fm.hidden_size
    g = torch.Generator().manual_seed(0)
    v = torch.randn(D, generator=g)
    states, tasks = [], []
    for t, sign in (("a", 1.0), ("b", -1.0)):
        for _ in range(n_per_task):
            h = sign * v + 0.3 * torch.randn(4, D, generator=g)
            states.append(PromptState(ids=[], kv=[], scores=np.zeros(L), cont=[], hidden=[h.clone() for _ in range(L)]))
            tasks.append(t)
    u = np.zeros((len(states), L), dtype=np.float32)  # toggle labels carry no information here
    ls = LabelSet(tmp_path / "labels")
    ls.write("k", {}, states, u, np.zeros(len(states)), tasks, L=L, D=D)
    return ls.open()


@pytest.mark.parametrize("weight", [1.0, 0.0])
def test_routers_fitted_on_task_targets_reproduce_each_tasks_order(tmp_path, weight):
    fm = tiny_first("llama")
    L = fm.n_layers
    labels = _label_set(tmp_path, fm)
    prior = [5, 4, 3, 2, 1, 0]
    init_from_importance(fm, prior)  # budget mode skips 5, 4, ... before the fit
    task_u = {"a": np.array([9.0, 0.1, 0.2, 0.3, 0.4, 0.5]),   # task a skips 1, 2, 3 first
              "b": np.array([9.0, 0.5, 0.4, 0.3, 0.2, 0.1])}   # task b skips 5, 4, 3 first
    cfg = SimpleNamespace(rank_lr=1e-2, weight_decay=0.0, seed=0, holdout=0.2, batch_size=8, rank_cap=1.0,
                          rank_temperature=0.25, eval_every=10)
    last = fit(fm, labels, cfg, [0], 150, progress=False, static=np.array([True] * 3 + [False] * 3),
               task_u=task_u, task_weight=weight)
    b = labels.batch(range(len(labels)))
    with torch.no_grad():
        g = pooled_scores(fm, b["hidden"], b["pmask"]).numpy()
    skipped = [set(np.flatnonzero(~budget_mask(g[i], L - 2, [0]))) for i in range(len(labels))]
    want = {"a": {1, 2}, "b": {5, 4}}
    hits = [skipped[i] == want[str(labels.tasks[i])] for i in range(len(labels))]
    if weight == 1.0:
        assert "held_out_loss" in last and last["kept_step"] > 0
        assert all(hits)
    else:  # without the task targets (uninformative toggle labels) the routers stay at the prior
        assert not any(hits[:12])  # task a's order was never learnt


def test_level_targets_make_a_threshold_a_per_token_kl_budget():
    u = torch.tensor([[0.05, 0.25, 0.5, 1.0, 4.0]])
    g = torch.sigmoid(level_targets(u, 0.5))
    assert torch.allclose(g, u / (u + 0.5), atol=1e-6)  # score = u / (u + budget)
    # threshold t skips exactly the layers whose u is below budget * t / (1 - t)
    for t in (0.2, 0.5, 0.8):
        assert ((g < t) == (u < 0.5 * t / (1 - t))).all()
    z = level_targets(u, 0.5)
    free = torch.tensor([True, True, False, True, True])
    assert float(level_loss(z, u, free, 0.5)) == pytest.approx(0.0, abs=1e-7)
    moved = z.clone()
    moved[0, 2] += 5.0  # a pinned layer's score does not count
    assert float(level_loss(moved, u, free, 0.5)) == pytest.approx(0.0, abs=1e-7)
    moved[0, 0] += 0.5  # 0.5 * 0.5^2 / 4 free layers (Huber, quadratic below 1)
    assert float(level_loss(moved, u, free, 0.5)) == pytest.approx(0.5 * 0.25 / 4, rel=1e-5)


@pytest.mark.parametrize("level", [1.0, 0.0])
def test_level_term_makes_the_threshold_follow_each_tasks_cost(tmp_path, level):
    """Task a is cheap to skip, task b costly: with the level term, threshold 0.5 (a budget of 0.5 nats)
    skips the three layers of a whose labels are below 0.5 and only one of b."""
    fm = tiny_first("llama")
    L = fm.n_layers
    labels = _label_set(tmp_path, fm)
    init_from_importance(fm, [5, 4, 3, 2, 1, 0])
    task_u = {"a": np.array([9.0, 0.1, 0.2, 0.3, 0.8, 1.0]),
              "b": np.array([9.0, 2.0, 1.5, 1.0, 0.6, 0.3])}
    cfg = SimpleNamespace(rank_lr=1e-2, weight_decay=0.0, seed=0, holdout=0.2, batch_size=8, rank_cap=1.0,
                          rank_temperature=0.25, eval_every=10)
    fit(fm, labels, cfg, [0], 200, progress=False, static=np.array([True] * 3 + [False] * 3), task_u=task_u,
        task_weight=1.0, level_weight=level, level_budget=0.5)
    b = labels.batch(range(len(labels)))
    with torch.no_grad():
        g = pooled_scores(fm, b["hidden"], b["pmask"]).numpy()
    skipped = [set(np.flatnonzero(~threshold_mask(g[i], 0.5, [0]))) for i in range(len(labels))]
    want = {"a": {1, 2, 3}, "b": {5}}
    hits = [skipped[i] == want[str(labels.tasks[i])] for i in range(len(labels))]
    if level:
        assert all(hits)
    else:  # the ranking loss alone sets no level: the counts do not follow the tasks' costs
        assert not all(hits)
    # the order is learnt either way: budget mode at 2 skipped layers follows each task's labels
    order = {"a": {1, 2}, "b": {5, 4}}
    assert all(set(np.flatnonzero(~budget_mask(g[i], L - 2, [0]))) == order[str(labels.tasks[i])]
               for i in range(len(labels)))


def test_fit_refuses_bad_task_targets(tmp_path):
    fm = tiny_first("llama")
    labels = _label_set(tmp_path, fm, n_per_task=6)
    cfg = SimpleNamespace(rank_lr=1e-2, weight_decay=0.0, seed=0, holdout=0.0, batch_size=4, rank_cap=1.0,
                          rank_temperature=0.25, eval_every=10)
    with pytest.raises(FirstEdgeError, match="no task targets for task"):
        fit(fm, labels, cfg, [0], 3, progress=False, task_u={"a": np.zeros(fm.n_layers)}, task_weight=1.0)
    with pytest.raises(FirstEdgeError, match="task weight"):
        fit(fm, labels, cfg, [0], 3, progress=False, task_u={"a": np.zeros(fm.n_layers)}, task_weight=2.0)
    with pytest.raises(FirstEdgeError, match="level budget"):
        fit(fm, labels, cfg, [0], 3, progress=False, task_u={"a": np.zeros(fm.n_layers), "b": np.zeros(fm.n_layers)},
            task_weight=1.0, level_weight=1.0, level_budget=0.0)


def test_rank_recipe_with_task_targets_end_to_end(tmp_path, tiny_dir, data_dir):
    """``--task-weight 1``: the greedy orders are measured once (cached beside the labels, reused on
    resume), recorded in routers.json, and leave-one-task-out refits with them."""
    from export import finetune as ft
    from export import loto
    from helpers import tiny_vocab_data

    data = tiny_vocab_data(data_dir, tmp_path / "data", ("arithmetic", "translate"), 6)
    cfg = ft.TrainConfig(**ft.PRESETS["tiny"])
    cfg.rank_steps, cfg.label_k, cfg.pin_nats, cfg.task_weight = 8, 2, 50.0, 1.0
    run = tmp_path / "run"
    summary = ft.train(str(tiny_dir), str(data), str(run), cfg, progress=False, verbose=False)
    assert summary["task_weight"] == 1.0 and "task_targets_s" in summary  # on a tiny model it can round to 0.0 s
    tt = json.loads((run / "labels" / "task_targets.json").read_text())
    assert set(tt["tasks"]) == {"arithmetic", "translate"} and tt["k_max"] == 2
    rj = json.loads((run / "routers.json").read_text())
    assert rj["importance"]["task_orders"] == {t: v["order"] for t, v in tt["tasks"].items()}
    assert tt["prompts_per_task"] == cfg.calib_per_task  # task_prompts 0: the importance prior's prompts
    lab = LabelSet(run / "labels").open()
    assert lab.meta["toggles"] is False and not lab.u.any()  # weight 1: no toggle labels measured
    t = (run / "labels" / "task_targets.json").stat().st_mtime
    ft.train(str(tiny_dir), str(data), str(run), cfg, progress=False, verbose=False, resume=True)
    assert (run / "labels" / "task_targets.json").stat().st_mtime == t  # reused, not measured again
    (run / "labels" / "task_targets.json").unlink()  # measured again from freshly prepared prompts ...
    ft.train(str(tiny_dir), str(data), str(run), cfg, progress=False, verbose=False, resume=True)
    again = json.loads((run / "labels" / "task_targets.json").read_text())
    assert again["tasks"] == tt["tasks"]  # ... equal to the first run's, which reused the measure phase's states
    cfg.task_weight = 0.5
    with pytest.raises(FirstEdgeError, match="holds no toggle labels"):
        ft.train(str(tiny_dir), str(data), str(run), cfg, progress=False, verbose=False, resume=True)
    cfg.task_weight, cfg.task_prompts = 1.0, 3
    ft.train(str(tiny_dir), str(data), str(run), cfg, progress=False, verbose=False, resume=True)
    tt = json.loads((run / "labels" / "task_targets.json").read_text())
    assert tt["prompts_per_task"] == 3  # another prompt count: measured again
    out = tmp_path / "loto"
    loto.main(["--run", str(run), "--data", str(data), "--prompts", "2", "--budgets", "1", "--continuation", "4",
               "--calib", "2", "--out", str(out), "--no-progress"])
    assert set(json.loads((out / "loto.json").read_text())["tasks"]) == {"arithmetic", "translate"}
    (run / "labels" / "task_targets.json").unlink()
    with pytest.raises(FirstEdgeError, match="task_targets.json is missing"):
        loto.loto(run, data, 2, [1], 4, 2, 0, progress=False)


@pytest.mark.parametrize("w", ["2", "-0.5"])
def test_cli_refuses_a_task_weight_outside_0_1(tmp_path, tiny_dir, data_dir, capsys, w):
    from export import finetune as ft

    with pytest.raises(SystemExit) as e:
        ft.main(["--data", str(data_dir), "--out", str(tmp_path / "r"), "--model", str(tiny_dir), "--preset", "tiny",
                 "--task-weight", w])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--task-weight" in err and "between 0 and 1" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r" / "labels").exists()  # refused before measuring


@pytest.mark.parametrize("opt", [["--level-weight", "-1"], ["--level-budget", "0"]])
def test_cli_refuses_a_bad_level_term(tmp_path, tiny_dir, data_dir, capsys, opt):
    from export import finetune as ft

    with pytest.raises(SystemExit) as e:
        ft.main(["--data", str(data_dir), "--out", str(tmp_path / "r"), "--model", str(tiny_dir), "--preset", "tiny",
                 *opt])
    err = capsys.readouterr().err
    assert e.value.code == 2 and opt[0] in err and len(err.strip().splitlines()) == 1
