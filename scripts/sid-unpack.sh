#!/usr/bin/env bash
# Unpack Debian packages from the unstable suite under DIR (never installed), for the
# tests that need newer components than the system's: containerd 2.x (Debian 12 has
# 1.6) and Docker Engine 28 (Debian 12 has 20.10). The packages come through the mirror
# this machine's own apt configuration names. Programs in usr/sbin are linked into
# usr/bin, so DIR/usr/bin holds them all; the suite's runc is dropped (it needs a newer
# glibc; the system's runc is used).
#
# Usage: scripts/sid-unpack.sh DIR PACKAGE...   (does nothing when DIR has them already)
set -Eeuo pipefail
dir=${1:?usage: scripts/sid-unpack.sh DIR PACKAGE...}
shift
[ $# -gt 0 ] || { echo "usage: scripts/sid-unpack.sh DIR PACKAGE..." >&2; exit 2; }
want="$*"
if [ -f "$dir/.packages" ] && [ "$(cat "$dir/.packages")" = "$want" ]; then
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
  echo "scripts/sid-unpack.sh: no Debian mirror in /etc/apt (sources.list or *.sources); cannot fetch $want" >&2
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
(cd "$work" && apt-get -qq "${opts[@]}" download "$@" >&2)
rm -rf "$dir.partial"
mkdir -p "$dir.partial"
for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$dir.partial"; done
rm -f "$dir.partial/usr/bin/runc" "$dir.partial/usr/sbin/runc"
mkdir -p "$dir.partial/usr/bin"
if [ -d "$dir.partial/usr/sbin" ]; then
  for f in "$dir.partial"/usr/sbin/*; do ln -sf "../sbin/$(basename "$f")" "$dir.partial/usr/bin/"; done
fi
echo "$want" > "$dir.partial/.packages"
rm -rf "$dir"
mv "$dir.partial" "$dir"
