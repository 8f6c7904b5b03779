#!/usr/bin/env bash
# The one test command (README, .ci/run): installs what the tests need when missing,
# then runs formatting, lints, every test (unit, property, end-to-end against real
# components and the image corpus) and a bounded fuzzing pass.
#
# Env: TESSERA_CORPUS (default /var/cache/tessera/corpus), SHARED (default ../shared),
#      FUZZ_SECONDS per fuzz target (default 20; 0 skips fuzzing).
set -Eeuo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
SHARED=${SHARED:-$ROOT/../shared}
export TESSERA_CORPUS=${TESSERA_CORPUS:-/var/cache/tessera/corpus}
FUZZ_SECONDS=${FUZZ_SECONDS:-20}
step() { printf '\n=== %s ===\n' "$*"; }

if [ "$(id -u)" != 0 ]; then
  echo "scripts/test.sh must run as root: the tests create device nodes, set owners and xattrs, and build the corpus with debootstrap" >&2
  exit 1
fi

step "system packages"
need=()
for t in umoci:umoci skopeo:skopeo docker-registry:docker-registry debootstrap:debootstrap jq:jq zstd:zstd tar:tar openssl:openssl \
         podman:podman buildah:buildah containerd:containerd ctr:containerd runc:runc htpasswd:apache2-utils; do
  command -v "${t%%:*}" >/dev/null || need+=("${t#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  for i in 1 2 3; do apt-get install -y -q "${need[@]}" && break; [ "$i" = 3 ] && exit 1; sleep 2; done
fi

step "python packages"
# oras-py drives the artifact/referrers test; pip reads the machine's own index config.
python3 -c 'import oras' 2>/dev/null || python3 -m pip install -q oras

step "rust components"
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

step "image corpus ($TESSERA_CORPUS)"
[ -x "$SHARED/corpus/make-corpus.sh" ] || [ -f "$SHARED/corpus/make-corpus.sh" ] || { echo "missing $SHARED/corpus/make-corpus.sh (set SHARED=path/to/shared)" >&2; exit 1; }
bash "$SHARED/corpus/make-corpus.sh" "$TESSERA_CORPUS" > /tmp/tessera-corpus.log 2>&1 || { tail -40 /tmp/tessera-corpus.log; exit 1; }
tail -3 /tmp/tessera-corpus.log

if [ "$FUZZ_SECONDS" != 0 ]; then
  step "fuzzing (${FUZZ_SECONDS}s per target)"
  bash scripts/fuzz.sh "$FUZZ_SECONDS"
fi

step "cargo test"
cargo test --workspace --no-fail-fast 2>&1 | tee /tmp/tessera-test.log
rc=${PIPESTATUS[0]}
passed=$(grep -Eo 'test result: [a-zA-Z]+\. [0-9]+ passed' /tmp/tessera-test.log | awk '{s+=$4} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' /tmp/tessera-test.log | awk '{s+=$1} END {print s+0}')
echo
echo "tests: $passed passed, $failed failed"
exit "$rc"
