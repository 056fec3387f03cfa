"""Signed bundles (issue 14): manifest.sig is the HMAC-SHA256 of manifest.json's bytes under a key shared by the
builder and the device. With a trusted key configured (Bundle(trusted_key=...), --trusted-key, or
FIRST_EDGE_TRUSTED_KEY), a bundle that does not carry a signature that verifies is refused before any graph file
is hashed or loaded; without a key, behaviour is as before. Python (tiny ONNX bundle) and the C++ runner (tiny
ExecuTorch bundle, shared with test_et_cpp.py)."""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import runtime.bundle as rb
from runtime.bundle import SIGNATURE, Bundle, manifest_signature, write_manifest
from runtime.errors import FirstEdgeError

ROOT = Path(__file__).resolve().parents[1]
MAX_CTX = 64
KEY = b"first-edge test signing key \x00\xff"  # raw bytes: any byte may be key


@pytest.fixture(autouse=True)
def _no_key_in_env(monkeypatch):
    monkeypatch.delenv(rb.TRUSTED_KEY_ENV, raising=False)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    (d / "key").write_bytes(KEY)
    (d / "other").write_bytes(KEY + b"!")
    (d / "empty").write_bytes(b"")
    return d


@pytest.fixture(scope="module")
def signed(tiny_dir, keys, tmp_path_factory) -> Path:
    """A tiny ONNX bundle signed at build time (python -m export.build --sign-key)."""
    from export.build import build

    out = tmp_path_factory.mktemp("signed") / "tiny"
    return build("rpi", out, model=str(tiny_dir), max_context=MAX_CTX, verbose=False, sign_key=str(keys / "key"))


def _copy(src, tmp_path, name="b") -> Path:
    d = tmp_path / name
    shutil.copytree(src, d)
    return d


def _sign(d: Path, key: bytes = KEY) -> None:
    """Sign an existing bundle the way the build does: the HMAC of manifest.json's bytes, hex, in manifest.sig."""
    (d / SIGNATURE).write_text(hmac.new(key, (d / "manifest.json").read_bytes(), hashlib.sha256).hexdigest() + "\n")


def _refused(d, match, **kw):
    with pytest.raises(FirstEdgeError, match=match) as e:
        Bundle(d, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def _python_cli(args, env):
    env = dict(env, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "runtime"] + [str(a) for a in args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


# ---------------------------------------------------------------- the HMAC
@pytest.mark.parametrize("key,data,want", [  # RFC 4231 section 4, test cases 1, 2, 3, 4, 6, 7
    (b"\x0b" * 20, b"Hi There", "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"),
    (b"Jefe", b"what do ya want for nothing?", "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"),
    (b"\xaa" * 20, b"\xdd" * 50, "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe"),
    (bytes(range(1, 26)), b"\xcd" * 50, "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b"),
    (b"\xaa" * 131, b"Test Using Larger Than Block-Size Key - Hash Key First",
     "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"),
    (b"\xaa" * 131, b"This is a test using a larger than block-size key and a larger than block-size data. The key "
     b"needs to be hashed before being used by the HMAC algorithm.",
     "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2"),
])
def test_manifest_signature_rfc4231(key, data, want):
    assert manifest_signature(data, key) == want


# ---------------------------------------------------------------- Python runtime (ONNX bundle)
def test_build_writes_the_signature_of_the_manifest(signed):
    sig = (signed / SIGNATURE).read_text().strip()
    assert sig == manifest_signature((signed / "manifest.json").read_bytes(), KEY)
    assert SIGNATURE not in json.loads((signed / "manifest.json").read_text())["files"]  # it cannot sign itself
    assert not list(signed.parent.glob(f".{signed.name}.*"))  # the atomic build left no temporary folder


def test_signed_bundle_loads_with_the_right_key(signed, keys, monkeypatch):
    from runtime.backends import load_backend

    b = Bundle(signed, trusted_key=keys / "key")
    assert b.signed
    load_backend(b, threads=1)
    assert Bundle(signed, trusted_key=KEY).signed  # the key's bytes work as well as its file
    monkeypatch.setenv(rb.TRUSTED_KEY_ENV, str(keys / "key"))
    assert Bundle(signed).signed


def test_signed_bundle_refused_with_a_wrong_key(signed, keys, monkeypatch):
    _refused(signed, "manifest.sig of bundle .* does not verify with the trusted key", trusted_key=keys / "other")
    monkeypatch.setenv(rb.TRUSTED_KEY_ENV, str(keys / "other"))
    _refused(signed, "does not verify with the trusted key")


def test_bundle_without_signature_refused_when_a_key_is_configured(signed, keys, tmp_path):
    d = _copy(signed, tmp_path)
    (d / SIGNATURE).unlink()
    _refused(d, r"is not signed \(no manifest.sig\) and a trusted key is configured", trusted_key=keys / "key")
    (d / SIGNATURE).write_text("not a signature\n")
    _refused(d, "is not an HMAC-SHA256 signature", trusted_key=keys / "key")


def test_manifest_altered_after_signing_is_refused_before_any_file_is_hashed(signed, keys, tmp_path, monkeypatch):
    d = _copy(signed, tmp_path)
    mf = d / "manifest.json"
    text = mf.read_text()
    h = json.loads(text)["files"]["tokenizer.json"]["sha256"]
    mf.write_text(text.replace(h, ("0" if h[0] != "0" else "1") + h[1:]))  # one byte of one hash
    hashed = []
    monkeypatch.setattr(rb, "sha256_file", lambda p, *a, **k: hashed.append(p) or "0" * 64)
    _refused(d, "does not verify with the trusted key", trusted_key=keys / "key")
    assert hashed == []  # refused before any file of the bundle was hashed (or loaded)


def test_crafted_graph_with_rehashed_manifest_is_refused(signed, keys, tmp_path):
    """The issue's case: a graph file changed and the manifest rewritten to agree (sizes, sha256s). The
    hashes then all match, so only the signature tells: the old manifest.sig does not verify, and rewriting
    the manifest (write_manifest) drops the stale signature."""
    d = _copy(signed, tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    g = d / "prefill.onnx"
    data = bytearray(g.read_bytes())
    data[len(data) // 2] ^= 0x01
    g.write_bytes(bytes(data))
    old_sig = (d / SIGNATURE).read_bytes()
    write_manifest(d, m)  # every size and sha256 agrees again
    assert not (d / SIGNATURE).exists()
    Bundle(d, trusted_key=False)  # passes every bundle check without a key
    _refused(d, "is not signed", trusted_key=keys / "key")
    (d / SIGNATURE).write_bytes(old_sig)
    _refused(d, "does not verify with the trusted key", trusted_key=keys / "key")


def test_with_a_key_file_hashes_are_checked_even_without_verify_hashes(signed, keys, tmp_path):
    d = _copy(signed, tmp_path)
    f = d / "tokenizer.json"
    f.write_bytes(f.read_bytes().replace(b"{", b"[", 1))  # same size, different bytes; manifest (and sig) intact
    Bundle(d, verify_hashes=False)
    _refused(d, "tokenizer.json does not match its sha256", verify_hashes=False, trusted_key=keys / "key")


def test_without_a_key_signatures_are_ignored(signed, tmp_path):
    Bundle(signed)  # signed, no key configured
    d = _copy(signed, tmp_path)
    (d / SIGNATURE).unlink()
    assert not Bundle(d).signed  # unsigned, no key configured
    (d / SIGNATURE).write_text("garbage")
    Bundle(d)


def test_bad_key_is_a_one_line_error(signed, keys, tmp_path):
    _refused(signed, "cannot read the trusted key file", trusted_key=tmp_path / "missing")
    _refused(signed, "the trusted key file .* is empty", trusted_key=keys / "empty")
    _refused(signed, "cannot read the trusted key file", trusted_key=tmp_path)  # a folder


def test_build_refuses_a_bad_signing_key_before_building(tiny_dir, keys, tmp_path):
    from export.build import build

    for k, match in ((keys / "empty", "signing key file .* is empty"),
                     (tmp_path / "missing", "cannot read the signing key file")):
        with pytest.raises(FirstEdgeError, match=match):
            build("rpi", tmp_path / "out", model=str(tiny_dir), max_context=MAX_CTX, verbose=False, sign_key=str(k))
    assert not (tmp_path / "out").exists()
    r = subprocess.run([sys.executable, "-m", "export.build", "--target", "rpi", "--model", str(tiny_dir),
                        "--out", str(tmp_path / "out"), "--sign-key", str(keys / "empty")], capture_output=True,
                       text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().count("\n") == 0 and "signing key file" in r.stderr and "is empty" in r.stderr


def test_unsigned_build_on_a_host_with_a_trusted_key(tiny_dir, keys, tmp_path, monkeypatch):
    """The build's own validation of an unsigned bundle does not apply this host's FIRST_EDGE_TRUSTED_KEY."""
    from export.build import build

    monkeypatch.setenv(rb.TRUSTED_KEY_ENV, str(keys / "key"))
    out = build("rpi", tmp_path / "u", model=str(tiny_dir), max_context=MAX_CTX, verbose=False)
    assert not (out / SIGNATURE).exists()
    _refused(out, "is not signed")  # but a device with the key refuses it


def test_cli_trusted_key(signed, keys, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != rb.TRUSTED_KEY_ENV}
    base = ["--bundle", signed, "--prompt", "hello", "--max-new-tokens", 2, "--threads", 1]
    r = _python_cli(base + ["--trusted-key", keys / "key"], env)
    assert r.returncode == 0, r.stderr[-2000:]
    for extra, match in (([ "--trusted-key", keys / "other"], "does not verify with the trusted key"),
                         (["--trusted-key", tmp_path / "missing"], "cannot read the trusted key file"),
                         (["--trusted-key", keys / "empty"], "is empty")):
        r = _python_cli(base + extra, env)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], r.stderr
    r = _python_cli(base, dict(env, FIRST_EDGE_TRUSTED_KEY=str(keys / "other")))  # the key from the environment
    assert r.returncode == 2 and "does not verify" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------- C++ runner (ExecuTorch bundle)
@pytest.fixture(scope="module")
def cpp():
    from et_helpers import cpp_build, tiny_bundle

    return cpp_build(asan=os.environ.get("FIRST_EDGE_ASAN") == "1"), tiny_bundle("none")


def _run(build_dir, *args, key_env=None):
    env = {k: v for k, v in os.environ.items() if k != rb.TRUSTED_KEY_ENV}
    if key_env is not None:
        env[rb.TRUSTED_KEY_ENV] = str(key_env)
    return subprocess.run([str(build_dir / "first_edge_run"), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def _cpp_refused(r, match):
    assert r.returncode == 2, (r.returncode, r.stdout[-500:], r.stderr[-1000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], r.stderr


def test_cpp_signed_bundle(cpp, keys, tmp_path):
    build_dir, bundle = cpp
    d = _copy(bundle, tmp_path, "signed")
    _sign(d)
    ids = ["--ids", "1,2,3", "--max-new-tokens", 2, "--threads", 1]
    ok = _run(build_dir, "--bundle", d, *ids, "--trusted-key", keys / "key")
    assert ok.returncode == 0, ok.stderr[-1000:]
    r = _run(build_dir, "--bundle", d, *ids, key_env=keys / "key")
    assert r.returncode == 0 and json.loads(r.stdout)["tokens"] == json.loads(ok.stdout)["tokens"], r.stderr[-1000:]
    assert Bundle(d, trusted_key=keys / "key").signed  # the Python runtime accepts the same signature
    _cpp_refused(_run(build_dir, "--bundle", d, *ids, "--trusted-key", keys / "other"),
                 "does not verify with the trusted key")
    _cpp_refused(_run(build_dir, "--bundle", d, *ids, key_env=keys / "other"), "does not verify with the trusted key")
    _cpp_refused(_run(build_dir, "--bundle", d, *ids, "--trusted-key", keys / "empty"), "is empty")
    _cpp_refused(_run(build_dir, "--bundle", d, *ids, "--trusted-key", tmp_path / "missing"),
                 "cannot read the trusted key file")
    _cpp_refused(_run(build_dir, "--bundle", d, *ids, "--trusted-key", keys / "key", "--no-verify"),
                 "--no-verify does not go with --trusted-key")
    assert _run(build_dir, "--bundle", d, *ids).returncode == 0  # no key configured: the signature is ignored


def test_cpp_unsigned_bundle(cpp, keys, tmp_path):
    build_dir, bundle = cpp
    d = _copy(bundle, tmp_path, "unsigned")
    (d / SIGNATURE).unlink(missing_ok=True)
    ids = ["--ids", "1,2,3", "--max-new-tokens", 2, "--threads", 1]
    assert _run(build_dir, "--bundle", d, *ids).returncode == 0  # as before: no key, no signature needed
    _cpp_refused(_run(build_dir, "--bundle", d, *ids, "--trusted-key", keys / "key"),
                 "is not signed (no manifest.sig) and a trusted key is configured")
    (d / SIGNATURE).write_text("zz" * 32)
    _cpp_refused(_run(build_dir, "--bundle", d, *ids, "--trusted-key", keys / "key"), "is not an HMAC-SHA256 signature")


def test_cpp_altered_bundle(cpp, keys, tmp_path):
    """A manifest changed after signing (one byte of a hash), and the issue's crafted model.pte whose manifest
    was rewritten to agree: refused with the key before ExecuTorch sees the program."""
    build_dir, bundle = cpp
    ids = ["--ids", "1,2,3", "--max-new-tokens", 2, "--threads", 1]
    d = _copy(bundle, tmp_path, "altered")
    _sign(d)
    mf = d / "manifest.json"
    text = mf.read_text()
    h = json.loads(text)["files"]["model.pte"]["sha256"]
    mf.write_text(text.replace(h, ("0" if h[0] != "0" else "1") + h[1:]))
    _cpp_refused(_run(build_dir, "--bundle", d, *ids, "--trusted-key", keys / "key"),
                 "does not verify with the trusted key")

    c = _copy(bundle, tmp_path, "crafted")
    _sign(c)
    old_sig = (c / SIGNATURE).read_bytes()
    pte = c / "model.pte"
    data = bytearray(pte.read_bytes())
    data[len(data) // 2] ^= 0x01
    pte.write_bytes(bytes(data))
    write_manifest(c, json.loads((c / "manifest.json").read_text()))  # sizes and sha256s agree again
    (c / SIGNATURE).write_bytes(old_sig)
    _cpp_refused(_run(build_dir, "--bundle", c, *ids, "--trusted-key", keys / "key"),
                 "does not verify with the trusted key")
