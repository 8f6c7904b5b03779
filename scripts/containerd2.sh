#!/usr/bin/env bash
# Put containerd 2.x (containerd, ctr, containerd-shim-runc-v2) under DIR/usr/bin, for
# the node tests when the system's containerd is 1.x (Debian 12 has 1.6): Debian
# unstable's package, unpacked by scripts/sid-unpack.sh; the system's runc is used.
#
# Usage: scripts/containerd2.sh DIR      (prints DIR/usr/bin; does nothing when present)
set -Eeuo pipefail
dir=${1:?usage: scripts/containerd2.sh DIR}
bin=$dir/usr/bin
if [ -x "$bin/containerd" ] && "$bin/containerd" --version 2>/dev/null | grep -q ' v\?2\.'; then
  echo "$bin"
  exit 0
fi
"$(dirname "$0")/sid-unpack.sh" "$dir" containerd
"$bin/containerd" --version >&2
echo "$bin"
