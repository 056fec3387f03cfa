#!/usr/bin/env bash
# libFuzzer campaign for the C++ runner's manifest.json parsing and bundle validation
# (runtime/cpp/fuzz/fuzz_manifest.cpp: Json::parse + first_edge::load_bundle_info, no ExecuTorch).
#
#   bash scripts/fuzz_cpp.sh [--seconds N | --runs N] [--seed-manifest FILE]... [--setup-only] [--fresh]
#
# --seconds N  run for N seconds (libFuzzer -max_total_time; default 60)
# --runs N     run exactly N inputs instead (-runs; a short fixed run, what tests/test_fuzz_cpp.py does)
# --seed-manifest FILE  an extra real bundle manifest.json for the seed corpus (repeatable); the
#              committed runtime/cpp/fuzz/seeds/*.json are always used
# --fresh      start from the seeds again (drop the grown corpus)
# --setup-only fetch/unpack clang and build the target, then stop
# Exit status: 0 no crash, 1 libFuzzer found a crash/leak/timeout (artifact printed), 2 usage/setup error.
#
# Clang (once, idempotent; nothing is installed into the system, the system's apt state is untouched):
# a private apt configuration downloads Debian bookworm's clang-14 and its LLVM libraries (amd64) and
# dpkg-deb -x unpacks them into $FIRST_EDGE_CLANG_CACHE (default ~/.cache/first-edge/clang); the
# unpacked clang runs with LD_LIBRARY_PATH on its libraries and links with the system's gcc-12
# libstdc++ and binutils ld. A clang++ already on PATH is not used unless FIRST_EDGE_CLANGXX names it.
# Everything else lives in runtime/cpp/build-fuzz/ (gitignored): the binary, seeds/ (made from the seed
# manifests), corpus/ (grown by the campaigns, kept between runs), artifacts/ (crash-*, timeout-*, ...),
# and last.log (libFuzzer's output of the last run).
#
# Environment: FIRST_EDGE_CLANG_CACHE, FIRST_EDGE_CLANGXX, FIRST_EDGE_DEBIAN_MIRROR (default deb.debian.org),
# FIRST_EDGE_FUZZ_JOBS (libFuzzer -jobs/-workers, default 1), FIRST_EDGE_FUZZ_DIR (instead of build-fuzz/).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${FIRST_EDGE_CLANG_CACHE:-$HOME/.cache/first-edge/clang}"
MIRROR="${FIRST_EDGE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
PKGS="clang-14 libclang-cpp14 libllvm14 libclang-common-14-dev libclang-rt-14-dev llvm-14"
OUTDIR="${FIRST_EDGE_FUZZ_DIR:-$REPO/runtime/cpp/build-fuzz}"
JOBS="${FIRST_EDGE_FUZZ_JOBS:-1}"

SECONDS_=60 RUNS="" SETUP_ONLY=0 FRESH=0 SEEDS=()
usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --seconds) SECONDS_="$2"; RUNS=""; shift 2 ;;
    --runs) RUNS="$2"; shift 2 ;;
    --seed-manifest) SEEDS+=("$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"); shift 2 ;;
    --setup-only) SETUP_ONLY=1; shift ;;
    --fresh) FRESH=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done

die() { echo "error: $*" >&2; exit 2; }
log() { echo "[fuzz_cpp] $*" >&2; }
# shellcheck source=scripts/debian_cache.sh
source "$REPO/scripts/debian_cache.sh"

setup_clang() {
  local t0 t key
  t0=$(now)
  if [[ -n "${FIRST_EDGE_CLANGXX:-}" ]]; then  # a given clang++: no download
    CXX="$FIRST_EDGE_CLANGXX"
    [[ -x "$CACHE/root/usr/lib/llvm-14/bin/llvm-symbolizer" ]] &&
      export ASAN_SYMBOLIZER_PATH="$CACHE/root/usr/lib/llvm-14/bin/llvm-symbolizer"
    return
  fi
  [[ "$(uname -m)" == x86_64 ]] || die "the clang download is for x86_64 hosts; set FIRST_EDGE_CLANGXX"
  command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || die "needs apt-get and dpkg-deb (Debian), or FIRST_EDGE_CLANGXX"
  [[ -r "$KEYRING" ]] || die "missing $KEYRING (debian-archive-keyring)"
  apt_private_init amd64 amd64
  apt_private_update "deb [signed-by=$KEYRING] $MIRROR bookworm main
deb [signed-by=$KEYRING] $MIRROR bookworm-updates main"
  # shellcheck disable=SC2086
  apt_private_download root $PKGS
  key="$(cd "$CACHE/apt/debs" && ls ./*.deb | tr '\n' ' ')"
  if ! stamp_ok root "$key" || [[ ! -x "$CACHE/root/usr/lib/llvm-14/bin/clang" ]]; then
    t=$(now); log "dpkg-deb -x into $CACHE/root"
    rm -rf "$CACHE/root.tmp" && mkdir -p "$CACHE/root.tmp"
    local d
    for d in "$CACHE"/apt/debs/*.deb; do dpkg-deb -x "$d" "$CACHE/root.tmp"; done
    rm -rf "$CACHE/root" && mv "$CACHE/root.tmp" "$CACHE/root"
    stamp_set root "$key"; log "  done in $(since "$t") s"
  fi
  # a wrapper so that the unpacked clang finds its libLLVM/libclang-cpp (the resource dir, with the
  # sanitizer and libFuzzer runtimes, is found relative to the binary: ../lib/clang/14.*)
  cat > "$CACHE/clang++" <<EOF
#!/bin/sh
export LD_LIBRARY_PATH="$CACHE/root/usr/lib/llvm-14/lib:$CACHE/root/usr/lib/x86_64-linux-gnu\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$CACHE/root/usr/lib/llvm-14/bin/clang++" "\$@"
EOF
  chmod +x "$CACHE/clang++"
  CXX="$CACHE/clang++"
  "$CXX" --version >/dev/null 2>&1 || die "the unpacked clang does not run: $("$CXX" --version 2>&1 | head -3)"
  export ASAN_SYMBOLIZER_PATH="$CACHE/root/usr/lib/llvm-14/bin/llvm-symbolizer"
  log "clang ready ($(since "$t0") s): $("$CXX" --version | head -1)"
}

build() {
  local src="$REPO/runtime/cpp/src" t
  mkdir -p "$OUTDIR"
  local inputs=("$REPO/runtime/cpp/fuzz/fuzz_manifest.cpp" "$src/bundle_info.cpp" "$src/third_party/json.cpp"
                "$src/third_party/sha256.cpp")
  local bin="$OUTDIR/fuzz_manifest" newer=0 f
  for f in "${inputs[@]}" "$src/first_runner.h" "$src/third_party/json.h" "$src/third_party/sha256.h" "$0"; do
    [[ -x "$bin" && "$f" -ot "$bin" ]] || newer=1
  done
  if [[ $newer == 1 ]]; then
    t=$(now); log "building $bin"
    "$CXX" -std=c++17 -g -O1 -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined \
      -fno-sanitize-recover=undefined -I"$src" -I"$src/third_party" "${inputs[@]}" -o "$bin.tmp"
    mv "$bin.tmp" "$bin"; log "  built in $(since "$t") s"
  fi
}

# seed corpus: each real manifest with its "files" rewritten to the fuzz target's small fake bundle files
# (their sizes and sha256, so that a valid seed passes load_bundle_info completely), plus a few variants
make_seeds() {
  local fake="$OUTDIR/fake-files"
  rm -rf "$fake" "$OUTDIR/seeds" && mkdir -p "$fake" "$OUTDIR/seeds"
  FIRST_EDGE_FUZZ_EXPORT="$fake" "$OUTDIR/fuzz_manifest" >/dev/null 2>&1 || die "cannot export the fake bundle files"
  python3 - "$fake" "$OUTDIR/seeds" "$REPO"/runtime/cpp/fuzz/seeds/*.json "${SEEDS[@]}" <<'EOF'
import copy, hashlib, json, os, sys
fake, out, mans = sys.argv[1], sys.argv[2], sys.argv[3:]
files = {n: {"sha256": hashlib.sha256(open(os.path.join(fake, n), "rb").read()).hexdigest(),
             "bytes": os.path.getsize(os.path.join(fake, n))} for n in sorted(os.listdir(fake))}
n = 0
def put(tag, obj, raw=None):
    global n
    n += 1
    data = raw if raw is not None else json.dumps(obj, indent=1).encode()
    open(os.path.join(out, "%03d-%s.json" % (n, tag)), "wb").write(data)
for path in mans:
    m = json.load(open(path))
    base = os.path.basename(path).rsplit(".", 1)[0]
    m["files"] = copy.deepcopy(files)
    if isinstance(m.get("graphs"), dict): m["graphs"]["files"] = ["model.pte"]
    put(base + "-valid", m)
    put(base + "-compact", None, json.dumps(m, separators=(",", ":")).encode())
    v = copy.deepcopy(m); v["files"]["model.pte"]["sha256"] = "0" * 64; put(base + "-badhash", v)
    v = copy.deepcopy(m); v["files"]["model.pte"]["bytes"] += 1; put(base + "-badsize", v)
    v = copy.deepcopy(m); v["files"]["../manifest.json"] = files["report.md"]; put(base + "-escape", v)
    v = copy.deepcopy(m); v["files"]["sub/x.bin"] = files["report.md"]; put(base + "-subdir", v)
    v = copy.deepcopy(m); v.get("graphs", {}).pop("methods", None); put(base + "-nomethods", v)
    if isinstance(m.get("model"), dict):
        v = copy.deepcopy(m); v["model"]["n_layers"] = 1; put(base + "-layers1", v)
        v = copy.deepcopy(m); v["model"]["n_layers"] = -1; put(base + "-layersneg", v)
        v = copy.deepcopy(m); v["model"]["n_layers"] = 1e300; put(base + "-layershuge", v)  # was UB in as_int
    put(base + "-truncated", None, json.dumps(m).encode()[: len(json.dumps(m)) // 2])
put("escapes", None, b'{"a":"\\u00e9\\ud83d\\ude00\\n\\t\\"","b":[1e308,-0.5e-3,12345678901234567890,true,false,null]}')
put("nested", None, b"[" * 64 + b"]" * 64)
print(n)
EOF
}

setup_clang
build
[[ $SETUP_ONLY == 1 ]] && { log "setup done: $OUTDIR/fuzz_manifest"; exit 0; }

nseeds=$(make_seeds)
mkdir -p "$OUTDIR/corpus" "$OUTDIR/artifacts"
[[ $FRESH == 1 ]] && rm -rf "$OUTDIR/corpus" && mkdir -p "$OUTDIR/corpus"
if [[ -n "$RUNS" ]]; then limit=(-runs="$RUNS"); what="$RUNS runs"; else limit=(-max_total_time="$SECONDS_"); what="$SECONDS_ s"; fi
par=(); [[ "$JOBS" -gt 1 ]] && par=(-jobs="$JOBS" -workers="$JOBS")
log "fuzzing for $what ($nseeds seeds, corpus $(ls "$OUTDIR/corpus" | wc -l) files before)"
rc=0
(cd "$OUTDIR" && "$OUTDIR/fuzz_manifest" "${limit[@]}" -timeout=5 -rss_limit_mb=2048 -max_len=65536 \
   -print_final_stats=1 -artifact_prefix="$OUTDIR/artifacts/" "${par[@]}" \
   "$OUTDIR/corpus" "$OUTDIR/seeds") > "$OUTDIR/last.log" 2>&1 || rc=$?
last="$(grep -E '^#[0-9]+' "$OUTDIR/last.log" | tail -1 || true)"
execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$OUTDIR/last.log" | tail -1)"
rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$OUTDIR/last.log" | tail -1)"
echo "executions: ${execs:-?}  exec/s: ${rate:-?}  corpus: $(ls "$OUTDIR/corpus" | wc -l) files"
echo "last status: ${last:-none}"
if [[ $rc != 0 ]]; then
  echo "CRASH (libFuzzer exit $rc); log: $OUTDIR/last.log"
  grep -E 'ERROR: |SUMMARY: |runtime error|Test unit written|^    #[0-9]' "$OUTDIR/last.log" | head -40
  exit 1
fi
echo "no crash"
