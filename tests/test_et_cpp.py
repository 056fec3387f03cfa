"""C++ runner (runtime/cpp): CMake build + ctest, and parity of its CLI with the PyTorch reference."""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from et_helpers import (MAX_CONTEXT, POOL_START, cmake_exe, cpp_build, end_of_context_case, pool_start_cases,
                        prompts, reference, tiny_bundle, workdir)

from runtime.loop import SamplingConfig, generate
from runtime.masks import mask_str

N_NEW = 8


@pytest.fixture(scope="module")
def build_dir():
    return cpp_build(asan=os.environ.get("FIRST_EDGE_ASAN") == "1")


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle("none")


def cli(build_dir, *args):
    return subprocess.run([str(build_dir / "first_edge_run"), *map(str, args)], capture_output=True, text=True)


def test_ctest(build_dir, bundle):
    env = dict(os.environ, FIRST_EDGE_TEST_BUNDLE=str(bundle), FIRST_EDGE_TEST_TMP=str(workdir()))
    ctest = str(cmake_exe()).replace("cmake", "ctest") if cmake_exe().endswith("cmake") else "ctest"
    r = subprocess.run([ctest, "--test-dir", str(build_dir), "--output-on-failure"], capture_output=True, text=True,
                       env=env)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "100% tests passed" in r.stdout


def test_cpp_parity_with_reference(build_dir, bundle):
    """Same >= 10 prompts x 3 masks as the Python runner: mask, scores, greedy tokens identical; logits 1e-3;
    skipped layer methods never called (the runner's call counts)."""
    from export.reference import TorchBackend

    fm = reference()
    L, V = fm.n_layers, fm.vocab_size
    ref = TorchBackend(fm, max_context=MAX_CONTEXT)
    worst = 0.0
    n_mixed = 0
    for i, ids in enumerate(prompts()):
        rng = np.random.default_rng(i)
        rnd = rng.random(L) < 0.5
        rnd[0] = True
        for kind, mask in (("ones", np.ones(L, bool)), ("router", None), ("random", rnd)):
            a = generate(ref, ids, SamplingConfig(max_new_tokens=N_NEW, ignore_eos=True), threshold=0.5, mask=mask,
                         keep_logits=True)
            dump = workdir() / "logits.bin"
            args = ["--bundle", bundle, "--ids", ",".join(map(str, ids)), "--max-new-tokens", N_NEW, "--ignore-eos",
                    "--threads", 1, "--threshold", 0.5, "--dump-logits", dump]
            if mask is not None:
                args = [x for x in args if x not in ("--threshold", 0.5)] + ["--mask", mask_str(mask)]
            r = cli(build_dir, *args)
            assert r.returncode == 0, r.stderr[-2000:]
            out = json.loads(r.stdout.strip().splitlines()[-1])
            assert out["mask"] == mask_str(a.mask), (i, kind)
            np.testing.assert_allclose(out["scores"], a.scores, atol=1e-5)
            assert out["tokens"] == a.tokens, (i, kind)
            lg = np.fromfile(dump, dtype=np.float32).reshape(-1, V)
            ref_lg = np.stack([a.first_logits] + a.step_logits)
            assert lg.shape == ref_lg.shape
            worst = max(worst, float(np.abs(lg - ref_lg).max()))
            assert out["layer_calls"] == [N_NEW - 1 if a.mask[l] else 0 for l in range(L)]
            if kind == "router" and not a.mask.all():
                n_mixed += 1
    assert worst <= 1e-3, worst
    assert n_mixed >= 3


def test_cpp_pool_start_parity_with_reference(build_dir, bundle):
    """The shared bundle's routers have pool_start P > 0 (prompts shorter than, equal to and longer than P):
    the runner's scores, mask and greedy tokens equal the reference, and the scores are not the plain prompt
    mean."""
    assert json.loads((bundle / "manifest.json").read_text())["routing"]["pool_start"] == POOL_START
    n_mixed = 0
    for ids, a, plain in pool_start_cases(N_NEW):
        r = cli(build_dir, "--bundle", bundle, "--ids", ",".join(map(str, ids)), "--max-new-tokens", N_NEW,
                "--ignore-eos", "--threads", 1, "--threshold", 0.5)
        assert r.returncode == 0, r.stderr[-2000:]
        out = json.loads(r.stdout.strip().splitlines()[-1])
        np.testing.assert_allclose(out["scores"], a.scores, atol=1e-5)
        assert out["mask"] == mask_str(a.mask) and out["tokens"] == a.tokens, len(ids)
        if len(ids) > 1:
            assert np.abs(np.array(out["scores"]) - plain).max() > 1e-3, len(ids)
        n_mixed += not a.mask.all()
    assert n_mixed >= 2


def test_cpp_budget_and_sampling(build_dir, bundle):
    ids = "5,6,7,8,9"
    r = cli(build_dir, "--bundle", bundle, "--ids", ids, "--keep", 3, "--max-new-tokens", 4, "--ignore-eos")
    out = json.loads(r.stdout)
    assert r.returncode == 0 and out["layers_kept"] == 3
    a = cli(build_dir, "--bundle", bundle, "--ids", ids, "--temperature", 0.9, "--top-p", 0.9, "--seed", 7,
            "--max-new-tokens", 10, "--ignore-eos")
    b = cli(build_dir, "--bundle", bundle, "--ids", ids, "--temperature", 0.9, "--top-p", 0.9, "--seed", 7,
            "--max-new-tokens", 10, "--ignore-eos")
    assert a.returncode == 0 and json.loads(a.stdout)["tokens"] == json.loads(b.stdout)["tokens"]


@pytest.mark.parametrize("args,expect", [
    ([], "--bundle is required"),
    (["--bundle", "/nonexistent", "--ids", "1"], "not found"),
    (["--ids", "1,x"], "comma-separated"),
    (["--ids", "1", "--mask", "10"], "length 2"),
    (["--ids", "999999"], "outside the vocabulary"),
    (["--ids", "1", "--temperature", "abc"], "needs a number"),
    (["--ids", "1", "--bogus", "1"], "unknown option"),
])
def test_cpp_cli_errors(build_dir, bundle, args, expect):
    if args and args[0] != "--bundle":
        args = ["--bundle", str(bundle)] + args
    r = cli(build_dir, *args)
    assert r.returncode == 2 and expect in r.stderr, (r.returncode, r.stderr[-500:])


def test_cpp_decode_to_the_end_of_the_context(build_dir, bundle):
    """Decoding up to the last position of the context, with a mask that leaves the layers' caches at
    different lengths, keeps parity with the reference."""
    ids, mask, a = end_of_context_case()
    dump = workdir() / "logits_long.bin"
    r = cli(build_dir, "--bundle", bundle, "--ids", ",".join(map(str, ids)), "--max-new-tokens", MAX_CONTEXT - len(ids),
            "--ignore-eos", "--threads", 1, "--mask", mask_str(mask), "--dump-logits", dump)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["tokens"] == a.tokens
    lg = np.fromfile(dump, dtype=np.float32).reshape(-1, len(a.first_logits))
    assert float(np.abs(lg - np.stack([a.first_logits] + a.step_logits)).max()) <= 1e-3


def test_cpp_under_address_sanitizer(bundle, tmp_path):
    """CI's AddressSanitizer run (issue 14): the runner built with ASan runs its ctest suite (bundles, masks,
    sessions, refused turns, threads), decodes to exactly max_context, and chats until the context is full
    (then trims); any out-of-bounds access or use-after-free aborts with an ASan report."""
    asan = cpp_build(asan=True)
    env = dict(os.environ, FIRST_EDGE_TEST_BUNDLE=str(bundle), FIRST_EDGE_TEST_TMP=str(workdir()),
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=1")
    ctest = str(cmake_exe()).replace("cmake", "ctest") if cmake_exe().endswith("cmake") else "ctest"
    r = subprocess.run([ctest, "--test-dir", str(asan), "--output-on-failure"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "100% tests passed" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]
    ids, mask, a = end_of_context_case()
    run = [str(asan / "first_edge_run"), "--bundle", str(bundle)]
    # more new tokens than fit: the last decode writes the buffers' last row, then the context stops it
    r = subprocess.run(run + ["--ids", ",".join(map(str, ids)), "--max-new-tokens", str(MAX_CONTEXT),
                              "--ignore-eos", "--threads", "1", "--mask", mask_str(mask)],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "AddressSanitizer" not in r.stderr, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["stop_reason"] == "max_context" and len(out["tokens"]) == MAX_CONTEXT - len(ids) + 1
    assert out["tokens"][:len(a.tokens)] == a.tokens
    script = tmp_path / "turns.txt"
    script.write_text("\n".join(",".join(str(5 + (7 * i + j) % 80) for j in range(9)) for i in range(8)) + "\n")
    r = subprocess.run(run + ["--chat", "--script", str(script), "--trim", "--max-new-tokens", "12", "--ignore-eos",
                              "--keep", "3"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "AddressSanitizer" not in r.stderr, r.stderr[-3000:]
    turns = [json.loads(x) for x in r.stdout.strip().splitlines()]
    assert len(turns) == 8 and any(t["dropped_turns"] > 0 for t in turns), turns[-1]
