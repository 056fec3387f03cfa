#!/usr/bin/env python
"""onnxruntime-genai (CPU) with a model made by its own model builder.

Runs in venv-genai (bench/peers/setup.sh genai; the 0.18.0 builder imports Qwen3_5* classes => needs transformers 5.x).
PITFALL: with transformers 5.x the builder finds no `config.rope_theta` attribute (v5 moved it
into config.rope_parameters) and SILENTLY builds RoPE cos/sin caches with theta=10000 instead of
100000 (garbage text, same speed). We run the builder through a tiny wrapper that copies
rope_parameters["rope_theta"] back onto the config object (BUILDER_WRAPPER below).

Build (separate process, cached, log in logs/ortgenai_build_<variant>.log):
  python -m onnxruntime_genai.models.builder -i <v4 copy of $SMOLLM2_HF> -o artifacts/ortgenai_<v>
         -p fp32|int4 -e cpu     (int4 = MatMulNBits, block 32, symmetric, accuracy_level 4 = int8 activations)
Run: og.Generator, greedy, min_length = max_length = prompt + 128 (EOS ignored),
     decoder session intra_op_num_threads=2 (written into genai_config.json).

usage: python peer_ortgenai.py [--variant fp32|int4]
"""
import json
import os
import shutil
import subprocess
import sys
import time

import peer_common as C

VARIANT = C.arg("--variant", "fp32")
OUT_DIR = os.path.join(C.ART, "ortgenai_" + VARIANT)


BUILDER_WRAPPER = r"""
import runpy, sys, transformers
_orig = transformers.AutoConfig.from_pretrained.__func__
def _fp(cls, *a, **k):
    c = _orig(cls, *a, **k)
    rp = getattr(c, "rope_parameters", None) or {}
    if not hasattr(c, "rope_theta") and "rope_theta" in rp:
        c.rope_theta = rp["rope_theta"]
        print("[wrapper] set config.rope_theta =", c.rope_theta, flush=True)
    return c
transformers.AutoConfig.from_pretrained = classmethod(_fp)
sys.argv = ["builder"] + sys.argv[1:]
runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)
"""


def prepare():
    if os.path.exists(os.path.join(OUT_DIR, "genai_config.json")):
        return
    src = C.HF_DIR
    tmp = OUT_DIR + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(C.LOGS, exist_ok=True)
    log = os.path.join(C.LOGS, "ortgenai_build_%s.log" % VARIANT)
    t = time.time()
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-c", BUILDER_WRAPPER, "-i", src, "-o", tmp,
                        "-p", VARIANT, "-e", "cpu", "-c", os.path.join(C.ART, "ortgenai_cache")],
                       stdout=f, stderr=subprocess.STDOUT, check=True)
    os.rename(tmp, OUT_DIR)
    print("built %s in %.0fs (log %s)" % (OUT_DIR, time.time() - t, log), file=sys.stderr)


def measure():
    import onnxruntime_genai as og

    cfg_path = os.path.join(OUT_DIR, "genai_config.json")
    cfg = json.load(open(cfg_path))
    so = cfg["model"]["decoder"]["session_options"]
    if so.get("intra_op_num_threads") != C.N_THREADS:
        so["intra_op_num_threads"] = C.N_THREADS
        so["inter_op_num_threads"] = 1
        json.dump(cfg, open(cfg_path, "w"), indent=4)
    config = og.Config(OUT_DIR)
    config.clear_providers()  # CPU EP
    model = og.Model(config)
    prompt = C.prompt_ids()
    total = len(prompt) + C.N_NEW

    def once():
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=total, min_length=total)
        gen = og.Generator(model, params)
        ts, toks = [], []
        t0 = time.perf_counter()
        gen.append_tokens(prompt)  # runs the prefill forward
        while not gen.is_done() and len(toks) < C.N_NEW:
            gen.generate_next_token()  # greedy pick (+ forward of the previous token)
            toks.append(int(gen.get_next_tokens()[0]))
            ts.append(time.perf_counter())
        del gen
        return t0, ts, toks

    r = C.bench(once)
    from importlib.metadata import version

    sz = sum(os.path.getsize(os.path.join(OUT_DIR, f)) for f in os.listdir(OUT_DIR) if f.startswith("model.onnx"))
    r["variant"] = "builder -p %s -e cpu (%.1f MB)" % (VARIANT, sz / 2**20)
    r["versions"] = {"onnxruntime-genai": version("onnxruntime-genai"), "onnxruntime": version("onnxruntime")}
    return r


if __name__ == "__main__":
    C.main("onnxruntime-genai-" + VARIANT, measure, prepare)
