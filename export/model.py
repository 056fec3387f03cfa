"""The FiRST model: a frozen Llama-family transformer with one tiny router before each layer.

The forward pass is written here on top of the Hugging Face modules (embedding, norms,
projections, MLP, LM head), so peft LoRA adapters on those modules apply, while the attention
and KV cache handling is ours: explicit per-layer K/V in and out, which is what the exported
graphs and the device runtimes use (DESIGN.md sections 1-2).
"""
from __future__ import annotations

import json
import os
import numbers
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from runtime.errors import FirstEdgeError, first_line
from runtime.masks import make_mask, pinned_array, threshold_mask

ROUTER_HIDDEN = 64
ROUTER_INIT_BIAS = 3.0  # sigmoid(3) = 0.95: untrained routers keep every layer at threshold 0.5
ROUTER_FORMAT = 1


def check_pool_start(value, what: str) -> int:
    """``pool_start`` as an int >= 0, or a one-line FirstEdgeError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise FirstEdgeError(f"{what} must be a non-negative integer, got {value!r}")
    return int(value)


class Router(nn.Module):
    """score = sigmoid(fc2(silu(fc1(rmsnorm(h))))); parameter-free RMS normalisation of the input."""

    def __init__(self, hidden_size: int, width: int = ROUTER_HIDDEN, init_bias: float = ROUTER_INIT_BIAS):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, width)
        self.fc2 = nn.Linear(width, 1)
        nn.init.normal_(self.fc2.weight, std=1e-2)
        nn.init.constant_(self.fc2.bias, init_bias)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.fc2(F.silu(self.fc1(x))).squeeze(-1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(h))


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class FirstModel(nn.Module):
    """Wraps a HF CausalLM of the Llama family (llama, mistral, qwen2) and adds routers.

    Shapes: hidden [B, T, D]; K/V caches [B, n_kv_heads, S, head_dim] per layer.
    """

    def __init__(self, hf_model, name: str = "model", threshold: float = 0.5, pinned: Sequence[int] = (),
                 router_width: int = ROUTER_HIDDEN):
        super().__init__()
        cfg = hf_model.config
        self.hf = hf_model
        self.name = name
        self.cfg = cfg
        self.n_layers = cfg.num_hidden_layers
        self.hidden_size = cfg.hidden_size
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or self.hidden_size // self.n_heads
        self.vocab_size = cfg.vocab_size
        self.threshold = float(threshold)
        # g[l] pools p[l, t] over prompt positions t >= min(pool_start, T - 1) (DESIGN.md section 1 and
        # Changes 5): the training side sets it to the length of the chat template's shared prefix
        self.pool_start = 0
        self.register_buffer("pinned_mask", torch.zeros(self.n_layers, dtype=torch.bool), persistent=False)
        self.set_pinned(pinned)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # untrained routers are the same in every run
            self.routers = nn.ModuleList(Router(self.hidden_size, router_width) for _ in range(self.n_layers))
        rot = self.base.rotary_emb
        self.register_buffer("inv_freq", rot.inv_freq.detach().clone().float(), persistent=False)
        self.rope_scale = float(getattr(rot, "attention_scaling", 1.0))
        self.scaling = self.head_dim ** -0.5

    def set_pinned(self, pinned: Sequence[int]):
        """Pin layers (always kept); out-of-range indices are refused by ``runtime.masks.pinned_array``."""
        as_mask = pinned_array(self.n_layers, pinned)
        self.pinned = [int(p) for p in np.flatnonzero(as_mask)]
        self.pinned_mask.copy_(torch.from_numpy(as_mask))

    # ---- module access (works with and without a peft wrapper) ----
    @property
    def base(self):
        m = self.hf
        if hasattr(m, "get_base_model"):
            m = m.get_base_model()
        return m.model

    @property
    def layers(self):
        return self.base.layers

    def lm_head(self, h):
        m = self.hf.get_base_model() if hasattr(self.hf, "get_base_model") else self.hf
        return m.lm_head(h)

    # ---- pieces ----
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.base.embed_tokens(input_ids)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.base.norm(h))

    def rope(self, positions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [B, T, head_dim] for int64 positions [B, T]."""
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.rope_scale, emb.sin() * self.rope_scale

    def layer(self, l: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              past_k: Optional[torch.Tensor] = None, past_v: Optional[torch.Tensor] = None,
              causal: bool = True, cache: Optional[Tuple[torch.Tensor, torch.Tensor, int]] = None,
              attn_mask: Optional[torch.Tensor] = None):
        """One decoder layer. Returns (h_out, k_new, v_new) with K/V of the new positions only.

        Without a past, attention is causal over the T new positions (prefill / training); with a
        past of S positions each new position attends to the whole past and, causally, to the new
        positions (T = 1 in decode). ``cache=(k_buf, v_buf, n)`` instead of a past: the new K/V are
        written in place at positions n.. of preallocated buffers and attention reads the buffers.

        ``attn_mask`` [B, 1, T, S + T] bool (True: may attend) replaces those rules: training's
        prompt cache passes a batch of right-padded pasts with their key-padding (and the causal
        part over the new positions) in it. A past in another dtype than the new K/V is cast to it;
        cos/sin are used in the dtype given (the caller chooses the precision of the rotation).
        """
        lay = self.layers[l]
        att = lay.self_attn
        batch, T, _ = h.shape
        x = lay.input_layernorm(h)
        q = att.q_proj(x).view(batch, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = att.k_proj(x).view(batch, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = att.v_proj(x).view(batch, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * c + rotate_half(q) * s
        k = k * c + rotate_half(k) * s
        if cache is not None:
            kbuf, vbuf, n = cache
            kbuf[:, :, n:n + T] = k
            vbuf[:, :, n:n + T] = v
            past_k = kbuf[:, :, :n]  # marks "has a past" below
            kk, vv = kbuf[:, :, :n + T], vbuf[:, :, :n + T]
        elif past_k is not None:
            kk = torch.cat([past_k.to(k.dtype), k], dim=2)
            vv = torch.cat([past_v.to(v.dtype), v], dim=2)
        else:
            kk, vv = k, v
        rep = self.n_heads // self.n_kv_heads
        if attn_mask is not None:
            # grouped-query attention inside SDPA: no expanded copy of a (long, batched) past
            o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=attn_mask, scale=self.scaling, enable_gqa=rep > 1)
        else:
            if rep > 1:
                S = kk.shape[2]
                kk = kk[:, :, None].expand(batch, self.n_kv_heads, rep, S, self.head_dim).reshape(
                    batch, self.n_heads, S, self.head_dim)
                vv = vv[:, :, None].expand(batch, self.n_kv_heads, rep, S, self.head_dim).reshape(
                    batch, self.n_heads, S, self.head_dim)
            if past_k is None or past_k.shape[2] == 0:
                o = F.scaled_dot_product_attention(q, kk, vv, is_causal=causal and T > 1, scale=self.scaling)
            elif T == 1:
                o = F.scaled_dot_product_attention(q, kk, vv, scale=self.scaling)
            else:
                S = kk.shape[2]
                allowed = torch.ones(T, S, dtype=torch.bool, device=h.device).tril(S - T)
                o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=allowed, scale=self.scaling)
        o = o.transpose(1, 2).reshape(batch, T, self.n_heads * self.head_dim)
        h = h + att.o_proj(o)
        h = h + lay.mlp(lay.post_attention_layernorm(h))
        return h, k, v

    # ---- routing ----
    def router_probs(self, l: int, h: torch.Tensor) -> torch.Tensor:
        """p[l, t] for every position: [B, T]."""
        return self.routers[l](h)

    def _pool_start(self) -> int:
        return check_pool_start(self.pool_start, "pool_start")

    def pool_weights(self, prompt_mask: torch.Tensor) -> torch.Tensor:
        """Pooled positions [B, S] bool for a prompt mask [B, S] (True on each row's prompt, a prefix).

        Row b pools positions t with min(P, Tp_b - 1) <= t < Tp_b, Tp_b its prompt length and P
        ``pool_start``: the user part of the prompt, and always at least its last token.
        """
        pm = prompt_mask.bool()
        S = pm.shape[1]
        Tp = pm.sum(1, keepdim=True)  # [B, 1]
        start = (Tp - 1).clamp(min=0, max=self._pool_start())
        t = torch.arange(S, device=pm.device).unsqueeze(0)
        return (t >= start) & (t < Tp)

    def prefill(self, input_ids: torch.Tensor, threshold: Optional[float] = None):
        """Run every layer over the prompt [1, T].

        Returns logits of the last position [1, V], router scores g [L] (the mean of p[l, t] over
        t in [min(pool_start, T - 1), T)), the threshold mask [L] (pinned layers on) and the per-layer
        K/V lists.
        """
        T = input_ids.shape[1]
        s0 = min(self._pool_start(), T - 1)
        pos = torch.arange(T, dtype=torch.int64, device=input_ids.device).unsqueeze(0)
        cos, sin = self.rope(pos)
        h = self.embed(input_ids)
        scores, ks, vs = [], [], []
        for l in range(self.n_layers):
            scores.append(self.router_probs(l, h)[:, s0:].mean(dim=1)[0])
            h, k, v = self.layer(l, h, cos, sin)
            ks.append(k)
            vs.append(v)
        g = torch.stack(scores)
        thr = self.threshold if threshold is None else threshold
        mask = torch.from_numpy(threshold_mask(g.detach().cpu().numpy(), thr, self.pinned))
        logits = self.head(h[:, -1:, :])[:, 0]
        return logits, g, mask, ks, vs

    def mask_for(self, scores, threshold=None, keep=None) -> np.ndarray:
        g = scores.detach().float().cpu().numpy() if torch.is_tensor(scores) else np.asarray(scores)
        return make_mask(g, threshold=threshold, keep=keep, pinned=self.pinned, default_threshold=self.threshold)

    # ---- training / inference equivalence ----
    def mixed_forward(self, input_ids: torch.Tensor, prompt_mask: torch.Tensor,
                      gates: Optional[torch.Tensor] = None,
                      gate_fn: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None,
                      return_hidden: bool = False):
        """Full-sequence forward over prompt + completion (DESIGN.md section 1).

        input_ids [B, S] (right padded), prompt_mask [B, S] True on prompt positions (a prefix).
        Prompt positions pass every layer; completion positions mix ``h + gate[l] * (layer_l(h) - h)``.
        The gate of layer l is ``gates[:, l]`` ([B, L] or [L]) or ``gate_fn(l, g_l)`` where g_l [B] is
        the router score at layer l pooled over ``pool_weights(prompt_mask)``. Returns (logits [B, S, V],
        scores g [B, L], gates [B, L]).
        With hard 0/1 gates this equals the KV-cache generator exactly.
        """
        B, S = input_ids.shape
        pos = torch.arange(S, dtype=torch.int64, device=input_ids.device).unsqueeze(0).expand(B, S)
        cos, sin = self.rope(pos)
        h = self.embed(input_ids)
        pm = prompt_mask.to(h.dtype)
        comp = (1.0 - pm).unsqueeze(-1)
        pw = self.pool_weights(prompt_mask).to(h.dtype)
        denom = pw.sum(1).clamp_min(1.0)
        all_g, all_gate = [], []
        for l in range(self.n_layers):
            p = self.router_probs(l, h)
            g = (p * pw).sum(1) / denom
            if gates is not None:
                gl = gates[..., l] if gates.dim() == 2 else gates[l].expand(B)
            elif gate_fn is not None:
                gl = gate_fn(l, g)
            else:
                gl = torch.ones_like(g)
            gl = gl.to(h.dtype)
            out, _, _ = self.layer(l, h, cos, sin)
            # prompt positions: always the layer output; completion: mixed by the gate
            mix = gl.view(B, 1, 1) * comp + (1.0 - comp)
            h = h + mix * (out - h)
            all_g.append(g)
            all_gate.append(gl)
        logits = self.head(h)
        res = (logits, torch.stack(all_g, 1), torch.stack(all_gate, 1))
        return res + (h,) if return_hidden else res

    # ---- router persistence ----
    def identity(self) -> dict:
        from .loading import model_fingerprint

        base = self.hf.get_base_model() if hasattr(self.hf, "get_base_model") else self.hf
        return {"name": self.name, "model_type": self.cfg.model_type, "n_layers": self.n_layers,
                "hidden_size": self.hidden_size, "vocab_size": self.vocab_size,
                "fingerprint": model_fingerprint(base)}

    def save_routers(self, path, extra: Optional[dict] = None):
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().contiguous().float() for k, v in self.routers.state_dict().items()}
        cfg = {"format": ROUTER_FORMAT, "base_model": self.identity(), "router_width": self.routers[0].fc1.out_features,
               "threshold": self.threshold, "pinned": self.pinned, "pool_start": self._pool_start()}
        if extra:
            cfg.update(extra)
        # write-then-rename, routers.json last: a run folder with routers.json holds complete routers
        tmp = path / "routers.safetensors.tmp"
        save_file(sd, str(tmp))
        os.replace(tmp, path / "routers.safetensors")
        tmp = path / "routers.json.tmp"
        tmp.write_text(json.dumps(cfg, indent=2))
        os.replace(tmp, path / "routers.json")

    def load_routers(self, path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        if path.is_file():
            path = path.parent
        cfg_file, w_file = path / "routers.json", path / "routers.safetensors"
        if not cfg_file.exists() or not w_file.exists():
            raise FirstEdgeError(f"no routers in {path} (expected routers.json and routers.safetensors)")
        try:
            cfg = json.loads(cfg_file.read_text())
        except ValueError as e:
            raise FirstEdgeError(f"{cfg_file} is not valid JSON: {e}") from None
        mine, theirs = self.identity(), cfg.get("base_model", {})
        for key in ("model_type", "n_layers", "hidden_size", "vocab_size", "fingerprint"):
            if theirs.get(key) != mine.get(key):
                raise FirstEdgeError(
                    f"routers in {path} were trained for another base model ({theirs.get('name')}, "
                    f"{key}={theirs.get(key)}), not this one ({mine['name']}, {key}={mine.get(key)})")
        # absent in checkpoints from before the pooling change: 0 (every prompt token pooled)
        P = check_pool_start(cfg.get("pool_start", 0), f"{cfg_file}: pool_start")
        width = int(cfg.get("router_width", ROUTER_HIDDEN))
        if width != self.routers[0].fc1.out_features:
            self.routers = nn.ModuleList(Router(self.hidden_size, width) for _ in range(self.n_layers))
        try:
            sd = load_file(str(w_file))
            self.routers.load_state_dict(sd)
        except (SafetensorError, RuntimeError, OSError) as e:
            raise FirstEdgeError(f"cannot read router weights {w_file}: {first_line(e, 200)}") from None
        self.threshold = float(cfg.get("threshold", self.threshold))
        self.set_pinned(cfg.get("pinned", []))
        self.pool_start = P
        return cfg


def bf16_working_copy(fm: FirstModel) -> FirstModel:
    """A copy of ``fm`` whose frozen base is bf16 and whose routers are ``fm``'s own (fp32, shared):
    what training and scoring run where bf16 is fast (autocast would convert every weight at every
    call); ``fm`` keeps its fp32 weights."""
    import copy

    routers, fm.routers = fm.routers, None
    try:
        work = copy.deepcopy(fm)
    finally:
        fm.routers = routers
    work.routers = routers
    work.hf.to(torch.bfloat16)
    return work


def build_first_model(model: Optional[str] = None, routers: Optional[str] = None, verbose: bool = True,
                      lora: Optional[str] = None) -> Tuple[FirstModel, object]:
    """Load a base model (folder or embedded default), wrap it, optionally load routers/LoRA."""
    from .loading import load_model

    lm = load_model(model, verbose=verbose)
    hf = lm.model
    if lora:
        hf = attach_lora(hf, lora)
    fm = FirstModel(hf, name=lm.name)
    if routers:
        cfg = fm.load_routers(routers)
        lora_dir = Path(routers) / "lora"
        if lora is None and cfg.get("lora") and lora_dir.exists():
            fm.hf = attach_lora(lm.model, lora_dir)
    fm.eval()
    return fm, lm.tokenizer


def attach_lora(hf, lora_dir):
    try:
        from peft import PeftModel
    except ImportError as e:  # pragma: no cover
        raise FirstEdgeError("LoRA adapters need the 'peft' package") from e
    try:
        pm = PeftModel.from_pretrained(hf, str(lora_dir))
    except Exception as e:  # noqa: BLE001
        raise FirstEdgeError(f"cannot load the LoRA adapter in {lora_dir}: {first_line(e, 200)}") from None
    # merge for inference: the same math, plain modules (exports see ordinary Linear layers)
    merged = pm.merge_and_unload()
    for prm in merged.parameters():
        prm.requires_grad_(False)
    return merged
