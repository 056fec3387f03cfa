#!/usr/bin/env bash
# The offline Android toolchain of scripts/build_apk.sh and tests/test_android.py, in a private cache.
#
#   bash scripts/android_cache.sh          # set up (idempotent), print the cache folder
#
# Debian packages fetched with a private apt configuration (scripts/debian_cache.sh) and unpacked with
# dpkg-deb -x into $FIRST_EDGE_ANDROID_CACHE (default ~/.cache/first-edge/android)/root; nothing is
# installed system-wide and the system's apt state is untouched:
#   bookworm: aapt (aapt, aapt2) and its android-lib* libraries, zipalign, apksigner (libapksig-java),
#             p7zip-full (Debian's libbacktrace links 7z.so), libzopfli1, libprotobuf-lite32,
#             junit4 + libhamcrest-java and libandroid-json-java (org.json) for the host JUnit tests
#   bullseye: libandroid-23-java (android.jar, API 23) and dalvik-exchange (dx), which Debian 12 dropped;
#             when the mirror no longer serves bullseye, ../shared/android/*.deb (checksummed) are used.
# Then a debug signing key ($CACHE/debug.keystore, password "android", alias "androiddebugkey"), made
# once with the JDK's keytool and kept, so rebuilt APKs install over each other; and $CACHE/env.sh with
# the tool paths (sourced by build_apk.sh; the test reads the same layout).
#
# Environment: FIRST_EDGE_ANDROID_CACHE, FIRST_EDGE_DEBIAN_MIRROR (default deb.debian.org),
# FIRST_EDGE_ANDROID_DEBS (folder of fallback .debs, default ../shared/android beside the repository),
# FIRST_EDGE_ANDROID_OLD_SUITE (default bullseye; a suite the mirror lacks exercises the fallback).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${FIRST_EDGE_ANDROID_CACHE:-$HOME/.cache/first-edge/android}"
MIRROR="${FIRST_EDGE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
FALLBACK="${FIRST_EDGE_ANDROID_DEBS:-$REPO/../shared/android}"
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
PKGS="aapt android-libaapt android-libandroidfw android-libbacktrace android-libbase android-libcutils
android-liblog android-libutils android-libziparchive zipalign libzopfli1 libprotobuf-lite32 p7zip-full
apksigner libapksig-java junit4 libhamcrest-java libandroid-json-java"
OLD_PKGS="libandroid-23-java dalvik-exchange"
OLD_SUITE="${FIRST_EDGE_ANDROID_OLD_SUITE:-bullseye}"

die() { echo "error: $*" >&2; exit 2; }
log() { echo "[android_cache] $*" >&2; }
# shellcheck source=scripts/debian_cache.sh
source "$REPO/scripts/debian_cache.sh"

command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || die "needs apt-get and dpkg-deb (Debian)"
command -v javac >/dev/null && command -v keytool >/dev/null || die "needs a JDK (javac, keytool) on PATH"
[[ "$(uname -m)" == x86_64 ]] || die "the Debian build tools fetched here are amd64"
[[ -r "$KEYRING" ]] || die "missing $KEYRING (debian-archive-keyring)"
mkdir -p "$CACHE"
t0=$(now)

apt_private_init amd64 amd64
NEW_SRC="deb [signed-by=$KEYRING] $MIRROR bookworm main"
OLD_SRC="deb [signed-by=$KEYRING] $MIRROR $OLD_SUITE main"
if ! stamp_ok apt "$NEW_SRC
$OLD_SRC" && ! stamp_ok apt "$NEW_SRC"; then
  t=$(now); log "apt-get update (private configuration)"
  printf '%s\n' "$NEW_SRC" "$OLD_SRC" > "$CACHE/apt/sources.list"
  if apt-get -q "${APT_OPTS[@]}" update >&2; then
    stamp_set apt "$NEW_SRC
$OLD_SRC"
  else  # the old suite is gone from the mirror: bookworm alone, the old packages from the fallback copies
    log "apt-get update with $OLD_SUITE failed: bookworm only"
    printf '%s\n' "$NEW_SRC" > "$CACHE/apt/sources.list"
    apt-get -q "${APT_OPTS[@]}" update >&2 || die "apt-get update failed (no Debian mirror at $MIRROR?)"
    stamp_set apt "$NEW_SRC"
  fi
  rm -f "$CACHE"/.stamp-debs "$CACHE"/.stamp-olddebs; log "  done in $(since "$t") s"
fi

# the bullseye packages: from the mirror, else the checksummed fallback copies
if ! stamp_ok olddebs "$OLD_PKGS" || ! ls "$CACHE"/apt/olddebs/*.deb >/dev/null 2>&1; then
  mkdir -p "$CACHE/apt/olddebs" && rm -f "$CACHE"/apt/olddebs/*.deb
  # shellcheck disable=SC2086
  if ! (cd "$CACHE/apt/olddebs" && apt-get -q "${APT_OPTS[@]}" download $OLD_PKGS >&2); then
    log "bullseye download failed: using the copies in $FALLBACK"
    (cd "$FALLBACK" && sha256sum -c SHA256SUMS >&2) || die "no bullseye mirror and no valid copies in $FALLBACK"
    cp "$FALLBACK"/*.deb "$CACHE/apt/olddebs/"
  fi
  stamp_set olddebs "$OLD_PKGS"; rm -f "$CACHE/.stamp-root"
fi
# shellcheck disable=SC2086
apt_private_download root $PKGS

key="$(cd "$CACHE/apt" && ls debs/*.deb olddebs/*.deb | tr '\n' ' ')"
BT=usr/lib/android-sdk/build-tools/debian
if ! stamp_ok root "$key" || [[ ! -x "$CACHE/root/$BT/aapt2" ]]; then
  t=$(now); log "dpkg-deb -x into $CACHE/root"
  rm -rf "$CACHE/root.tmp" && mkdir -p "$CACHE/root.tmp"
  for d in "$CACHE"/apt/debs/*.deb "$CACHE"/apt/olddebs/*.deb; do dpkg-deb -x "$d" "$CACHE/root.tmp"; done
  rm -rf "$CACHE/root" && mv "$CACHE/root.tmp" "$CACHE/root"
  stamp_set root "$key"; log "  done in $(since "$t") s"
fi

R="$CACHE/root"
if [[ ! -s "$CACHE/debug.keystore" ]]; then
  log "keytool: debug signing key $CACHE/debug.keystore"
  keytool -genkeypair -keystore "$CACHE/debug.keystore.tmp" -storepass android -keypass android \
    -alias androiddebugkey -keyalg RSA -keysize 2048 -validity 10000 -storetype PKCS12 \
    -dname "CN=Android Debug,O=Android,C=US" >/dev/null 2>&1
  mv "$CACHE/debug.keystore.tmp" "$CACHE/debug.keystore"
fi

cat > "$CACHE/env.sh" <<EOF
# written by scripts/android_cache.sh
ANDROID_ROOT="$R"
AAPT="$R/$BT/aapt"
AAPT2="$R/$BT/aapt2"
ZIPALIGN="$R/$BT/zipalign"
# apksigner: java -cp \$APKSIGNER_CP com.android.apksigner.ApkSignerTool
APKSIGNER_CP="$R/usr/share/java/apksigner.jar:$R/usr/share/java/apksig.jar"
DX_JAR="$R/usr/share/java/com.android.dx.jar"
ANDROID_JAR="$R/usr/share/java/com.android.android-23.jar"
JUNIT_CP="$R/usr/share/java/junit4.jar:$R/usr/share/java/hamcrest.jar:$R/usr/share/java/com.android.json.jar"
ANDROID_LD_LIBRARY_PATH="$R/usr/lib/x86_64-linux-gnu/android:$R/usr/lib/x86_64-linux-gnu:$R/usr/lib/p7zip:$R/usr/lib"
DEBUG_KEYSTORE="$CACHE/debug.keystore"
EOF
# shellcheck disable=SC1091
source "$CACHE/env.sh"
for f in "$ANDROID_JAR" "$DX_JAR" "$R/usr/share/java/apksig.jar" "$R/usr/share/java/junit4.jar" "$R/usr/share/java/com.android.json.jar"; do
  [[ -s "$f" ]] || die "missing $f after unpacking"
done
LD_LIBRARY_PATH="$ANDROID_LD_LIBRARY_PATH" "$AAPT2" version >/dev/null 2>&1 || die "aapt2 does not run (missing library?)"
log "ready in $(since "$t0") s"
echo "$CACHE"
