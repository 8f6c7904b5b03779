#!/usr/bin/env bash
# scripts/corpus.sh [OUTDIR]  -- build a realistic, overlapping OCI test-image corpus.
# Used by scripts/test.sh (tests/corpus.rs) and the benchmarks (docs/benchmarks.md).
#
# Output (OUTDIR, default ./corpus):
#   layout/                 one OCI image-layout holding every image as a tag (blobs shared)
#   oci/<image>/            one OCI image-layout per image, tag "latest" (blobs HARDLINKED from layout/)
#   oci/debian-python-zstd/ same image as debian-python, layers recompressed to zstd (skopeo)
#   docker-archive/<image>.tar  `docker save`-style tarballs (uncompressed layers), set DOCKER_ARCHIVE=0 to skip
#   summary.json / SUMMARY.md   per-layer compressed+uncompressed sizes, digests, totals, generation times
#   logs/                   per-step logs
#   .state/                 step stamps (idempotency cache)
#
# Images (all linux/amd64, gzip layers, built with debootstrap + chroot + umoci, no daemon):
#   debian-base           debootstrap --variant=minbase bookworm (+ apt upgrade from -updates/-security, apt lists removed)
#   debian-python         debian-base + layer: apt-get install --no-install-recommends python3
#   debian-gcc            debian-base + layer: apt-get install --no-install-recommends build-essential
#   app-pandas-a          debian-python + layer: pip --target of pandas==2.2.2 numpy==1.26.4 (+deps)
#   app-pandas-b          debian-python + layer: pip --target of pandas==2.2.3 numpy==1.26.4 (+deps)
#   debian-base-rebuilt   second independent debootstrap run: same file contents (mostly), different tar bytes
#   debian-python-rebuilt debian-base-rebuilt + python3 layer (rebuilt-everything CI scenario)
#
# Idempotent: steps whose stamp exists (and whose parameters did not change) are skipped;
# once one step re-runs, every later step re-runs too.  Needs root (debootstrap, chroot, mount).
# Env overrides: MIRROR, SUITE, SECURITY_MIRROR, DOCKER_ARCHIVE=0|1, PANDAS_A, PANDAS_B, NUMPY_VER, KEEP_BUNDLES=1
set -Eeuo pipefail
trap 'rc=$?; echo "make-corpus: FAILED (exit $rc) at line $LINENO: $BASH_COMMAND" >&2; exit $rc' ERR

OUT=${1:-./corpus}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
L=$OUT/layout
STATE=$OUT/.state
LOGS=$OUT/logs
WORK=$OUT/work
mkdir -p "$STATE" "$LOGS" "$WORK" "$OUT/oci" "$OUT/docker-archive"

# --- defaults: read suites from the host's apt config when possible -------------------------
detect_mirror() {  # the Debian mirror this machine's apt is configured with
  local f u
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -r "$f" ] || continue
    u=$(awk '/^URIs:/{print $2; exit}' "$f")
    [ -n "$u" ] && { echo "$u"; return 0; }
  done
  u=$(awk '$1=="deb"{print $2; exit}' /etc/apt/sources.list 2>/dev/null)
  [ -n "$u" ] && { echo "$u"; return 0; }
  echo "make-corpus: no Debian mirror found in the apt configuration; set MIRROR" >&2
  return 1
}
MIRROR=${MIRROR:-$(detect_mirror)}
SUITE=${SUITE:-bookworm}
SECURITY_MIRROR=${SECURITY_MIRROR:-${MIRROR%/debian}/debian-security}
DOCKER_ARCHIVE=${DOCKER_ARCHIVE:-1}
PANDAS_A=${PANDAS_A:-2.2.2}
PANDAS_B=${PANDAS_B:-2.2.3}
NUMPY_VER=${NUMPY_VER:-1.26.4}
PYDEPS="python-dateutil==2.9.0.post0 pytz==2024.1 tzdata==2024.1 six==1.16.0"
PYVER=3.11   # bookworm's python3
APT_OPTS=(-o Acquire::Check-Valid-Until=false -o Acquire::Check-Date=false -o Dpkg::Use-Pty=0)

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { echo "make-corpus: ERROR: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap/chroot/mount)"

# --- tools ------------------------------------------------------------------------------------
need_pkgs=()
for t in debootstrap:debootstrap umoci:umoci skopeo:skopeo jq:jq zstd:zstd gzip:gzip; do
  command -v "${t%%:*}" >/dev/null || need_pkgs+=("${t#*:}")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "installing missing packages: ${need_pkgs[*]}"
  for i in 1 2 3; do   # retry: docker-clean's DPkg::Post-Invoke can delete queued .debs mid-install
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${need_pkgs[@]}" >"$LOGS/apt-install.log" 2>&1 && break
    [ "$i" = 3 ] && die "apt-get install ${need_pkgs[*]} failed, see $LOGS/apt-install.log"
  done
fi
# Wheels are fetched by pip from a virtual environment of our own: Debian 12's system python
# refuses `pip install` (externally managed environment). pip reads the machine's own index
# configuration (pip.conf / PIP_INDEX_URL).
VENV=${TESSERA_VENV:-${TESSERA_CACHE:-/var/cache/tessera}/venv}
if [ -z "${HOSTPY:-}" ]; then
  if ! "$VENV/bin/python3" -m pip --version >/dev/null 2>&1; then
    python3 -m venv "$VENV" >/dev/null 2>&1 || {
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv >"$LOGS/apt-venv.log" 2>&1 \
        || die "python3 -m venv is not available and python3-venv could not be installed (see $LOGS/apt-venv.log)"
      python3 -m venv "$VENV" || die "python3 -m venv $VENV failed"
    }
  fi
  HOSTPY=$VENV/bin/python3
fi
"$HOSTPY" -m pip --version >/dev/null 2>&1 || die "'$HOSTPY -m pip' not available (needed to download wheels)"

# --- mount bookkeeping (always unmounted on exit) -------------------------------------------
MOUNTS=()
cleanup_mounts() {
  local i
  for ((i=${#MOUNTS[@]}-1; i>=0; i--)); do umount -l "${MOUNTS[i]}" 2>/dev/null || true; done
  MOUNTS=()
}
trap cleanup_mounts EXIT

# run a command chrooted into $1 with /proc, /dev and a resolv.conf available
in_chroot() {
  local root=$1; shift
  mount -t proc proc "$root/proc"; MOUNTS+=("$root/proc")
  mount --bind /dev "$root/dev"; MOUNTS+=("$root/dev")
  local had_resolv=0
  [ -e "$root/etc/resolv.conf" ] && had_resolv=1
  [ $had_resolv = 1 ] || cp /etc/resolv.conf "$root/etc/resolv.conf"
  local rc=0
  chroot "$root" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@" || rc=$?
  [ $had_resolv = 1 ] || rm -f "$root/etc/resolv.conf"
  cleanup_mounts
  return $rc
}

# --- step machinery ----------------------------------------------------------------------------
DIRTY=0
TIMES_FILE=$STATE/times.tsv
touch "$TIMES_FILE"
tag_exists() { [ -f "$L/index.json" ] && jq -e --arg t "$1" '.manifests[]|select(.annotations["org.opencontainers.image.ref.name"]==$t)' "$L/index.json" >/dev/null; }

# step NAME KEY FUNC [args...] : runs FUNC unless stamp with same KEY exists (and nothing before re-ran)
step() {
  local name=$1 key=$2; shift 2
  local stamp=$STATE/$name.done
  if [ $DIRTY = 0 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ]; then
    log "skip  $name (cached)"
    return 0
  fi
  DIRTY=1
  rm -f "$stamp"
  log "start $name  (log: $LOGS/$name.log)"
  local t0 t1 rc
  t0=$(date +%s.%N)
  # NB: not `( ... ) || rc=$?` -- that would silently disable set -e inside the subshell
  trap - ERR; set +e
  ( set -Eeuo pipefail
    trap 'rc=$?; echo "step FAILED (exit $rc) at line $LINENO: $BASH_COMMAND" >&2; exit $rc' ERR
    trap cleanup_mounts EXIT
    "$@" ) >"$LOGS/$name.log" 2>&1
  rc=$?
  set -e; trap 'rc=$?; echo "make-corpus: FAILED (exit $rc) at line $LINENO: $BASH_COMMAND" >&2; exit $rc' ERR
  t1=$(date +%s.%N)
  if [ $rc != 0 ]; then
    echo "---- last 30 lines of $LOGS/$name.log ----" >&2; tail -30 "$LOGS/$name.log" >&2
    die "step $name failed (exit $rc)"
  fi
  local secs; secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}')
  grep -v -P "^\Q$name\E\t" "$TIMES_FILE" > "$TIMES_FILE.tmp" || true
  printf '%s\t%s\n' "$name" "$secs" >> "$TIMES_FILE.tmp"; mv "$TIMES_FILE.tmp" "$TIMES_FILE"
  echo "$key" > "$stamp"
  log "done  $name in ${secs}s"
}

# --- image builders ------------------------------------------------------------------------------
ensure_layout() { [ -f "$L/oci-layout" ] || umoci init --layout "$L"; }

write_sources() {  # deb822 sources like the official debian images
  local root=$1
  rm -f "$root/etc/apt/sources.list"
  cat > "$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $SECURITY_MIRROR
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
}

build_base() {  # build_base TAG
  local tag=$1 b=$WORK/bundle-$1
  ensure_layout
  rm -rf "$b"
  umoci new --image "$L:$tag"
  umoci unpack --image "$L:$tag" "$b"
  debootstrap --variant=minbase "$SUITE" "$b/rootfs" "$MIRROR"
  write_sources "$b/rootfs"
  # bring in -updates/-security like the official images, then strip caches
  in_chroot "$b/rootfs" apt-get "${APT_OPTS[@]}" update -qq
  in_chroot "$b/rootfs" apt-get "${APT_OPTS[@]}" -y -q upgrade
  in_chroot "$b/rootfs" apt-get clean
  rm -rf "$b"/rootfs/var/lib/apt/lists/* "$b"/rootfs/var/cache/apt/*.bin \
         "$b"/rootfs/var/cache/apt/archives/*.deb "$b"/rootfs/var/log/bootstrap.log
  rm -rf "$b"/rootfs/dev/*            # container runtimes populate /dev
  rm -f "$b"/rootfs/etc/resolv.conf "$b"/rootfs/etc/hostname  # runtime-provided
  umoci repack --image "$L:$tag" \
      --history.created_by "debootstrap --variant=minbase $SUITE / $MIRROR && apt-get upgrade" "$b"
  umoci config --image "$L:$tag" --config.cmd bash --os linux --architecture amd64 \
      --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      --config.label org.opencontainers.image.title="$tag" --no-history
  [ "${KEEP_BUNDLES:-0}" = 1 ] || rm -rf "$b"
}

build_apt_layer() {  # build_apt_layer FROM TAG pkg...
  local from=$1 tag=$2; shift 2
  local b=$WORK/bundle-$tag
  rm -rf "$b"
  umoci unpack --image "$L:$from" "$b"
  in_chroot "$b/rootfs" apt-get "${APT_OPTS[@]}" update -qq
  in_chroot "$b/rootfs" apt-get "${APT_OPTS[@]}" install -y -q --no-install-recommends "$@"
  in_chroot "$b/rootfs" apt-get clean
  rm -rf "$b"/rootfs/var/lib/apt/lists/* "$b"/rootfs/var/cache/apt/*.bin
  umoci repack --image "$L:$tag" \
      --history.created_by "RUN apt-get update && apt-get install -y --no-install-recommends $* && rm -rf /var/lib/apt/lists/*" "$b"
  umoci config --image "$L:$tag" --config.label org.opencontainers.image.title="$tag" --no-history
  [ "${KEEP_BUNDLES:-0}" = 1 ] || rm -rf "$b"
}

build_pip_layer() {  # build_pip_layer FROM TAG requirement...
  local from=$1 tag=$2; shift 2
  local b=$WORK/bundle-$tag
  local site=/usr/local/lib/python$PYVER/dist-packages
  rm -rf "$b"
  umoci unpack --image "$L:$from" "$b"
  mkdir -p "$b/rootfs$site"
  # wheels resolved for the *image's* interpreter (cp311 manylinux x86_64), not the host's
  "$HOSTPY" -m pip install --no-cache-dir --disable-pip-version-check --no-compile \
      --only-binary=:all: --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
      --python-version "$PYVER" --implementation cp --abi "cp${PYVER/./}" \
      --target "$b/rootfs$site" "$@"
  # byte-compile with the image's own python, like a `RUN pip install` would
  in_chroot "$b/rootfs" python3 -m compileall -q -j 2 "$site" >/dev/null
  in_chroot "$b/rootfs" python3 -c 'import pandas, numpy, sys; print("import ok", pandas.__version__, numpy.__version__, sys.version)'
  umoci repack --image "$L:$tag" --history.created_by "RUN pip install --target $site $*" "$b"
  umoci config --image "$L:$tag" --config.label org.opencontainers.image.title="$tag" \
      --config.cmd python3 --no-history
  [ "${KEEP_BUNDLES:-0}" = 1 ] || rm -rf "$b"
}

IMAGES=(debian-base debian-python debian-gcc app-pandas-a app-pandas-b debian-base-rebuilt debian-python-rebuilt)

step debian-base          "v1 $SUITE $MIRROR"           build_base debian-base
step debian-python        "v1 python3"                  build_apt_layer debian-base debian-python python3
step debian-gcc           "v1 build-essential"          build_apt_layer debian-base debian-gcc build-essential
step app-pandas-a         "v1 $PANDAS_A $NUMPY_VER"     build_pip_layer debian-python app-pandas-a pandas==$PANDAS_A numpy==$NUMPY_VER $PYDEPS
step app-pandas-b         "v1 $PANDAS_B $NUMPY_VER"     build_pip_layer debian-python app-pandas-b pandas==$PANDAS_B numpy==$NUMPY_VER $PYDEPS
step debian-base-rebuilt  "v1 $SUITE $MIRROR"           build_base debian-base-rebuilt
step debian-python-rebuilt "v1 python3"                 build_apt_layer debian-base-rebuilt debian-python-rebuilt python3
step gc                   "v1"                          umoci gc --layout "$L"

# --- exports ---------------------------------------------------------------------------------------
manifest_digest() { jq -r --arg t "$1" '.manifests[]|select(.annotations["org.opencontainers.image.ref.name"]==$t)|.digest' "$L/index.json"; }

export_oci() {  # per-image layout with hardlinked blobs (exact same digests as layout/)
  local tag=$1 d=$OUT/oci/$1 md desc blob
  rm -rf "$d"; mkdir -p "$d/blobs/sha256"
  md=$(manifest_digest "$tag")
  [ -n "$md" ] || { echo "no manifest for $tag" >&2; return 1; }
  desc=$(jq -c --arg t "$tag" '.manifests[]|select(.annotations["org.opencontainers.image.ref.name"]==$t)|.annotations["org.opencontainers.image.ref.name"]="latest"' "$L/index.json")
  for blob in "$md" $(jq -r '.config.digest, .layers[].digest' "$L/blobs/sha256/${md#sha256:}"); do
    ln -f "$L/blobs/sha256/${blob#sha256:}" "$d/blobs/sha256/${blob#sha256:}"
  done
  printf '{"imageLayoutVersion":"1.0.0"}' > "$d/oci-layout"
  jq -n --argjson desc "$desc" '{schemaVersion:2, manifests:[$desc]}' > "$d/index.json"
  skopeo inspect --raw "oci:$d:latest" >/dev/null
}

export_all() {
  local t
  for t in "${IMAGES[@]}"; do export_oci "$t"; done
  # zstd-compressed variant (same uncompressed layers -> same diff_ids, different blobs)
  rm -rf "$OUT/oci/debian-python-zstd"
  skopeo copy -q --dest-compress --dest-compress-format zstd \
      "oci:$L:debian-python" "oci:$OUT/oci/debian-python-zstd:latest"
}
step export-oci "v1" export_all

export_docker_archive() {
  local t
  rm -f "$OUT"/docker-archive/*.tar
  for t in "${IMAGES[@]}"; do
    skopeo copy -q "oci:$L:$t" "docker-archive:$OUT/docker-archive/$t.tar:corpus/$t:latest"
  done
}
if [ "$DOCKER_ARCHIVE" = 1 ]; then
  step export-docker-archive "v1" export_docker_archive
fi

# --- summary (also validates every layer: sha256(decompressed) must equal the config's diff_id) -------
summarize() {
  "$HOSTPY" - "$OUT" "${IMAGES[@]}" <<'PYEOF'
import gzip, hashlib, json, os, subprocess, sys, time
out, images = sys.argv[1], sys.argv[2:]
L = os.path.join(out, "layout")
blob = lambda d: os.path.join(L, "blobs", d.split(":")[0], d.split(":")[1])
idx = json.load(open(os.path.join(L, "index.json")))
by_tag = {m["annotations"]["org.opencontainers.image.ref.name"]: m for m in idx["manifests"]}
usize = {}
res = []
for t in images:
    md = by_tag[t]["digest"]
    mf = json.load(open(blob(md)))
    cf = json.load(open(blob(mf["config"]["digest"])))
    hist = [h for h in cf.get("history", []) if not h.get("empty_layer")]
    layers = []
    for i, l in enumerate(mf["layers"]):
        d = l["digest"]
        if d not in usize:
            h = hashlib.sha256(); n = 0
            with gzip.open(blob(d), "rb") as f:
                while True:
                    b = f.read(1 << 20)
                    if not b: break
                    h.update(b); n += len(b)
            if "sha256:" + h.hexdigest() != cf["rootfs"]["diff_ids"][i]:
                sys.exit(f"diff_id mismatch: {t} layer {i}")
            if os.path.getsize(blob(d)) != l["size"]:
                sys.exit(f"size mismatch: {t} layer {i}")
            usize[d] = n
        layers.append(dict(digest=d, mediaType=l["mediaType"], size=l["size"], uncompressed_size=usize[d],
                           diff_id=cf["rootfs"]["diff_ids"][i],
                           created_by=hist[i].get("created_by", "") if i < len(hist) else ""))
    res.append(dict(name=t, manifest_digest=md, manifest_size=by_tag[t]["size"], config_digest=mf["config"]["digest"],
                    layers=layers, compressed_total=sum(x["size"] for x in layers),
                    uncompressed_total=sum(x["uncompressed_size"] for x in layers)))
uniq = {l["digest"]: l for r in res for l in r["layers"]}
times = {}
tf = os.path.join(out, ".state", "times.tsv")
for line in open(tf):
    if line.strip():
        k, v = line.rstrip("\n").split("\t"); times[k] = float(v)
totals = dict(images=len(res),
              sum_compressed_all_images=sum(r["compressed_total"] for r in res),
              sum_uncompressed_all_images=sum(r["uncompressed_total"] for r in res),
              unique_layers=len(uniq),
              unique_compressed=sum(l["size"] for l in uniq.values()),
              unique_uncompressed=sum(l["uncompressed_size"] for l in uniq.values()),
              generation_seconds_total=round(sum(times.values()), 1))
json.dump(dict(generated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), images=res, totals=totals,
               step_seconds=times), open(os.path.join(out, "summary.json"), "w"), indent=1)
MB = lambda n: f"{n/1e6:.1f} MB"
du = lambda p: subprocess.run(["du", "-sh", p], capture_output=True, text=True).stdout.split("\t")[0]
with open(os.path.join(out, "SUMMARY.md"), "w") as f:
    f.write("# Corpus summary\n\n| image | # | layer created_by | compressed | uncompressed | digest |\n|---|---|---|---:|---:|---|\n")
    for r in res:
        for i, l in enumerate(r["layers"]):
            f.write(f"| {r['name']} | {i} | {l['created_by'][:70]} | {MB(l['size'])} | {MB(l['uncompressed_size'])} | {l['digest'][7:19]} |\n")
    f.write("\n| image | manifest digest | compressed | uncompressed |\n|---|---|---:|---:|\n")
    for r in res:
        f.write(f"| {r['name']} | {r['manifest_digest']} | {MB(r['compressed_total'])} | {MB(r['uncompressed_total'])} |\n")
    f.write("\nTotals: " + ", ".join(f"{k}={MB(v) if 'compressed' in k else v}" for k, v in totals.items()) + "\n\n")
    f.write("Step times (s): " + ", ".join(f"{k}={v}" for k, v in times.items()) + "\n\n")
    f.write(f"Disk: total {du(out)}, layout/ {du(L)}, docker-archive/ {du(os.path.join(out, 'docker-archive'))}\n")
PYEOF
}
summarize
rmdir "$WORK" 2>/dev/null || true
log "corpus ready in $OUT  (see $OUT/SUMMARY.md)"
cat "$OUT/SUMMARY.md"
