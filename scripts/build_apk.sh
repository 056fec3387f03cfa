#!/usr/bin/env bash
# Offline build of the Android app (android_demo/) into a signed debug APK, with Debian's build tools
# (no Gradle, no Google Maven, no NDK).
#
#   bash scripts/build_apk.sh [--out APK] [--native-libs DIR] [--setup-only]
#
# --out APK          where to write it (default android_demo/build/apk/first-edge-demo-debug.apk)
# --native-libs DIR  pack DIR/*.so (or DIR/arm64-v8a/*.so) as lib/arm64-v8a/ in the APK: the JNI bridge
#                    libfirst_edge_jni.so and the ExecuTorch libraries it needs, built with the NDK
#                    elsewhere (docs/android.md); without it the APK has no native code and the app says
#                    so instead of chatting
# --setup-only       set up the toolchain cache (scripts/android_cache.sh) and stop
#
# Steps: aapt2 compile + link (resources, manifest, android.jar API 23, R.java), javac -source/-target 8
# against android.jar, dx to classes.dex, zip (+ native libraries), zipalign -p 4, apksigner with the
# debug key kept in the cache (so a rebuilt APK installs over the previous one). Work files go to
# android_demo/build/apk/ (gitignored). Prints the APK's path.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
APP="$REPO/android_demo/app/src/main"
WORK="$REPO/android_demo/build/apk"
OUT="$WORK/first-edge-demo-debug.apk"
NATIVE="" SETUP_ONLY=0
usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --native-libs) NATIVE="$2"; shift 2 ;;
    --setup-only) SETUP_ONLY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done
die() { echo "error: $*" >&2; exit 2; }
log() { echo "[build_apk] $*" >&2; }

CACHE="$(bash "$REPO/scripts/android_cache.sh")" || die "the Android toolchain cache could not be set up"
# shellcheck disable=SC1091
source "$CACHE/env.sh"
[[ $SETUP_ONLY == 1 ]] && { echo "$CACHE"; exit 0; }
export LD_LIBRARY_PATH="$ANDROID_LD_LIBRARY_PATH${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

LIBS=()
if [[ -n "$NATIVE" ]]; then
  [[ -d "$NATIVE" ]] || die "--native-libs: no folder $NATIVE"
  d="$NATIVE"; [[ -d "$NATIVE/arm64-v8a" ]] && d="$NATIVE/arm64-v8a"
  shopt -s nullglob; LIBS=("$d"/*.so); shopt -u nullglob
  [[ ${#LIBS[@]} -gt 0 ]] || die "--native-libs: no .so files in $d"
  for f in "${LIBS[@]}"; do
    # an arm64 ELF shared object: e_machine 183 (AArch64) at byte 18
    [[ "$(head -c 4 "$f" | od -An -c | tr -d ' ')" == '177ELF' ]] || die "$f is not an ELF file"
    m=$(od -An -t u2 -j 18 -N 2 "$f" | tr -d ' ')
    [[ "$m" == 183 ]] || die "$f is not built for arm64-v8a (ELF machine $m, expected 183 AArch64)"
  done
fi

t0=$(date +%s.%N)
rm -rf "$WORK/tmp" && mkdir -p "$WORK/tmp/gen" "$WORK/tmp/classes" "$WORK/tmp/dex" "$(dirname "$OUT")"
T="$WORK/tmp"
log "aapt2 compile + link"
"$AAPT2" compile --dir "$APP/res" -o "$T/res.zip"
"$AAPT2" link -o "$T/base.apk" -I "$ANDROID_JAR" --manifest "$APP/AndroidManifest.xml" --java "$T/gen" \
  --min-sdk-version 23 --target-sdk-version 24 --version-code 1 --version-name 0.1.0 --auto-add-overlay "$T/res.zip"
log "javac (Java 8, android.jar API 23)"
find "$APP/java" "$T/gen" -name '*.java' > "$T/sources.txt"
javac -source 8 -target 8 -Xlint:-options -encoding UTF-8 -bootclasspath "$ANDROID_JAR" -classpath "$ANDROID_JAR" \
  -d "$T/classes" @"$T/sources.txt"
log "dx"
java -jar "$DX_JAR" --dex --min-sdk-version=23 --output="$T/dex/classes.dex" "$T/classes"
cp "$T/base.apk" "$T/unaligned.apk"
(cd "$T/dex" && zip -q -X "$T/unaligned.apk" classes.dex)
if [[ ${#LIBS[@]} -gt 0 ]]; then
  log "packing ${#LIBS[@]} native libraries as lib/arm64-v8a/"
  mkdir -p "$T/native/lib/arm64-v8a" && cp "${LIBS[@]}" "$T/native/lib/arm64-v8a/"
  (cd "$T/native" && zip -q -X -r "$T/unaligned.apk" lib)
fi
"$ZIPALIGN" -f -p 4 "$T/unaligned.apk" "$T/aligned.apk"
log "apksigner (debug key $DEBUG_KEYSTORE)"
java -cp "$APKSIGNER_CP" com.android.apksigner.ApkSignerTool sign --ks "$DEBUG_KEYSTORE" --ks-pass pass:android \
  --key-pass pass:android --ks-key-alias androiddebugkey --min-sdk-version 23 --out "$OUT.tmp" "$T/aligned.apk"
mv "$OUT.tmp" "$OUT" && rm -f "$OUT.tmp.idsig"
log "done in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s"
echo "$OUT"
