#!/usr/bin/env bash
# Fuzz every tessera-format parser of untrusted bytes for a bounded time.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]      (default 20)
#
# Works on a stable toolchain: cargo-fuzz needs nightly-only -Z flags, which
# RUSTC_BOOTSTRAP=1 unlocks, and `--sanitizer none` avoids needing a sanitizer runtime
# (the targets are safe Rust; what we look for is panics, aborts, OOM and hangs).
# Exits non-zero naming each target that crashed; the crashing input is left under
# fuzz/artifacts/<target>/ and the full log under fuzz/target/fuzz-logs/<target>.log.
#
# Environment:
#   FUZZ_TARGETS="a b"           run only these targets (default: all, from `cargo fuzz list`)
#   FUZZ_REPLAY_REGRESSIONS=0    skip replaying fuzz/regressions/<target>/* (fixed crashers,
#                                replayed by default so they stay fixed)
#   CARGO_BUILD_JOBS=N           limit build parallelism (plain cargo setting)
set -euo pipefail

secs="${1:-20}"
if ! [[ "$secs" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 [SECONDS_PER_TARGET]   (a positive integer, default 20)" >&2
    exit 2
fi

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fuzz_dir="$root/fuzz"
cd "$fuzz_dir"

export RUSTC_BOOTSTRAP=1
# cargo-fuzz builds into fuzz/target (git-ignored), separate from the main build.
export CARGO_TARGET_DIR="$fuzz_dir/target"
fuzz_flags=(--sanitizer none)
libfuzzer_flags=(-rss_limit_mb=2048 -max_len=65536 -timeout=10)

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "==> installing cargo-fuzz from crates.io"
    cargo install cargo-fuzz --version 0.13.2 --locked
fi

if [[ -n "${FUZZ_TARGETS:-}" ]]; then
    read -r -a targets <<<"$FUZZ_TARGETS"
else
    mapfile -t targets < <(cargo fuzz list)
fi
if [[ ${#targets[@]} -eq 0 ]]; then
    echo "error: no fuzz targets found in $fuzz_dir" >&2
    exit 1
fi

echo "==> building fuzz targets: ${targets[*]}"
for t in "${targets[@]}"; do
    cargo fuzz build "${fuzz_flags[@]}" "$t"
done

log_dir="$CARGO_TARGET_DIR/fuzz-logs"
mkdir -p "$log_dir"
failed=()
summary=()

report_failure() { # target log what
    local t="$1" log="$2" what="$3"
    echo "!!! fuzz target '$t' FAILED ($what); last lines of $log:" >&2
    tail -n 40 "$log" | sed 's/^/    /' >&2
    grep -h 'Test unit written to' "$log" | sed "s/^/    [$t] /" >&2 || true
    failed+=("$t")
}

for t in "${targets[@]}"; do
    log="$log_dir/$t.log"

    if [[ "${FUZZ_REPLAY_REGRESSIONS:-1}" == 1 && -d "regressions/$t" ]]; then
        mapfile -t regs < <(find "regressions/$t" -type f ! -name '*.md' | sort)
        if [[ ${#regs[@]} -gt 0 ]]; then
            echo "==> $t: replaying ${#regs[@]} regression input(s)"
            if ! cargo fuzz run "${fuzz_flags[@]}" "$t" "${regs[@]}" -- "${libfuzzer_flags[@]}" \
                >"$log.regressions" 2>&1; then
                report_failure "$t" "$log.regressions" "regression input crashes"
                summary+=("$(printf '%-14s REGRESSION FAILED' "$t")")
                continue
            fi
        fi
    fi

    corpus="corpus/$t"
    mkdir -p "$corpus"
    if [[ -d "seeds/$t" ]]; then
        cp -n seeds/"$t"/* "$corpus"/ 2>/dev/null || true
    fi

    echo "==> $t: fuzzing for ${secs}s (corpus $fuzz_dir/$corpus, log $log)"
    rc=0
    cargo fuzz run "${fuzz_flags[@]}" "$t" "$corpus" -- \
        -max_total_time="$secs" "${libfuzzer_flags[@]}" >"$log" 2>&1 || rc=$?

    done_line="$(grep -E '^Done [0-9]+ runs' "$log" | tail -n 1 || true)"
    if [[ $rc -ne 0 ]]; then
        kind="$(grep -ohE 'ERROR: libFuzzer: [a-z-]+|deadly signal|panicked at' "$log" | head -n 1 || true)"
        report_failure "$t" "$log" "exit $rc${kind:+, $kind}"
        summary+=("$(printf '%-14s CRASHED (exit %s) %s' "$t" "$rc" "$kind")")
    elif [[ -z "$done_line" ]]; then
        report_failure "$t" "$log" "no 'Done N runs' line: fuzzing did not complete"
        summary+=("$(printf '%-14s INCOMPLETE' "$t")")
    else
        runs="$(sed -E 's/^Done ([0-9]+) runs in ([0-9]+) second.*/\1 runs in \2 s/' <<<"$done_line")"
        cov="$(grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+/[0-9]+[a-zA-Z]*' "$log" | tail -n 1 || true)"
        summary+=("$(printf '%-14s ok  %s  (%s)' "$t" "$runs" "$cov")")
    fi
done

echo
echo "==> fuzz summary (${secs}s per target)"
printf '    %s\n' "${summary[@]}"
if [[ ${#failed[@]} -ne 0 ]]; then
    echo "FAIL: fuzz target(s) crashed: ${failed[*]} (inputs under $fuzz_dir/artifacts/<target>/)" >&2
    exit 1
fi
echo "OK: ${#targets[@]} fuzz target(s) ran clean"
