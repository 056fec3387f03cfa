"""Build a deployable bundle (DESIGN.md section 3).

    python -m export.build --target rpi|android [--model DIR] [--run runs/NAME] [--quantize ...] --out dist/NAME
                           [--sign-key FILE] [--quant-algo rtn|hqq|gptq --data DIR] [--int8-weights KINDS]

``--target rpi`` writes ONNX graphs for ONNX Runtime (export/onnx_export.py); ``--target android``
writes one ExecuTorch ``model.pte`` (export/et_export.py). Both share the manifest, tokenizer,
chat prefix/suffix and report written here. Each target module validates its graphs against the
PyTorch reference before the manifest is written. ``--sign-key FILE`` also writes ``manifest.sig``, the
HMAC-SHA256 of manifest.json under the key file's raw bytes (a device with the same key as its trusted key
refuses bundles that do not carry it: runtime/bundle.py).
``--quant-algo`` (rpi, ``--quantize int4``; same as ``--opt quant_algo=...``) picks how the 4-bit weights are computed
(export/quantize_onnx.py); ``gptq`` calibrates on the train split of the task data folder ``--data DIR``.
``--int8-weights`` (same as ``--opt int8_weights=...``) keeps the named int4 weights at 8 bits (mixed precision).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

from runtime.bundle import TOOL_VERSION, Bundle, read_key, sign_bundle, write_manifest
from runtime.errors import FirstEdgeError, cli_main
from runtime.graph_io import Dims, graph_io, to_json

from .chat import chat_ids, chat_parts, chat_turn_prefix
from .reference import eos_ids

# target -> (module with build_graphs(), runtime name, quantize choices)
TARGETS = {
    "rpi": ("export.onnx_export", "onnxruntime", ("none", "int8", "int4")),
    "android": ("export.et_export", "executorch", ("none", "8da4w")),
}
DEFAULT_MAX_CONTEXT = 1024


def model_section(fm, max_context: int) -> dict:
    return {
        "name": fm.name, "architecture": fm.cfg.model_type, "n_layers": fm.n_layers,
        "hidden_size": fm.hidden_size, "n_heads": fm.n_heads, "n_kv_heads": fm.n_kv_heads,
        "head_dim": fm.head_dim, "vocab_size": fm.vocab_size, "max_context": int(max_context),
    }


def write_common(fm, tok, out: Path, run: Optional[str]) -> dict:
    """tokenizer.json, report.md; returns the manifest sections shared by every target."""
    out.mkdir(parents=True, exist_ok=True)
    backend_tok = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    if backend_tok is None:
        raise FirstEdgeError("the model's tokenizer has no tokenizers (fast) backend; a tokenizer.json is needed")
    backend_tok.save(str(out / "tokenizer.json"))
    pre, post = chat_parts(tok)
    turn_prefix = chat_turn_prefix(tok)
    report = next((p for p in (Path(run) / "report.md", Path(run) / "eval_val" / "report.md") if p.exists()),
                  None) if run else None
    if report is not None:
        shutil.copy(report, out / "report.md")
    else:
        why = (f"run folder {run} has no eval_val/report.md (run python -m export.evaluate --run {run})" if run
               else "untrained routers (no --run): every layer is kept at the default threshold")
        (out / "report.md").write_text(f"# {fm.name}: FiRST-Edge bundle\n\nNo evaluation report: {why}.\n")
    calibration = None
    if run and (Path(run) / "routers.json").exists():
        try:  # the run's threshold calibration (rank recipe): mean layers skipped and KL per threshold on val
            calibration = json.loads((Path(run) / "routers.json").read_text()).get("calibration")
        except ValueError:
            calibration = None
    return {
        "tokens": {"bos_id": tok.bos_token_id, "eos_ids": eos_ids(tok, fm.cfg)},
        "chat": {"template": getattr(tok, "chat_template", None) or "", "prefix": pre, "suffix": post,
                 "turn_prefix": turn_prefix,  # between a reply and the next user message (chat sessions)
                 "ids": chat_ids(tok, pre, post, turn_prefix)},
        "routing": {"default_threshold": fm.threshold, "pinned": list(fm.pinned), "mask_dtype": "bool",
                    "pool_start": fm._pool_start(),  # applied inside the prefill graph (DESIGN.md Changes 5)
                    "router_source": str(run) if run else "untrained", "calibration": calibration},
    }


def build(target: str, out, model: Optional[str] = None, run: Optional[str] = None, quantize: str = "none",
          max_context: int = DEFAULT_MAX_CONTEXT, verbose: bool = True, sign_key=None, data=None, **opts) -> Path:
    """``sign_key``: a key file path (or the key's bytes) to sign the bundle with (manifest.sig). ``data``: the task
    data folder whose train split calibrates ``quant_algo=gptq`` (rpi)."""
    from .model import build_first_model

    key = None
    if sign_key is not None:  # checked before the (long) build
        key = bytes(sign_key) if isinstance(sign_key, (bytes, bytearray)) else read_key(sign_key, "signing key")
        if not key:
            raise FirstEdgeError("the signing key is empty")
    if target not in TARGETS:
        raise FirstEdgeError(f"unknown target {target!r} (choose from {', '.join(TARGETS)})")
    mod_name, runtime, qchoices = TARGETS[target]
    if quantize not in qchoices:
        raise FirstEdgeError(f"--quantize {quantize} is not available for --target {target} "
                             f"(choose from {', '.join(qchoices)})")
    algo = opts.get("quant_algo")
    calib_per_task = opts.pop("calib_per_task", None)
    if opts.get("int8_weights") is not None:  # checked before the (long) build
        if target != "rpi":
            raise FirstEdgeError("int8_weights is for --target rpi --quantize int4")
        from .quantize_onnx import parse_int8_weights
        from .onnx_export import QUANT_BITS

        parse_int8_weights(opts["int8_weights"], QUANT_BITS[quantize])
    if algo is not None:  # checked before the (long) build
        if target != "rpi":
            raise FirstEdgeError(f"--quant-algo is for --target rpi (--target {target} has its own --quantize schemes)")
        from .quantize_onnx import check_algo
        from .onnx_export import QUANT_BITS

        check_algo(algo, QUANT_BITS[quantize], calibration=data if algo == "gptq" else None)
        if data is not None and not Path(data).is_dir():
            raise FirstEdgeError(f"--data {data}: no such folder")
    if calib_per_task is not None:
        if algo != "gptq" or not str(calib_per_task).isdigit() or int(calib_per_task) < 1:
            raise FirstEdgeError(f"calib_per_task={calib_per_task}: a positive number of train prompts a task, "
                                 f"for --quant-algo gptq")
        calib_per_task = int(calib_per_task)
    else:
        from .quantize_onnx import CALIB_PER_TASK

        calib_per_task = CALIB_PER_TASK
    fm, tok = build_first_model(model, run, verbose=verbose)
    if algo == "gptq":
        from .data import end_of_turn_id
        from .quantize_onnx import calibration_ids

        opts["calibration"] = calibration_ids(data, tok, end_of_turn_id(tok, fm.cfg), per_task=calib_per_task)
    mpe = getattr(fm.cfg, "max_position_embeddings", None)
    if mpe and max_context > mpe:
        raise FirstEdgeError(f"--max-context {max_context} exceeds the model's {mpe} positions")
    out = Path(out)
    if out.exists() and not (out / "manifest.json").exists() and any(out.iterdir()):
        raise FirstEdgeError(f"{out} exists and is not a bundle; choose another --out (nothing was overwritten)")
    # write everything into a temporary folder beside the target; it replaces the target only once the
    # bundle is complete and validated, so a killed build leaves the previous bundle (or nothing)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.building-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would otherwise become the bundle's permissions
    try:
        _write_bundle(fm, tok, tmp, target, runtime, mod_name, run, quantize, max_context, verbose, opts)
        if key is not None:
            sign_bundle(tmp, key)  # manifest.sig, inside the folder before it is validated and renamed
        # the device-side validation: files, sizes, hashes, I/O schema (and the signature, with a key; an unsigned
        # build is not checked against a FIRST_EDGE_TRUSTED_KEY of this host)
        Bundle(tmp, trusted_key=key if key is not None else False)
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        print(f"[first-edge] bundle written: {out}", file=sys.stderr)
    return out


def _write_bundle(fm, tok, out: Path, target: str, runtime: str, mod_name: str, run, quantize: str, max_context: int,
                  verbose: bool, opts: dict) -> None:
    common = write_common(fm, tok, out, run)
    mod = importlib.import_module(mod_name)
    graphs = mod.build_graphs(fm, out, quantize=quantize, max_context=max_context, verbose=verbose, **opts)
    model = model_section(fm, max_context)
    # every graph's inputs and outputs, from the one declaration the exporters built them from
    graphs["io"] = to_json(graph_io(runtime, Dims.from_model(model), graphs["decode_shapes"]))
    manifest = {
        "tool": TOOL_VERSION, "target": target, "runtime": runtime,
        "model": model,
        "dtype": graphs.pop("dtype", "float32"), "quantization": quantize,
        **common,
        "graphs": graphs,
        "report": "report.md",
    }
    write_manifest(out, manifest)


@cli_main
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m export.build", description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", required=True, choices=sorted(TARGETS))
    ap.add_argument("--model", help="local Hugging Face model folder (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--run", help="finetuning run folder (routers, LoRA, report.md)")
    ap.add_argument("--quantize", default="none", help="rpi: none|int8|int4; android: none|8da4w")
    ap.add_argument("--max-context", type=int, default=DEFAULT_MAX_CONTEXT)
    ap.add_argument("--out", required=True)
    ap.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                    help="target-specific option passed to build_graphs (e.g. decode_shape=split)")
    ap.add_argument("--quant-algo", help="rpi --quantize int4: rtn (default), hqq or gptq (needs --data); "
                    "the same as --opt quant_algo=...")
    ap.add_argument("--int8-weights", metavar="KINDS", help="rpi --quantize int4: these weights at 8 bits (mixed "
                    "precision), comma-separated kinds (lm_head, embed_tokens, qkv_proj, o_proj, gate_proj, up_proj, "
                    "down_proj) or name globs (layers.0.*); the same as --opt int8_weights=...")
    ap.add_argument("--data", metavar="DIR", help="task data folder: its train split calibrates --quant-algo gptq")
    ap.add_argument("--sign-key", metavar="FILE", help="sign the bundle: write manifest.sig, the HMAC-SHA256 of "
                    "manifest.json under this key file's raw bytes (devices whose trusted key is this file accept it)")
    args = ap.parse_args(argv)
    opts = dict(o.split("=", 1) for o in args.opt)
    if args.quant_algo is not None:
        opts["quant_algo"] = args.quant_algo
    if args.int8_weights is not None:
        opts["int8_weights"] = args.int8_weights
    build(args.target, args.out, model=args.model, run=args.run, quantize=args.quantize,
          max_context=args.max_context, sign_key=args.sign_key, data=args.data, **opts)


if __name__ == "__main__":
    main()
