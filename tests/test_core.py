"""FiRST core: mask semantics, reference generator, training/inference equivalence."""
import numpy as np
import pytest
import torch

from export.reference import TorchBackend
from export.model import FirstModel
from helpers import VOCAB, randomize_routers, tiny_first
from runtime.errors import FirstEdgeError
from runtime.loop import SamplingConfig, generate
from runtime.masks import budget_mask, check_mask, make_mask, parse_mask, threshold_mask

ARCHS = ["llama", "mistral", "qwen2"]


def rand_ids(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


# ---------------------------------------------------------------- base-model equivalence
@pytest.mark.parametrize("arch", ARCHS)
def test_all_ones_greedy_matches_transformers_tiny(arch):
    fm = tiny_first(arch)
    fm.hf.generation_config.eos_token_id = None  # no EOS stop/suppression: compare all 12 tokens
    for seed in range(5):
        ids = rand_ids(7 + seed, seed)
        ref = fm.hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                             pad_token_id=0)[0, len(ids):].tolist()
        res = generate(TorchBackend(fm, 64), ids, SamplingConfig(max_new_tokens=12, ignore_eos=True),
                       mask=np.ones(fm.n_layers, bool))
        assert res.tokens == ref, (arch, seed)


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_logits_match_transformers(arch):
    fm = tiny_first(arch)
    ids = torch.tensor([rand_ids(11, 3)])
    ref = fm.hf(ids).logits[:, -1]
    logits, g, mask, ks, vs = fm.prefill(ids)
    assert torch.allclose(logits, ref, atol=1e-5)
    assert len(ks) == fm.n_layers and ks[0].shape == (1, fm.n_kv_heads, 11, fm.head_dim)


@pytest.mark.slow
def test_all_ones_greedy_matches_transformers_default_model(default_model):
    from export.chat import encode_prompt
    from export.reference import run_generation

    fm, tok = default_model
    prompts = ["What is the capital of France?", "Write a haiku about the sea.",
               "Translate 'good morning' into German.", "List three prime numbers.",
               "Summarize: The cat sat on the mat all afternoon and refused to move.",
               "What is 12 times 7?"]
    for p in prompts:
        ids = encode_prompt(tok, p)
        ref = fm.hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
        res = run_generation(fm, tok, p, max_new_tokens=16)
        assert res.layers_kept == fm.n_layers  # untrained routers keep every layer
        assert res.tokens[:len(ref)] == ref, p


# ---------------------------------------------------------------- masks
def test_untrained_routers_keep_every_layer():
    fm = tiny_first("llama")
    _, g, mask, _, _ = fm.prefill(torch.tensor([rand_ids(9, 1)]))
    assert bool(mask.all()) and float(g.min()) > 0.9


def test_threshold_and_budget_masks_on_hand_set_scores():
    s = np.array([0.9, 0.2, 0.5, 0.7, 0.5, 0.1], np.float32)
    assert threshold_mask(s, 0.5).tolist() == [True, False, True, True, True, False]
    assert threshold_mask(s, 0.75).tolist() == [True, False, False, False, False, False]
    assert threshold_mask(s, 0.75, pinned=[5]).tolist() == [True, False, False, False, False, True]
    # budget: the k highest, ties (0.5 at layers 2 and 4) broken by the lower index
    assert budget_mask(s, 3).tolist() == [True, False, True, True, False, False]
    assert budget_mask(s, 1).tolist() == [True, False, False, False, False, False]
    # pinned layers take their slots first
    assert budget_mask(s, 3, pinned=[5]).tolist() == [True, False, False, True, False, True]
    assert budget_mask(np.full(6, 0.95, np.float32), 2).tolist() == [True, True, False, False, False, False]
    assert make_mask(s, keep=6).all()
    with pytest.raises(FirstEdgeError, match="either a threshold or a layer budget"):
        make_mask(s, threshold=0.5, keep=2)
    with pytest.raises(FirstEdgeError, match="between 1 and the number of layers"):
        budget_mask(s, 7)
    with pytest.raises(FirstEdgeError, match="smaller than the number of pinned"):
        budget_mask(s, 1, pinned=[0, 1])
    with pytest.raises(FirstEdgeError, match="out of range"):
        threshold_mask(s, 0.5, pinned=[6])


def test_model_mask_threshold_budget_and_pinned():
    fm = randomize_routers(tiny_first("llama", layers=8), seed=2)
    ids = torch.tensor([rand_ids(10, 4)])
    _, g, mask, _, _ = fm.prefill(ids, threshold=0.5)
    assert mask.tolist() == (g >= 0.5).tolist()
    assert 0 < int(mask.sum()) < fm.n_layers, "hand-set routers should give a mixed mask"
    low = int(torch.argmin(g))
    fm.set_pinned([low])
    _, g2, mask2, _, _ = fm.prefill(ids, threshold=1.1)  # nothing passes: only the pinned layer
    assert mask2.tolist() == [i == low for i in range(fm.n_layers)]
    m = fm.mask_for(g2, keep=3)
    top = sorted(int(i) for i in torch.argsort(g2, descending=True)[:2])
    assert sorted(np.flatnonzero(m).tolist()) == sorted({low, *top})
    # the model applies the one rule of runtime.masks (threshold and pinned check)
    for thr in (0.3, 0.5, 0.7):
        _, g3, mask3, _, _ = fm.prefill(ids, threshold=thr)
        assert mask3.dtype == torch.bool
        assert mask3.tolist() == threshold_mask(g3.detach().numpy(), thr, [low]).tolist()
    with pytest.raises(FirstEdgeError, match="pinned layer 8 is out of range for a model with 8 layers"):
        fm.set_pinned([1, 8])
    assert fm.pinned == [low] and fm.pinned_mask.tolist() == [i == low for i in range(fm.n_layers)]
    fm.set_pinned([3, 1, 3])
    assert fm.pinned == [1, 3]


def test_mask_validation_errors():
    with pytest.raises(FirstEdgeError, match="length 3, the model has 4 layers"):
        check_mask([1, 0, 1], 4)
    with pytest.raises(FirstEdgeError, match="only 0/1"):
        check_mask([1, 2, 0, 1], 4)
    with pytest.raises(FirstEdgeError, match="only the characters 0 and 1"):
        parse_mask("10x1", 4)
    fm = tiny_first("llama")
    with pytest.raises(FirstEdgeError, match="layer mask has length 2"):
        generate(TorchBackend(fm, 32), rand_ids(5, 0), SamplingConfig(max_new_tokens=2), mask=[True, False])


# ---------------------------------------------------------------- generator vs mixed forward
@pytest.mark.parametrize("arch", ARCHS)
def test_kv_cache_generator_equals_mixed_forward_with_hard_gates(arch):
    fm = tiny_first(arch, layers=6)
    rng = np.random.default_rng(0)
    for trial in range(4):
        mask = rng.random(fm.n_layers) < 0.5
        mask[rng.integers(fm.n_layers)] = True
        ids = rand_ids(6 + trial, 10 + trial)
        res = generate(TorchBackend(fm, 64), ids, SamplingConfig(max_new_tokens=10, ignore_eos=True),
                       mask=mask, keep_logits=True)
        full = torch.tensor([ids + res.tokens])
        pm = torch.zeros_like(full, dtype=torch.bool)
        pm[:, :len(ids)] = True
        with torch.no_grad():
            logits, _, gates = fm.mixed_forward(full, pm, gates=torch.tensor(mask, dtype=torch.float32))
        gen = np.stack([res.first_logits] + res.step_logits)  # predictions at positions len(ids)-1 ...
        ref = logits[0, len(ids) - 1: len(ids) - 1 + len(gen)].numpy()
        assert np.abs(gen - ref).max() <= 1e-4, (arch, trial, np.abs(gen - ref).max())


def test_mixed_forward_batch_matches_single_and_gate_fn():
    fm = randomize_routers(tiny_first("llama"), seed=1)
    a, b = rand_ids(12, 1), rand_ids(9, 2)
    batch = torch.tensor([a, b + [0] * 3])
    pm = torch.zeros_like(batch, dtype=torch.bool)
    pm[0, :5] = True
    pm[1, :4] = True
    hard = lambda l, g: (g >= 0.5).float()  # noqa: E731
    with torch.no_grad():
        lb, gb, gatesb = fm.mixed_forward(batch, pm, gate_fn=hard)
        l1, g1, gates1 = fm.mixed_forward(batch[1:, :9], pm[1:, :9], gate_fn=hard)
        _, gref, _, _, _ = fm.prefill(batch[1:, :4])
    assert torch.allclose(lb[1, :9], l1[0], atol=1e-5)
    assert torch.allclose(gb[1], g1[0], atol=1e-6)
    assert torch.allclose(g1[0], gref, atol=1e-6), "training scores = prefill scores of the prompt"
    assert gatesb[1].tolist() == (gref >= 0.5).float().tolist()


# ---------------------------------------------------------------- pooling past the shared chat prefix
def _direct_router_probs(fm, ids):
    """p[l, t] [L, T] for a prompt, layer by layer (independent of FirstModel.prefill's pooling)."""
    ids = torch.tensor([ids])
    T = ids.shape[1]
    cos, sin = fm.rope(torch.arange(T).unsqueeze(0))
    h = fm.embed(ids)
    ps = []
    for l in range(fm.n_layers):
        ps.append(fm.router_probs(l, h)[0])
        h, _, _ = fm.layer(l, h, cos, sin)
    return torch.stack(ps).numpy()


def test_pool_weights_start_at_pool_start_and_keep_the_last_prompt_token():
    fm = tiny_first("llama", layers=2)
    pm = torch.zeros(4, 9, dtype=torch.bool)
    for b, n in enumerate((9, 5, 3, 0)):
        pm[b, :n] = True
    assert torch.equal(fm.pool_weights(pm), pm)  # P = 0: every prompt position
    fm.pool_start = 4
    want = torch.zeros(4, 9, dtype=torch.bool)
    want[0, 4:9] = True  # [P, T)
    want[1, 4:5] = True  # T = P + 1
    want[2, 2:3] = True  # T <= P: only the last prompt token
    assert torch.equal(fm.pool_weights(pm), want)
    fm.pool_start = -1
    with pytest.raises(FirstEdgeError, match="pool_start must be a non-negative integer"):
        fm.pool_weights(pm)


@torch.no_grad()
def test_prefill_scores_pool_from_pool_start():
    fm = randomize_routers(tiny_first("llama"), seed=2)
    P = 5
    for T in (12, P + 1, P, 2, 1):
        ids = rand_ids(T, 40 + T)
        p = _direct_router_probs(fm, ids)
        fm.pool_start = 0
        g0 = fm.prefill(torch.tensor([ids]))[1].numpy()
        fm.pool_start = P
        g = fm.prefill(torch.tensor([ids]))[1].numpy()
        np.testing.assert_allclose(g0, p.mean(1), atol=1e-6)
        np.testing.assert_allclose(g, p[:, P:].mean(1) if T > P else p[:, -1], atol=1e-6)
        if T > 1:
            assert np.abs(g - g0).max() > 1e-3, T  # the shared prefix is really left out


@torch.no_grad()
def test_mixed_forward_scores_equal_prefill_scores_with_pool_start():
    """Batched, right padded, prompts shorter than, equal to and longer than P: training g == generator g."""
    fm = randomize_routers(tiny_first("llama"), seed=5)
    fm.pool_start = 4
    rows = [(rand_ids(11, 1), 8), (rand_ids(7, 2), 3), (rand_ids(9, 3), 4), (rand_ids(5, 4), 1)]
    S = max(len(r) for r, _ in rows)
    batch = torch.tensor([r + [0] * (S - len(r)) for r, _ in rows])
    pm = torch.zeros_like(batch, dtype=torch.bool)
    for b, (_, n) in enumerate(rows):
        pm[b, :n] = True
    _, g, _ = fm.mixed_forward(batch, pm, gate_fn=lambda l, g: (g >= 0.5).float())
    for b, (r, n) in enumerate(rows):
        gref = fm.prefill(torch.tensor([r[:n]]))[1]
        assert torch.allclose(g[b], gref, atol=1e-6), b


def test_soft_gates_carry_gradient_to_routers():
    fm = randomize_routers(tiny_first("llama"), seed=3)
    ids = torch.tensor([rand_ids(10, 5)])
    pm = torch.zeros_like(ids, dtype=torch.bool)
    pm[:, :6] = True
    logits, g, gates = fm.mixed_forward(ids, pm, gate_fn=lambda l, g: g)
    loss = torch.nn.functional.cross_entropy(logits[0, 5:-1], ids[0, 6:])
    loss.backward()
    assert all(r.fc1.weight.grad is not None and r.fc1.weight.grad.abs().sum() > 0 for r in fm.routers)


# ---------------------------------------------------------------- real skipping
def test_skipped_layers_not_executed_and_caches_stay_at_prompt_length():
    fm = tiny_first("llama", layers=6)
    calls = {l: 0 for l in range(fm.n_layers)}
    hooks = [fm.layers[l].mlp.register_forward_hook(lambda m, i, o, l=l: calls.__setitem__(l, calls[l] + 1))
             for l in range(fm.n_layers)]
    try:
        be = TorchBackend(fm, 64)
        mask = np.array([1, 0, 1, 1, 0, 0], bool)
        ids = rand_ids(8, 7)
        res = generate(be, ids, SamplingConfig(max_new_tokens=9, ignore_eos=True), mask=mask)
    finally:
        for h in hooks:
            h.remove()
    steps = len(res.tokens) - 1
    assert steps == 8
    for l in range(fm.n_layers):
        expect = 1 + (steps if mask[l] else 0)  # prefill runs every layer once
        assert calls[l] == expect, (l, calls[l])
        assert be.lengths[l] == len(ids) + (steps if mask[l] else 0)
        assert be.layer_calls[l] == (steps if mask[l] else 0)
    # a skipped layer's buffer beyond the prompt was never written
    assert float(be.k[1][:, :, len(ids):].abs().sum()) == 0.0
    assert float(be.k[0][:, :, len(ids):len(ids) + steps].abs().sum()) > 0.0


# ---------------------------------------------------------------- sampling, stopping, context
def test_sampling_is_seeded_and_top_p_restricts():
    fm = tiny_first("llama")
    ids = rand_ids(6, 0)
    cfg = lambda s: SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=s, ignore_eos=True)  # noqa
    a = generate(TorchBackend(fm, 64), ids, cfg(1)).tokens
    b = generate(TorchBackend(fm, 64), ids, cfg(1)).tokens
    c = generate(TorchBackend(fm, 64), ids, cfg(2)).tokens
    assert a == b and a != c
    from runtime.loop import Sampler
    s = Sampler(SamplingConfig(temperature=1.0, top_p=0.8, seed=0))  # mass 0.51, 0.98, ...: nucleus {0, 1}
    logits = np.array([5.0, 4.9, 0.0, -1.0])
    picks = {s(logits) for _ in range(200)}
    assert picks <= {0, 1} and len(picks) == 2


def test_eos_stops_and_stream_callback_and_context_limit():
    fm = tiny_first("llama")
    ids = rand_ids(6, 0)
    first = generate(TorchBackend(fm, 64), ids, SamplingConfig(max_new_tokens=5, ignore_eos=True)).tokens
    seen = []
    eos = first[2]
    res = generate(TorchBackend(fm, 64), ids, SamplingConfig(max_new_tokens=5, eos_ids=[eos]),
                   on_token=seen.append)
    assert res.tokens == first[:first.index(eos) + 1] and res.stop_reason == "eos" and seen == res.tokens
    with pytest.raises(FirstEdgeError, match="longer than the context of 16 tokens"):
        generate(TorchBackend(fm, 16), rand_ids(20, 1), SamplingConfig(max_new_tokens=2))
    res = generate(TorchBackend(fm, 10), ids, SamplingConfig(max_new_tokens=50, ignore_eos=True))
    assert res.stop_reason == "max_context" and len(ids) + len(res.tokens) == 11


def test_reply_stops_at_end_of_turn_when_eos_is_ignored():
    """A timed run decodes a fixed count past the end of turn; the reply shown stops there."""
    fm = tiny_first("llama")
    ids = rand_ids(6, 0)
    res = generate(TorchBackend(fm, 64), ids, SamplingConfig(max_new_tokens=8, ignore_eos=True))
    assert len(res.tokens) == 8
    eos = res.tokens[3]
    cut = res.tokens.index(eos)
    assert res.reply_tokens([eos]) == res.tokens[:cut]
    assert res.reply_tokens([VOCAB + 5]) == res.tokens  # no end token: the whole output
    assert res.reply_tokens([]) == res.tokens
