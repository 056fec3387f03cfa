"""Shared harness (adapted for FiRST-Edge bench/ from the measured peer harness) for the peer_<runtime>.py decode-speed scripts.

Every runtime script:
  * feeds the SAME prompt token ids (chat-formatted, 58 tokens, tokenised with
    the model's own tokenizer.json) to its runtime,
  * greedy-decodes exactly N_NEW (=128) new tokens, EOS ignored where the API
    allows it (the script reports the real count in "new_tokens"),
  * uses N_THREADS (=2) threads,
  * does 1 warm-up run + 3 timed runs and reports medians,
  * runs the measurement in a child process under `/usr/bin/time -v` and
    reports that child's "Maximum resident set size" as peak_rss_mb.

Timing definitions (identical for every runtime):
  prefill_ms   = time from "start generating" to the first new token being
                 available (prompt forward pass + first greedy pick)
  decode_tok_s = (new_tokens - 1) / (time from first to last new token)

Output: one JSON line on stdout:
  {"runtime", "prefill_ms", "decode_tok_s", "new_tokens", "peak_rss_mb", "text", ...extras}
"""
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = os.path.dirname(os.path.abspath(__file__))
_CACHE = os.environ.get("FIRST_EDGE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "first-edge"))
# the model as a Hugging Face folder (fp32 safetensors); default: FiRST-Edge's converted default model
HF_DIR = os.environ.get("SMOLLM2_HF", os.path.join(_CACHE, "models", "SmolLM2-135M-Instruct"))
ART = os.environ.get("PEER_ARTIFACTS", os.path.join(_CACHE, "peers", "artifacts"))
LOGS = os.path.join(ART, "logs")
N_NEW = int(os.environ.get("PEER_NEW_TOKENS", "128"))
N_THREADS = int(os.environ.get("PEER_THREADS", "2"))
N_RUNS = int(os.environ.get("PEER_RUNS", "3"))
N_WARMUP = int(os.environ.get("PEER_WARMUP", "1"))
EOS_ID = 2  # <|im_end|>

USER_MSG = (
    "Explain in a few short paragraphs how a rainbow forms, why its colors "
    "always appear in the same order, and why the sky is blue."
)
# Exactly what chat_template.jinja renders for [{"role":"user","content":USER_MSG}]
# with add_generation_prompt=True.
PROMPT_TEXT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
    "Hugging Face<|im_end|>\n<|im_start|>user\n" + USER_MSG + "<|im_end|>\n"
    "<|im_start|>assistant\n"
)

_tok = None


def tokenizer():
    global _tok
    if _tok is None:
        from tokenizers import Tokenizer

        _tok = Tokenizer.from_file(os.path.join(HF_DIR, "tokenizer.json"))
    return _tok


def prompt_ids():
    return tokenizer().encode(PROMPT_TEXT, add_special_tokens=False).ids


def detok(ids):
    return tokenizer().decode(list(ids), skip_special_tokens=False)


def bench(gen_once):
    """gen_once() -> (t_start, [t_token_0, ..., t_token_n-1], [token ids]).

    Timestamps from time.perf_counter(). Returns summary dict.
    """
    for _ in range(N_WARMUP):
        gen_once()
    pre, dec, runs = [], [], []
    toks = None
    for _ in range(N_RUNS):
        t0, ts, toks = gen_once()
        n = len(ts)
        pre.append((ts[0] - t0) * 1e3)
        dec.append((n - 1) / (ts[-1] - ts[0]) if n > 1 else float("nan"))
        runs.append({"prefill_ms": round(pre[-1], 2), "decode_tok_s": round(dec[-1], 2)})
    return {
        "prefill_ms": round(statistics.median(pre), 2),
        "decode_tok_s": round(statistics.median(dec), 2),
        "new_tokens": len(toks),
        "text": detok(toks)[:80],
        "runs": runs,
    }


def _emit(d):
    print(json.dumps(d, ensure_ascii=False), flush=True)


def main(runtime, measure, prepare=None, argv=None):
    """measure() -> dict from bench() plus extras. prepare(): build artifacts (own process)."""
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get("PEER_CHILD") == "1":
        res = measure()
        out = {"runtime": runtime}
        out.update(res)
        out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        out["threads"] = N_THREADS
        out["prompt_tokens"] = len(prompt_ids())
        _emit(out)
        return
    if "--prepare-only" in argv:
        if prepare:
            prepare()
        return
    # 1) build artifacts (export/convert/quantize) in a separate process, not measured
    if prepare is not None and "--no-prepare" not in argv:
        subprocess.run([sys.executable, sys.argv[0], "--prepare-only"] + argv, check=True)
    # 2) measure in a child under /usr/bin/time -v
    load = os.getloadavg()
    env = dict(os.environ, PEER_CHILD="1")
    p = subprocess.run(
        ["/usr/bin/time", "-v", sys.executable, sys.argv[0]] + argv,
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    if p.returncode != 0:
        sys.stderr.write(p.stderr[-6000:])
        _emit({"runtime": runtime, "error": "child failed rc=%d" % p.returncode,
               "stderr_tail": p.stderr[-800:]})
        sys.exit(1)
    line = [l for l in p.stdout.splitlines() if l.startswith("{")][-1]
    out = json.loads(line)
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    if m:
        out["peak_rss_mb"] = round(int(m.group(1)) / 1024, 1)
    out["load_avg_1m_before"] = round(load[0], 2)
    # key order: required keys first
    keys = ["runtime", "prefill_ms", "decode_tok_s", "new_tokens", "peak_rss_mb", "text"]
    ordered = {k: out[k] for k in keys if k in out}
    ordered.update({k: v for k, v in out.items() if k not in ordered})
    _emit(ordered)


def arg(name, default=None, argv=None):
    argv = sys.argv[1:] if argv is None else argv
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return default


def hf_dir_v4():
    """transformers<5 (needed by optimum-onnx) cannot read the v5 config of $SMOLLM2_HF:
    it has "rope_parameters" instead of "rope_theta" (v4 would silently use theta=10000!)
    and tokenizer_class "TokenizersBackend". Make a patched copy (weights symlinked)."""
    import json

    d = os.path.join(ART, "smollm2-hf-v4")
    if os.path.exists(os.path.join(d, "config.json")):
        return d
    os.makedirs(d, exist_ok=True)
    for f in ("model.safetensors", "tokenizer.json", "generation_config.json", "chat_template.jinja"):
        src, dst = os.path.join(HF_DIR, f), os.path.join(d, f)
        if os.path.exists(src) and not os.path.exists(dst):
            os.symlink(src, dst)
    c = json.load(open(os.path.join(HF_DIR, "config.json")))
    rp = c.pop("rope_parameters", None) or {}
    c.setdefault("rope_theta", rp.get("rope_theta", 10000.0))
    c["rope_scaling"] = None if rp.get("rope_type", "default") == "default" else rp
    c["torch_dtype"] = c.get("dtype", "float32")
    json.dump(c, open(os.path.join(d, "config.json"), "w"), indent=2)
    t = json.load(open(os.path.join(HF_DIR, "tokenizer_config.json")))
    for k in ("backend", "is_local"):
        t.pop(k, None)
    t["tokenizer_class"] = "GPT2Tokenizer"
    t["add_prefix_space"] = False
    json.dump(t, open(os.path.join(d, "tokenizer_config.json"), "w"), indent=2)
    return d
