"""Tiny randomly initialised Llama-family models for fast tests."""
from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 96


def tiny_config(arch: str = "llama", layers: int = 6, **kw):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    common.update(kw)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "mistral":
        return MistralConfig(sliding_window=None, **common)
    if arch == "qwen2":
        return Qwen2Config(use_sliding_window=False, **common)
    raise ValueError(arch)


def tiny_hf(arch: str = "llama", seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(arch, **kw)
    cfg._attn_implementation = "sdpa"
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # larger weights than the default init so that hidden states differ across layers
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def tiny_first(arch: str = "llama", seed: int = 0, **kw):
    from export.model import FirstModel

    return FirstModel(tiny_hf(arch, seed, **kw), name=f"tiny-{arch}").eval()


def randomize_routers(fm, seed: int = 0, spread: float = 3.0):
    """Hand-set routers whose scores straddle 0.5, so thresholds give mixed masks."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for r in fm.routers:
            r.fc1.weight.copy_(torch.randn(r.fc1.weight.shape, generator=g) * 0.3)
            r.fc2.weight.copy_(torch.randn(r.fc2.weight.shape, generator=g) * spread / r.fc2.weight.shape[1] ** 0.5)
            r.fc2.bias.fill_(float(torch.randn(1, generator=g)) * 1.5)
    return fm


def tiny_tokenizer_json() -> str:
    """A word-level tokenizer over VOCAB tokens, in tokenizers' JSON format."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<|user|>": 3, "<|assistant|>": 4}
    for i in range(len(vocab), VOCAB):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str()


def save_tiny_model_dir(path: Path, arch: str = "llama", seed: int = 0, **kw) -> Path:
    """A complete local HF folder (config, safetensors, tokenizer with a chat template)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    m = tiny_hf(arch, seed, **kw)
    m.save_pretrained(path, safe_serialization=True)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tiny_tokenizer_json()),
                                  bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>")
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}<|user|> {{ m['content'] }} "
                         "{% else %}<|assistant|> {{ m['content'] }} </s> {% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|> {% endif %}")
    tok.save_pretrained(path)
    return path


def to_tiny_vocab(text: str) -> str:
    """The same text in the tiny tokenizer's words: each word (and each punctuation run) becomes a
    fixed ``w<i>``, so lengths and repetitions survive. Real text fed to the tiny tokenizer would be
    all ``<unk>``: every position identical, attention independent of q/k, and gradients that are
    rounding noise."""
    import re
    import zlib

    return " ".join(f"w{5 + zlib.crc32(w.encode()) % (VOCAB - 5)}" for w in re.findall(r"\w+|[^\w\s]+", text))


def tiny_vocab_data(src: Path, dst: Path, tasks=("arithmetic", "translate"), n: int = 6) -> Path:
    """The first n records of each split of the shared task data, rewritten into the tiny vocabulary
    (metrics and record structure kept)."""
    for t in tasks:
        (dst / t).mkdir(parents=True, exist_ok=True)
        for split in ("train", "val"):
            out = []
            for line in (Path(src) / t / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()[:n]:
                r = json.loads(line)
                r["prompt"], r["completion"] = to_tiny_vocab(r["prompt"]), to_tiny_vocab(r["completion"])
                r["references"] = [to_tiny_vocab(x) for x in r.get("references") or [r["completion"]]]
                out.append(json.dumps(r))
            (dst / t / f"{split}.jsonl").write_text("\n".join(out) + "\n", encoding="utf-8")
    return dst


def words(n: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(f"w{int(i)}" for i in torch.randint(5, VOCAB, (n,), generator=g))
