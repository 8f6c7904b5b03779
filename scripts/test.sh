#!/usr/bin/env bash
# The one test command (README, .ci/run): installs what the tests need when missing,
# then runs formatting, lints, every test (unit, property, end-to-end against real
# components and the image corpus) and a bounded fuzzing pass.
#
# Everything slow to install is cached outside the checkout, under TESSERA_CACHE:
# the image corpus, and a Python virtual environment for the `oras` client and the
# corpus's wheels (Debian 12's system python refuses `pip install`).
#
# Env: TESSERA_CACHE (default /var/cache/tessera), TESSERA_CORPUS (default
#      $TESSERA_CACHE/corpus), FUZZ_SECONDS per fuzz target (default 20; 0 skips fuzzing).
set -Eeuo pipefail
cd "$(dirname "$0")/.."
export TESSERA_CACHE=${TESSERA_CACHE:-/var/cache/tessera}
export TESSERA_CORPUS=${TESSERA_CORPUS:-$TESSERA_CACHE/corpus}
export TESSERA_VENV=${TESSERA_VENV:-$TESSERA_CACHE/venv}
FUZZ_SECONDS=${FUZZ_SECONDS:-20}
# Test tools installed with `cargo install`, pinned so a fresh machine gets what we tested.
CARGO_FUZZ_VERSION=0.13.2
# This run's logs: its own directory, printed at the end (nothing at fixed paths in /tmp).
RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/tessera-test.XXXXXX")
step() { printf '\n=== %s ===\n' "$*"; }

if [ "$(id -u)" != 0 ]; then
  echo "scripts/test.sh must run as root: the tests create device nodes, set owners and xattrs, and build the corpus with debootstrap" >&2
  exit 1
fi

step "system packages"
need=()
for t in umoci:umoci skopeo:skopeo docker-registry:docker-registry debootstrap:debootstrap jq:jq zstd:zstd tar:tar openssl:openssl \
         podman:podman buildah:buildah containerd:containerd ctr:containerd runc:runc htpasswd:apache2-utils \
         ip:iproute2 tc:iproute2 dockerd:docker.io; do
  command -v "${t%%:*}" >/dev/null || need+=("${t#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  for i in 1 2 3; do apt-get install -y -q "${need[@]}" && break; [ "$i" = 3 ] && exit 1; sleep 2; done
fi

step "containerd 2.x ($TESSERA_CACHE/containerd2)"
# The node tests run containerd 2.x (ctr pull through the transfer service, which passes
# image information to remote snapshotters); Debian 12's own is 1.6.
TESSERA_CONTAINERD2=$(bash scripts/containerd2.sh "$TESSERA_CACHE/containerd2")
export TESSERA_CONTAINERD2

step "Docker Engine 28 ($TESSERA_CACHE/docker28)"
# Docker with containerd's image store and tessera as its snapshotter needs Docker 24+;
# Debian 12's is 20.10. Unstable's dockerd and docker CLI, unpacked (not installed).
bash scripts/sid-unpack.sh "$TESSERA_CACHE/docker28" docker.io docker-cli
export TESSERA_DOCKER28=$TESSERA_CACHE/docker28/usr/bin
"$TESSERA_DOCKER28/dockerd" --version

step "python packages ($TESSERA_VENV)"
# oras-py drives the artifact/referrers test; pip reads the machine's own index config.
if ! "$TESSERA_VENV/bin/python3" -m pip --version >/dev/null 2>&1; then
  python3 -m venv "$TESSERA_VENV" 2>/dev/null || {
    apt-get install -y -q python3-venv && python3 -m venv "$TESSERA_VENV"
  }
fi
"$TESSERA_VENV/bin/python3" -c 'import oras' 2>/dev/null || "$TESSERA_VENV/bin/python3" -m pip install -q oras
export TESSERA_PYTHON=$TESSERA_VENV/bin/python3

step "rust components"
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

step "image corpus ($TESSERA_CORPUS)"
bash scripts/corpus.sh "$TESSERA_CORPUS" > "$RUN_DIR/corpus.log" 2>&1 || { tail -40 "$RUN_DIR/corpus.log"; exit 1; }
tail -3 "$RUN_DIR/corpus.log"

if [ "$FUZZ_SECONDS" != 0 ]; then
  step "fuzzing (${FUZZ_SECONDS}s per target)"
  if [ "$(cargo fuzz --version 2>/dev/null | awk '{print $2}')" != "$CARGO_FUZZ_VERSION" ]; then
    cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
  fi
  bash scripts/fuzz.sh "$FUZZ_SECONDS"
fi

step "cargo test (logs in $RUN_DIR)"
export TESSERA_TEST_LOGS=$RUN_DIR
# Not under `set -e` here: a failing test must still reach the summary below.
set +e
cargo test --workspace --no-fail-fast 2>&1 | tee "$RUN_DIR/test.log"
rc=${PIPESTATUS[0]}
set -e
passed=$(grep -Eo 'test result: [a-zA-Z]+\. [0-9]+ passed' "$RUN_DIR/test.log" | awk '{s+=$4} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' "$RUN_DIR/test.log" | awk '{s+=$1} END {print s+0}')
echo
echo "logs: $RUN_DIR"
echo "tests: $passed passed, $failed failed"
exit "$rc"
