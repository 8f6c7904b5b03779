#!/usr/bin/env bash
# Quick start: build tessera, make two small OCI images from this machine's own files
# (no registry, nothing to install), convert them into a local tessera store with chunk
# dedup, inspect, unpack and verify the unpacked tree against the source files.
#
#   scripts/demo.sh [WORKDIR]      (default ./tessera-demo)
set -Eeuo pipefail
cd "$(dirname "$0")/.."
W=$(realpath -m "${1:-./tessera-demo}")
rm -rf "$W"; mkdir -p "$W"
cargo build --release -q
T=${CARGO_TARGET_DIR:-$PWD/target}/release/tessera

# An OCI image layout with one gzip layer per directory argument (python3 stdlib only).
make_image() {  # make_image LAYOUT TAG DIR...
  python3 - "$@" <<'PY'
import gzip, hashlib, io, json, os, sys, tarfile
layout, tag, dirs = sys.argv[1], sys.argv[2], sys.argv[3:]
os.makedirs(f"{layout}/blobs/sha256", exist_ok=True)
def blob(data):
    d = hashlib.sha256(data).hexdigest()
    open(f"{layout}/blobs/sha256/{d}", "wb").write(data)
    return "sha256:" + d, len(data)
layers, diff_ids = [], []
for src in dirs:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        t.add(src, arcname=src.lstrip("/"), recursive=True)
    raw = buf.getvalue()
    diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
    d, n = blob(gzip.compress(raw, 6, mtime=0))
    layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": n})
cd, cn = blob(json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode())
m = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cn},
                "layers": layers}).encode()
md, mn = blob(m)
idx_path = f"{layout}/index.json"
idx = json.load(open(idx_path)) if os.path.exists(idx_path) else {"schemaVersion": 2, "manifests": []}
idx["manifests"] = [x for x in idx["manifests"] if x.get("annotations", {}).get("org.opencontainers.image.ref.name") != tag]
idx["manifests"].append({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": mn,
                         "annotations": {"org.opencontainers.image.ref.name": tag}})
json.dump(idx, open(idx_path, "w"))
open(f"{layout}/oci-layout", "w").write('{"imageLayoutVersion":"1.0.0"}')
PY
}

echo "== building two OCI images from /usr/bin and /usr/bin + /etc"
make_image "$W/oci" v1 /usr/bin
make_image "$W/oci" v2 /usr/bin /etc

echo "== converting (v2 deduplicated against v1)"
"$T" convert --no-cache "oci:$W/oci:v1" "oci:$W/store:v1"
"$T" convert --no-cache --dedup-with "oci:$W/store:v1" "oci:$W/oci:v2" "oci:$W/store:v2"

echo "== inspecting v2"
"$T" inspect "oci:$W/store:v2" --dedup-with "oci:$W/store:v1" | grep -v '^  sha256'

echo "== unpacking v2 and comparing it with GNU tar's extraction of the source layers"
"$T" unpack "oci:$W/store:v2" "$W/rootfs"
mkdir -p "$W/reference"
for l in $(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); m=[x for x in d["manifests"] if x["annotations"]["org.opencontainers.image.ref.name"]=="v2"][0]; print(" ".join(l["digest"][7:] for l in json.load(open(sys.argv[2]+"/blobs/sha256/"+m["digest"][7:]))["layers"]))' "$W/oci/index.json" "$W/oci"); do
  tar -xzpf "$W/oci/blobs/sha256/$l" -C "$W/reference" --numeric-owner
done
# (/usr has no tar entry of its own: its mtime is arbitrary on both sides)
"$T" diff-tree --ignore-root-metadata --ignore-dir-mtime "$W/reference" "$W/rootfs"
echo "== sizes: OCI layers $(du -sb "$W/oci/blobs" | cut -f1) bytes, tessera store $(du -sb "$W/store/blobs" | cut -f1) bytes"
