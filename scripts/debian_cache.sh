# Sourced by scripts/aarch64.sh and scripts/fuzz_cpp.sh: Debian packages fetched into a private cache with a
# private apt configuration (nothing installed system-wide, the system's apt state untouched).
# The caller defines CACHE, KEYRING and log(); steps are idempotent through stamps in $CACHE.

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }
# a stamp holds what a step was done with; the step is redone when that changes (or was interrupted)
stamp_ok() { [[ -f "$CACHE/.stamp-$1" && "$(cat "$CACHE/.stamp-$1")" == "$2" ]]; }
stamp_set() { printf '%s' "$2" > "$CACHE/.stamp-$1"; }

# apt_private_init ARCH [MORE_ARCH...]: APT_OPTS for a private apt under $CACHE/apt (ARCH the native one)
apt_private_init() {
  APT_OPTS=(-o "Dir::State=$CACHE/apt/state" -o "Dir::State::status=$CACHE/apt/status"
    -o "Dir::Cache=$CACHE/apt/cache" -o "Dir::Etc::SourceList=$CACHE/apt/sources.list"
    -o "Dir::Etc::SourceParts=/dev/null" -o "Dir::Etc::Preferences=/dev/null" -o "Dir::Etc::PreferencesParts=/dev/null"
    -o "APT::Architecture=$1")
  local a
  for a in "$@"; do APT_OPTS+=(-o "APT::Architectures::=$a"); done
  APT_OPTS+=(-o "APT::Sandbox::User=$(id -un)" -o "Debug::NoLocking=1")
  mkdir -p "$CACHE/apt/state/lists/partial" "$CACHE/apt/cache/archives/partial" "$CACHE/apt/debs"
  touch "$CACHE/apt/status"
}

# apt_private_update SOURCES_LIST_TEXT: apt-get update once per sources list (then the downloads are redone)
apt_private_update() {
  local t
  if ! stamp_ok apt "$1"; then
    t=$(now); log "apt-get update (private configuration)"
    printf '%s\n' "$1" > "$CACHE/apt/sources.list"
    apt-get -q "${APT_OPTS[@]}" update >&2
    stamp_set apt "$1"; rm -f "$CACHE"/.stamp-debs; log "  done in $(since "$t") s"
  fi
}

# apt_private_download "STAMPS REDONE AFTER" PKG...: the .debs into $CACHE/apt/debs, once per package list
apt_private_download() {
  local t after="$1" s
  shift
  if ! stamp_ok debs "$*"; then
    t=$(now); log "apt-get download $*"
    rm -f "$CACHE"/apt/debs/*.deb
    (cd "$CACHE/apt/debs" && apt-get -q "${APT_OPTS[@]}" download "$@" >&2)
    stamp_set debs "$*"
    for s in $after; do rm -f "$CACHE/.stamp-$s"; done
    log "  done in $(since "$t") s"
  fi
}
