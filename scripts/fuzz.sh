#!/usr/bin/env bash
# Runs the fuzz targets in fuzz/ (envelope, jwt, ldif, endpoint) for a bounded time each.
#
#   scripts/fuzz.sh [--seconds N] [--fallback | --libfuzzer] [--keep-corpus]
#                   [--debug-assertions] [TARGET...]
#
#   --seconds N     time per target (default: $FUZZ_SECONDS, else 60)
#   --libfuzzer     cargo fuzz (libFuzzer + AddressSanitizer) or fail; the default is to try it
#                   and fall back when it cannot build here
#   --fallback      the same targets without libFuzzer: corpus replay + random mutation, not
#                   coverage guided (fuzz/src/bin/fallback.rs)
#   --keep-corpus   keep each target's working corpus (new inputs found) and print where
#   --debug-assertions  libFuzzer build with debug assertions and overflow checks (cargo fuzz -a)
#
# cargo fuzz needs nightly compiler features (-Zsanitizer): the script uses the machine's stable
# toolchain with RUSTC_BOOTSTRAP=1 (FUZZ_TOOLCHAIN=nightly uses a rustup toolchain instead).
# Seeds are read from fuzz/corpus/<target>/ (never written: new inputs go to a scratch corpus).
# A failing input is saved under fuzz/artifacts/<target>/ and the script exits non-zero;
# reproduce it with
#   cargo fuzz run <target> fuzz/artifacts/<target>/<file>         (libFuzzer)
#   fuzz/target/release/fallback <target> 0 /tmp <dir-with-the-file>   (fallback)
set -euo pipefail
cd "$(dirname "$0")/.."

ALL=(envelope jwt ldif endpoint)
seconds=${FUZZ_SECONDS:-60}
mode=auto
keep=0
build_flags=(-O)
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds=${2:?--seconds needs a value}; shift 2 ;;
    --seconds=*) seconds=${1#*=}; shift ;;
    --fallback) mode=fallback; shift ;;
    --libfuzzer) mode=libfuzzer; shift ;;
    --keep-corpus) keep=1; shift ;;
    --debug-assertions) build_flags=(-O -a); shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=("${ALL[@]}")
case "$seconds" in ''|*[!0-9]*) echo "--seconds: not a whole number: $seconds" >&2; exit 2 ;; esac
for t in "${targets[@]}"; do
  [[ " ${ALL[*]} " == *" $t "* ]] || { echo "unknown target $t (known: ${ALL[*]})" >&2; exit 2; }
done

logs=$(mktemp -d "${TMPDIR:-/tmp}/ssp-fuzz.XXXXXX")
cleanup() { [ "$keep" = 1 ] || rm -rf "$logs"; }
trap cleanup EXIT

# The cargo fuzz command line for this machine, or empty when it cannot be had.
cargo_fuzz=()
pick_libfuzzer() {
  if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is not installed (cargo install cargo-fuzz --locked)" >&2
    return 1
  fi
  if [ -n "${FUZZ_TOOLCHAIN:-}" ]; then
    cargo_fuzz=(cargo "+$FUZZ_TOOLCHAIN" fuzz)
  else
    cargo_fuzz=(env RUSTC_BOOTSTRAP=1 cargo fuzz)
  fi
  # cargo fuzz build takes one target, or none for all of them.
  local one=()
  [ ${#targets[@]} -eq 1 ] && one=("${targets[0]}")
  echo "building the targets with: ${cargo_fuzz[*]} build ${build_flags[*]} ${one[*]}"
  if ! "${cargo_fuzz[@]}" build "${build_flags[@]}" "${one[@]}" >"$logs/build.log" 2>&1; then
    echo "cargo fuzz build failed; last lines:" >&2
    tail -n 20 "$logs/build.log" >&2
    return 1
  fi
}

if [ "$mode" != fallback ]; then
  if pick_libfuzzer; then
    mode=libfuzzer
  elif [ "$mode" = libfuzzer ]; then
    exit 1
  else
    echo "falling back to the replay + mutation runner (not coverage guided)" >&2
    mode=fallback
  fi
fi
if [ "$mode" = fallback ]; then
  cargo build --release --manifest-path fuzz/Cargo.toml --bin fallback >"$logs/build.log" 2>&1 || {
    tail -n 20 "$logs/build.log" >&2; exit 1; }
fi

failed=0
summary=()
for t in "${targets[@]}"; do
  work="$logs/corpus-$t"
  mkdir -p "$work" "fuzz/artifacts/$t"
  echo "== $t: $seconds s ($mode)"
  if [ "$mode" = libfuzzer ]; then
    set +e
    "${cargo_fuzz[@]}" run "${build_flags[@]}" "$t" "$work" "fuzz/corpus/$t" -- \
      -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
      >"$logs/$t.log" 2>&1
    rc=$?
    set -e
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$logs/$t.log" | tail -n 1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$logs/$t.log" | tail -n 1)
    cov=$(grep -o 'cov: [0-9]*' "$logs/$t.log" | tail -n 1 | cut -d' ' -f2)
    new=$(find "$work" -type f | wc -l)
    line="$t: ${execs:-?} runs (${rate:-?}/s), coverage ${cov:-?} edges, $new corpus inputs"
  else
    set +e
    fuzz/target/release/fallback "$t" "$seconds" "fuzz/artifacts/$t" "fuzz/corpus/$t" \
      >"$logs/$t.log" 2>&1
    rc=$?
    set -e
    line=$(grep "^$t: " "$logs/$t.log" | tail -n 1)
    line=${line:-$t}
  fi
  if [ $rc -ne 0 ]; then
    failed=1
    line="$line: FAILED (exit $rc)"
    echo "--- $t log (last 40 lines):"
    tail -n 40 "$logs/$t.log"
    ls -1 "fuzz/artifacts/$t" 2>/dev/null | sed "s#^#    reproducer: fuzz/artifacts/$t/#"
  fi
  echo "$line"
  summary+=("$line")
done

echo
echo "fuzz summary ($mode, $seconds s per target):"
printf '  %s\n' "${summary[@]}"
[ "$keep" = 1 ] && echo "working corpora and logs kept in $logs"
exit $failed
