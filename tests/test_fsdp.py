"""FSDP through accelerate's config (issue 16): real ``accelerate launch --config_file configs/accelerate_fsdp.yaml``
child processes (2 processes, gloo on the CPU, PyTorch FSDP2), tiny random Llama, e2e recipe with a LoRA phase.

- 2 FSDP processes train the routers and LoRA adapters 1 process trains (same global batch; tolerances of
  tests/test_distributed.py: losses ``TOL``, routers ``E2E_TOL``, LoRA ``LORA_TOL``), and each rank really
  holds half of the frozen weights and of the adapters (``routers.json`` -> ``train.distributed.fsdp_shards``,
  measured from the parameters' local shards: without sharding every rank would hold all of them);
- ranks without a record of a step (or with fewer records to cache) still run the FSDP forwards and
  backwards the others run, and the result is still 1 process's;
- the checkpoint of an FSDP run holds whole (gathered) adapters and optimiser state: it resumes with 1 process
  without FSDP and with 2 FSDP processes (which shard them again), both ending where 1 process ends;
- what FSDP cannot do is a one-line error: the rank recipe, FSDP1, sharded state dicts, other wrap policies,
  accelerate's mixed precision, export.evaluate under the FSDP config.

Note: Adam's update does not change when every gradient is scaled by one constant, so a constant factor on
the summed LoRA gradients would not show in the weights (the summation itself does: without it the ranks'
adapters would differ from 1 process's and from each other).
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from export import evaluate as ev
from export import finetune as ft
from helpers import tiny_vocab_data
from test_distributed import (E2E, E2E_TOL, LAUNCH_TIMEOUT, LORA_TOL, ROOT, STEPS, TOL, child_env, free_port,
                              in_process, log_of, max_lora_diff, max_router_diff)

CONFIG = ROOT / "configs" / "accelerate_fsdp.yaml"
E2E32 = E2E + ["--dtype", "fp32"]  # fp32 whatever the CPU (auto would be bf16 with AMX): the tolerances are fp32's


def accelerate_fsdp(args, n: int = 2):
    """``accelerate launch --config_file configs/accelerate_fsdp.yaml --num_processes n -m export.finetune ...``"""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG), "--num_processes", str(n),
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()), "-m", "export.finetune"]
    r = subprocess.run(cmd + [str(a) for a in args] + ["--device", "cpu"], cwd=ROOT, env=child_env(), capture_output=True,
                       text=True, timeout=LAUNCH_TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def fsetup(tmp_path_factory, tiny_dir, data_dir):
    root = tmp_path_factory.mktemp("fsdp")
    data = tiny_vocab_data(data_dir, root / "data", ("arithmetic", "translate"), 6)
    base = ["--data", data, "--model", tiny_dir]
    one = root / "one"
    in_process(ft.main, base + E2E32 + ["--out", one])
    return dict(root=root, base=base, one=one)


def lora_of_checkpoint(run: Path) -> dict:
    """The checkpoint's LoRA weights under the adapter file's names (peft drops the adapter name)."""
    st = torch.load(run / "checkpoint.pt", weights_only=False)
    return {k.replace(".default.", "."): v for k, v in st["lora"].items()}


def test_fsdp_two_processes_train_as_one_and_shard(fsetup):
    root, base, one = fsetup["root"], fsetup["base"], fsetup["one"]
    two = root / "fsdp2"
    r = accelerate_fsdp(base + E2E32 + ["--out", two])
    assert "[finetune] FSDP over 2 processes" in r.stderr
    diff, lora = max_router_diff(one, two), max_lora_diff(one, two)
    print(f"FSDP, e2e + LoRA, {STEPS} steps: max |difference| 1 process vs 2 FSDP processes: routers {diff:.2e}, "
          f"LoRA {lora:.2e}")
    assert diff <= E2E_TOL and lora <= LORA_TOL
    l1, l2 = log_of(one), log_of(two)
    assert [x["step"] for x in l2] == list(range(1, STEPS + 1)) and l2[-1]["phase"] == "lora"
    for a, b in zip(l1, l2):
        assert abs(a["loss"] - b["loss"]) <= TOL and a["skipped_at_tau"] == b["skipped_at_tau"], (a, b)
    d = json.loads((two / "routers.json").read_text())["train"]["distributed"]
    assert d["world_size"] == 2 and d["backend"] == "gloo" and d["fsdp"]["version"] == 2
    assert d["fsdp"]["reshard_after_forward"] is True
    sh = d["fsdp_shards"]
    # the tiny model: 6 layers x (q 64x64, k/v 64x32, o 64x64, MLP 3 x 64x128, 2 norms) + embedding and head
    # 96x64 + final norm = 234,304 frozen; LoRA r=8 on the 7 projections of 6 layers = 49,152
    n_lora = 6 * 8 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 128))
    n_frozen = 6 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 2 * 96 * 64 + 64
    assert sh["total_params"] == n_frozen + n_lora
    print(f"FSDP shards (elements per rank): frozen {sh['frozen']} of {n_frozen}, LoRA {sh['trainable']} of {n_lora}")
    assert sum(sh["frozen"]) == n_frozen and sum(sh["trainable"]) == n_lora  # each element on one rank
    for r_ in range(2):  # each rank holds half (rows split evenly: every sharded dimension here is even)
        assert sh["frozen"][r_] == n_frozen // 2 and sh["trainable"][r_] == n_lora // 2
        assert sh["frozen_bytes"][r_] == 4 * (n_frozen // 2)  # fp32 (--dtype fp32)
    assert "fsdp" not in json.loads((one / "routers.json").read_text())["train"]["distributed"]
    # rank 0 wrote whole adapters: the final checkpoint's (gathered) equal the saved lora/ files exactly
    from safetensors.torch import load_file

    saved, ck = load_file(str(two / "lora" / "adapter_model.safetensors")), lora_of_checkpoint(two)
    assert saved.keys() == ck.keys() and all(torch.equal(saved[k], ck[k]) for k in saved)
    assert saved.keys() == load_file(str(one / "lora" / "adapter_model.safetensors")).keys()
    assert not (two / "cache").exists()


def test_fsdp_checkpoint_resumes_with_and_without_fsdp(fsetup):
    root, base, one = fsetup["root"], fsetup["base"], fsetup["one"]
    run = root / "stopped"
    accelerate_fsdp(base + E2E32 + ["--out", run, "--stop-after", STEPS - 1])  # in the LoRA phase
    st = torch.load(run / "checkpoint.pt", weights_only=False)
    assert st["step"] == STEPS - 1 and st["world_size"] == 2 and st["fsdp"] is True
    # whole tensors in the unsharded format: every adapter at its full shape, and Adam's state of every adapter
    # (group 0) and router (group 1) parameter at the parameter's full shape
    ref = {n: p.shape for n, p in torch.load(one / "checkpoint.pt", weights_only=False)["lora"].items()}
    assert {n: v.shape for n, v in st["lora"].items()} == ref
    opt = st["lora_opt"]
    g0, g1 = (g["params"] for g in opt["param_groups"])
    assert [opt["state"][i]["exp_avg"].shape for i in g0] == list(ref.values())
    assert [opt["state"][i]["exp_avg_sq"].shape for i in g1] == [v.shape for v in st["routers"].values()]
    a, b = root / "resumed1", root / "resumed_fsdp"
    shutil.copytree(run, a)
    shutil.copytree(run, b)
    in_process(ft.main, base + E2E32 + ["--out", a, "--resume"])  # 1 process, no FSDP
    accelerate_fsdp(base + E2E32 + ["--out", b, "--resume"])  # 2 FSDP processes: the whole tensors sharded again
    for r in (a, b):
        assert [x["step"] for x in log_of(r)] == list(range(1, STEPS + 1))
        diff, lora = max_router_diff(one, r), max_lora_diff(one, r)
        print(f"FSDP run stopped after step {STEPS - 1}, resumed by {r.name}: max |difference| to 1 process: "
              f"routers {diff:.2e}, LoRA {lora:.2e}")
        assert diff <= E2E_TOL and lora <= LORA_TOL


def test_fsdp_ranks_without_records_still_take_part(fsetup):
    """5 records over 2 ranks (3 and 2) and a global batch of 1: in every step one rank has no record and, in
    the cache, rank 1 has one record fewer; under FSDP those ranks run a forward and backward whose sums count
    0 (every rank takes part in gathering each layer's weights), and training is still 1 process's."""
    root, base = fsetup["root"], fsetup["base"]
    args = ["--preset", "tiny", "--recipe", "e2e", "--tasks", "arithmetic", "--per-task", 5, "--soft-steps", 3,
            "--hard-steps", 2, "--lora", "--lora-steps", 3, "--lora-lr", 0.01, "--batch-size", 1, "--lr", 0.05,
            "--no-progress", "--dtype", "fp32"]
    in_process(ft.main, base + args + ["--out", root / "odd1"])
    accelerate_fsdp(base + args + ["--out", root / "odd2"])
    diff, lora = max_router_diff(root / "odd1", root / "odd2"), max_lora_diff(root / "odd1", root / "odd2")
    print(f"FSDP, 5 records, batch 1, 8 steps: max |difference| 1 vs 2 processes: routers {diff:.2e}, LoRA {lora:.2e}")
    assert diff <= E2E_TOL and lora <= LORA_TOL
    for a, b in zip(log_of(root / "odd1"), log_of(root / "odd2")):
        assert abs(a["loss"] - b["loss"]) <= TOL, (a, b)
    d = json.loads((root / "odd2" / "routers.json").read_text())["train"]["distributed"]
    assert d["records"] == {"0": [0, 2, 4], "1": [1, 3]} and d["fsdp_shards"]["frozen"][0] < d["fsdp_shards"]["total_params"]


FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
            "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer", "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
            "FSDP_RESHARD_AFTER_FORWARD": "true", "FSDP_OFFLOAD_PARAMS": "false", "ACCELERATE_MIXED_PRECISION": "no",
            "FSDP_ACTIVATION_CHECKPOINTING": "false", "FSDP_CPU_RAM_EFFICIENT_LOADING": "false"}


def test_bad_fsdp_use_is_a_one_line_error(fsetup, tmp_path, monkeypatch, capsys):
    """What accelerate launch exports for configs/accelerate_fsdp.yaml, then one setting changed at a time."""
    for k, v in FSDP_ENV.items():
        monkeypatch.setenv(k, v)
    base = fsetup["base"]
    e2e = ["--preset", "tiny", "--recipe", "e2e", "--lora", "--no-progress"]

    def one_line_error(main, args) -> str:
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in args])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
        return err

    assert "the rank recipe keeps the whole model" in one_line_error(ft.main, base + ["--preset", "tiny", "--out", tmp_path / "a"])
    for key, value, msg in (("FSDP_VERSION", "1", "fsdp_version 1 is not supported"),
                            ("FSDP_STATE_DICT_TYPE", "SHARDED_STATE_DICT", "SHARDED_STATE_DICT is not supported"),
                            ("FSDP_AUTO_WRAP_POLICY", "SIZE_BASED_WRAP", "SIZE_BASED_WRAP is not supported"),
                            ("FSDP_ACTIVATION_CHECKPOINTING", "true", "fsdp_activation_checkpointing is not supported"),
                            ("ACCELERATE_MIXED_PRECISION", "bf16", "mixed_precision 'bf16' is not used")):
        monkeypatch.setenv(key, value)
        assert msg in one_line_error(ft.main, base + e2e + ["--out", tmp_path / "b"])
        monkeypatch.setenv(key, FSDP_ENV[key])
    assert not (tmp_path / "b").exists()  # refused before anything was loaded or written
    err = one_line_error(ev.main, ["--run", fsetup["one"], "--data", base[1], "--prompts", 1, "--no-progress",
                                   "--out", tmp_path / "ev"])
    assert "only used by export.finetune --recipe e2e" in err
    # the same config with 1 process: nothing to shard, the run is the ordinary one
    in_process(ft.main, base + E2E32 + ["--soft-steps", 1, "--hard-steps", 0, "--lora-steps", 0, "--out",
                                           tmp_path / "single"])
    assert "nothing to shard" in capsys.readouterr().err
    assert "fsdp" not in json.loads((tmp_path / "single" / "routers.json").read_text())["train"]["distributed"]
