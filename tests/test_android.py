"""The Android app (android_demo/): the offline signed APK, the JNI bridge end to end on the host (JUnit on the
host JVM over libfirst_edge_jni.so built with g++ against the executorch wheel), and the app's plain-Java logic.

The toolchain comes from scripts/android_cache.sh (Debian packages in a private cache); a missing tool is a
failure, not a skip. Built things are kept under android_demo/build/ (gitignored): the host JNI build
(incremental), the JUnit classes, and a copy of the tiny test bundle (rebuilt when the export code changes).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from et_helpers import executorch_dir, cmake_exe, prompts, tiny_bundle

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "android_demo"
MAIN = APP / "app" / "src" / "main"
BUILD = APP / "build"
N_NEW = 8
SESSION_TURNS = [[5, 17, 23, 9], [41, 8, 30], [12, 60, 7, 77], [33]]
# the app's classes that need android.* (compiled into the APK only, not for the host JVM)
ANDROID_ONLY = {"MainActivity.java", "SettingsActivity.java", "SettingsStore.java", "LayerStripView.java"}
JUNIT_CLASSES = ["StatsFormatTest", "ChatSettingsTest", "BundleManifestTest", "ByteLevelBpeTest", "TokenizerParityTest",
                 "NativeRunnerTest"]


def run(args, **kw):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def android():
    """The toolchain cache's tool paths (scripts/android_cache.sh writes env.sh)."""
    r = run(["bash", ROOT / "scripts" / "build_apk.sh", "--setup-only"])
    assert r.returncode == 0, "Android toolchain setup failed:\n" + r.stderr[-3000:]
    env = {}
    for line in (Path(r.stdout.strip().splitlines()[-1]) / "env.sh").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            env[k] = v.strip('"')
    for k in ("AAPT", "AAPT2", "ZIPALIGN", "ANDROID_JAR", "DX_JAR", "DEBUG_KEYSTORE"):
        assert Path(env[k]).exists(), f"{k}: {env[k]} missing"
    for jar in env["JUNIT_CP"].split(":") + env["APKSIGNER_CP"].split(":"):
        assert Path(jar).exists(), jar
    return env


def tool_env(android):
    return dict(os.environ, LD_LIBRARY_PATH=android["ANDROID_LD_LIBRARY_PATH"])


def build_apk(android, out, *extra):
    r = run(["bash", ROOT / "scripts" / "build_apk.sh", "--out", out, *extra])
    return r


@pytest.fixture(scope="module")
def apk(android, tmp_path_factory):
    out = tmp_path_factory.mktemp("apk") / "demo.apk"
    r = build_apk(android, out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == str(out) and out.stat().st_size > 10_000
    return out


def badging(android, apk):
    r = run([android["AAPT"], "dump", "badging", apk], env=tool_env(android))
    assert r.returncode == 0, r.stderr
    return r.stdout


def apksigner(android, *args):
    return run(["java", "-cp", android["APKSIGNER_CP"], "com.android.apksigner.ApkSignerTool", *args])


def test_apk_badging(android, apk):
    out = badging(android, apk)
    assert "package: name='org.firstedge.demo'" in out
    assert "launchable-activity: name='org.firstedge.demo.MainActivity'" in out
    assert "sdkVersion:'23'" in out and "targetSdkVersion:'24'" in out
    assert "application-label:'FiRST-Edge Chat'" in out
    assert "native-code" not in out  # no --native-libs: no native code


def test_apk_signed_and_aligned(android, apk):
    r = apksigner(android, "verify", "--verbose", "--min-sdk-version", "23", apk)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Verified using v2 scheme (APK Signature Scheme v2): true" in r.stdout
    r = run([android["ZIPALIGN"], "-c", "-p", "4", apk], env=tool_env(android))
    assert r.returncode == 0, r.stdout + r.stderr
    # the debug key is the cache's: a rebuilt APK has the same signer (so it installs over the previous one)
    r = apksigner(android, "verify", "--print-certs", apk)
    assert "CN=Android Debug" in r.stdout
    names = run(["unzip", "-Z1", apk]).stdout.split()
    assert {"classes.dex", "AndroidManifest.xml", "resources.arsc", "res/layout/activity_main.xml",
            "res/layout/activity_settings.xml"} <= set(names)


def fake_arm64_so(path: Path, machine: int = 183):
    """An ELF64 header with the given e_machine (183: AArch64), enough for the packer's check."""
    hdr = bytearray(64)
    hdr[:4] = b"\x7fELF"
    hdr[4], hdr[5], hdr[6] = 2, 1, 1  # 64-bit, little endian, version 1
    hdr[16:18] = (3).to_bytes(2, "little")  # ET_DYN
    hdr[18:20] = machine.to_bytes(2, "little")
    path.write_bytes(bytes(hdr) + b"\0" * 256)


def test_native_libs_packed_for_arm64(android, tmp_path):
    libs = tmp_path / "libs" / "arm64-v8a"
    libs.mkdir(parents=True)
    fake_arm64_so(libs / "libfirst_edge_jni.so")
    fake_arm64_so(libs / "libexecutorch.so")
    out = tmp_path / "native.apk"
    r = build_apk(android, out, "--native-libs", tmp_path / "libs")
    assert r.returncode == 0, r.stderr[-3000:]
    names = run(["unzip", "-Z1", out]).stdout.split()
    assert {"lib/arm64-v8a/libfirst_edge_jni.so", "lib/arm64-v8a/libexecutorch.so"} <= set(names)
    assert "native-code: 'arm64-v8a'" in badging(android, out)
    assert apksigner(android, "verify", out).returncode == 0
    # an x86-64 library (what this machine's g++ builds) is refused, not packed
    bad = tmp_path / "host"
    bad.mkdir()
    fake_arm64_so(bad / "libfirst_edge_jni.so", machine=62)
    r = build_apk(android, tmp_path / "bad.apk", "--native-libs", bad)
    assert r.returncode == 2 and "not built for arm64-v8a" in r.stderr
    assert not (tmp_path / "bad.apk").exists()


# ---------------------------------------------------------------------------------------------- host JNI + JUnit


@pytest.fixture(scope="module")
def jni_lib():
    """android_demo/app/src/main/cpp built for the host (kept in android_demo/build/jni-host: incremental)."""
    b = BUILD / "jni-host"
    cm = cmake_exe()
    r = run([cm, "-S", MAIN / "cpp", "-B", b, f"-DCMAKE_PREFIX_PATH={executorch_dir()}"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = run([cm, "--build", b, "-j", str(min(2, os.cpu_count() or 1))])
    assert r.returncode == 0, "JNI build failed:\n" + r.stdout[-3000:] + r.stderr[-3000:]
    lib = b / "libfirst_edge_jni.so"
    assert lib.exists()
    return b


@pytest.fixture(scope="module")
def junit_classes(android):
    """The app's plain-Java classes (no android.*) and the JUnit tests, Java 8, against org.json from Debian."""
    out = BUILD / "junit" / "classes"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    srcs = [p for p in (MAIN / "java").rglob("*.java") if p.name not in ANDROID_ONLY]
    srcs += list((APP / "app" / "src" / "test" / "java").rglob("*.java"))
    r = run(["javac", "-source", "8", "-target", "8", "-Xlint:-options", "-encoding", "UTF-8", "-cp", android["JUNIT_CP"],
             "-d", out, *srcs])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def bundle_key() -> str:
    """What the cached tiny bundle is reused across runs for: the same test model helpers, executorch version and
    bundle format. (Not the export code: the test compares the bridge with the Python runtime on the same
    bundle, so an older bundle that still validates is as good a fixture; a bundle that no longer validates is
    rebuilt.)"""
    from runtime.bundle import FORMAT_VERSION

    h = hashlib.sha256()
    for p in ("tests/helpers.py", "tests/et_helpers.py"):
        h.update((ROOT / p).read_bytes())
    import executorch.version as v  # noqa: PLC0415

    h.update(f"{getattr(v, '__version__', '')} {FORMAT_VERSION}".encode())
    return h.hexdigest()[:16]


@pytest.fixture(scope="module")
def bundle():
    """The tiny fp32 bundle of the ExecuTorch tests (et_helpers.tiny_bundle: built once per pytest process and
    shared with test_et*.py), copied into android_demo/build/ and reused by later runs while it validates."""
    from runtime.bundle import Bundle

    cached = BUILD / f"tiny-bundle-{bundle_key()}"
    if cached.is_dir():
        try:
            Bundle(cached)
            return cached
        except Exception:  # noqa: BLE001  (stale: rebuild)
            shutil.rmtree(cached)
    src = tiny_bundle("none")
    for old in BUILD.glob("tiny-bundle-*"):
        shutil.rmtree(old, ignore_errors=True)
    tmp = cached.with_name(cached.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    tmp.rename(cached)
    return cached


@pytest.fixture(scope="module")
def runner_cases(bundle, tmp_path_factory):
    """The Python runtime's greedy tokens for 10 prompts x (bundle default threshold, threshold 0.5, a budget of
    3 layers, a random explicit mask), a 4-turn runtime.Session conversation, and two damaged bundle copies."""
    from runtime.backends import load_backend
    from runtime.bundle import Bundle
    from runtime.loop import SamplingConfig, generate
    from runtime.masks import mask_str

    b = Bundle(bundle)
    L = b.n_layers
    routing = b.manifest["routing"]
    pinned, default_thr = routing.get("pinned", []), float(routing["default_threshold"])
    be = load_backend(b, threads=1)
    cfg = SamplingConfig(max_new_tokens=N_NEW, ignore_eos=True)
    cases = []
    for i, ids in enumerate(prompts()):
        rng = np.random.default_rng(100 + i)
        rnd = rng.random(L) < 0.5
        rnd[0] = True
        for mode in ("default", "threshold", "keep", "mask"):
            kw = {"threshold": default_thr}
            case = {"ids": [int(x) for x in ids], "mode": mode, "max_new_tokens": N_NEW}
            if mode == "threshold":
                kw, case["threshold"] = {"threshold": 0.5}, 0.5
            elif mode == "keep":
                kw, case["keep"] = {"keep": 3, "pinned": pinned}, 3
            elif mode == "mask":
                kw, case["mask"] = {"mask": rnd}, mask_str(rnd)
            res = generate(be, ids, cfg, default_threshold=default_thr, **kw)
            case["tokens"] = [int(t) for t in res.tokens]
            case["expect_mask"] = mask_str(res.mask)
            cases.append(case)
    # a 4-turn conversation through runtime.Session (the Python runtime's chat sessions) on a fresh backend
    from runtime.session import Session

    sess = Session.from_bundle(b, load_backend(b, threads=1))
    turns = []
    for user, opt in zip(SESSION_TURNS, ({"keep": 3}, {"threshold": 0.5}, {"keep": 2}, {})):
        r = sess.chat(user, SamplingConfig(max_new_tokens=N_NEW), **opt)
        st = r.stats()
        turns.append({"user": user, "options": opt, "reply": [int(t) for t in r.reply_ids],
                      "tokens": [int(t) for t in r.result.tokens], "expect_mask": mask_str(r.result.mask),
                      **{k: int(st[k]) for k in ("turn", "reused_tokens", "prefilled_tokens", "history_tokens")}})
    d = tmp_path_factory.mktemp("android_cases")
    spec = d / "runner_cases.json"
    spec.write_text(json.dumps({"bundle": str(bundle), "n_layers": L, "cases": cases, "session": turns}))
    bad = d / "bad_bundle"  # model.pte altered after the manifest was written
    shutil.copytree(bundle, bad)
    pte = bytearray((bad / "model.pte").read_bytes())
    pte[len(pte) // 2] ^= 0xFF
    (bad / "model.pte").write_bytes(bytes(pte))
    bad_manifest = d / "bad_manifest"
    shutil.copytree(bundle, bad_manifest)
    (bad_manifest / "manifest.json").write_text("{not json")
    return {"first_edge.runner_cases": spec, "first_edge.bad_bundle": bad, "first_edge.bad_manifest_bundle": bad_manifest}


@pytest.fixture(scope="module")
def tokenizer_cases(tmp_path_factory):
    """HF tokenizers' ids of every prompt of the data folder's val splits, plain and in the chat template, with
    the default model's tokenizer.json (SmolLM2: byte-level BPE)."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from export.chat import chat_parts
    from export.loading import default_model_dir

    data = Path(os.environ.get("FIRST_EDGE_DATA", ROOT.parent / "shared" / "data"))
    vals = sorted(data.glob("*/val.jsonl"))
    assert vals, f"no */val.jsonl under {data}"
    model = default_model_dir(verbose=False)
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    pre, post = chat_parts(AutoTokenizer.from_pretrained(str(model)))
    assert pre and post
    out = tmp_path_factory.mktemp("tok") / "cases.jsonl"
    n = 0
    with out.open("w", encoding="utf-8") as f:
        for v in vals:
            for line in v.read_text(encoding="utf-8").splitlines():
                if not line.strip():
                    continue
                p = json.loads(line)["prompt"]
                for text in (p, pre + p + post):
                    f.write(json.dumps({"text": text, "ids": tok.encode(text, add_special_tokens=False).ids}) + "\n")
                    n += 1
    return {"first_edge.tokenizer": model / "tokenizer.json", "first_edge.tokenizer_cases": out, "n": n}


def junit(android, classes, cls, props, libdir=None):
    args = ["java", *(f"-D{k}={v}" for k, v in props.items())]
    if libdir is not None:
        args.append(f"-Djava.library.path={libdir}")
    args += ["-cp", f"{classes}:{android['JUNIT_CP']}", "org.junit.runner.JUnitCore", f"org.firstedge.demo.{cls}"]
    return run(args, timeout=300)


@pytest.mark.parametrize("cls", ["StatsFormatTest", "ChatSettingsTest", "BundleManifestTest", "ByteLevelBpeTest"])
def test_junit_plain_java(android, junit_classes, cls):
    r = junit(android, junit_classes, cls, {})
    assert r.returncode == 0 and "OK (" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]


def test_junit_tokenizer_equals_hf_tokenizers(android, junit_classes, tokenizer_cases):
    """Token for token on every val prompt of the data folder (plain and chat-wrapped): at least 2 x 1000."""
    props = {k: v for k, v in tokenizer_cases.items() if k != "n"}
    r = junit(android, junit_classes, "TokenizerParityTest", props)
    assert r.returncode == 0 and "OK (1 test)" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]
    assert f"tokenizer parity: {tokenizer_cases['n']} texts checked, 0 differ" in r.stdout
    assert tokenizer_cases["n"] >= 2000
    print(r.stdout.strip().splitlines()[1], file=sys.stderr)


def test_junit_jni_bridge_end_to_end(android, junit_classes, jni_lib, runner_cases):
    """libfirst_edge_jni.so on the tiny bundle: streamed tokens equal the Python runtime's for the same mask
    (routers, threshold, budget, explicit mask); a chat session's turns equal runtime.Session's; false from the
    callback stops (a stopped turn leaves the session as it was); bad bundles and options raise."""
    r = junit(android, junit_classes, "NativeRunnerTest", runner_cases, libdir=jni_lib)
    assert r.returncode == 0 and "OK (" in r.stdout, r.stdout[-6000:] + r.stderr[-3000:]
    assert "native runner: 40 cases equal the Python runtime" in r.stdout
    assert "chat session: 4 turns equal runtime.Session" in r.stdout


def test_every_junit_class_is_run():
    found = sorted(p.stem for p in (APP / "app" / "src" / "test" / "java").rglob("*Test.java"))
    assert found == sorted(JUNIT_CLASSES)


def test_gradle_files_name_the_ndk_cmake_hook():
    """The Android Studio path (not built here): the Gradle files exist and point at the same CMake project."""
    gradle = (APP / "app" / "build.gradle").read_text()
    assert "externalNativeBuild" in gradle and "src/main/cpp/CMakeLists.txt" in gradle
    assert "arm64-v8a" in gradle and "minSdk" in gradle
    assert "include ':app'" in (APP / "settings.gradle").read_text()
