#!/usr/bin/env bash
# Put containerd 2.x (containerd, ctr, containerd-shim-runc-v2) under DIR/usr/bin, for
# the node tests when the system's containerd is 1.x (Debian 12 has 1.6). The package
# comes from Debian's unstable suite through the mirror this machine's own apt
# configuration names; it is unpacked, never installed, and the system's runc is used.
#
# Usage: scripts/containerd2.sh DIR      (prints DIR/usr/bin; does nothing when present)
set -Eeuo pipefail
dir=${1:?usage: scripts/containerd2.sh DIR}
bin=$dir/usr/bin
if [ -x "$bin/containerd" ] && "$bin/containerd" --version 2>/dev/null | grep -q ' v\?2\.'; then
  echo "$bin"
  exit 0
fi
# The machine's Debian mirror: the first URI of a deb822 source or sources.list line
# that serves the main archive (not the security one).
mirror=$(
  { cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/ {print $2}'
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; break}}'
  } | grep -v -- '-security' | grep -i 'debian' | head -1
) || true
if [ -z "$mirror" ]; then
  echo "scripts/containerd2.sh: no Debian mirror in /etc/apt (sources.list or *.sources); cannot fetch containerd 2.x" >&2
  exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror sid main" > "$work/sources.list"
opts=(-o "Dir::Etc::SourceList=$work/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
      -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache"
      -o "Dir::State::status=/var/lib/dpkg/status" -o "APT::Sandbox::User=root")
for i in 1 2 3; do apt-get -qq "${opts[@]}" update >&2 && break; [ "$i" = 3 ] && exit 1; sleep 2; done
(cd "$work" && apt-get -qq "${opts[@]}" download containerd >&2)
mkdir -p "$dir.partial"
dpkg-deb -x "$work"/containerd_*.deb "$dir.partial"
# The suite's runc needs a newer glibc; the system's runc is used instead.
rm -f "$dir.partial/usr/bin/runc" "$dir.partial/usr/sbin/runc"
"$dir.partial/usr/bin/containerd" --version >&2
rm -rf "$dir"
mv "$dir.partial" "$dir"
echo "$bin"
