#!/usr/bin/env bash
# Builds every libFuzzer target tests/fuzz/fuzz_<name>.cpp with clang++ (ASan + UBSan,
# -march=native so the AVX2/AVX-512 kernels are in) and fuzzes each for a bounded time,
# starting from a scratch copy of its seed corpus tests/fuzz/corpus/<name>/ (the repository
# is never written to). Every target runs; the script exits non-zero if any crashed or
# mismatched, and the input that did it is left in <build-dir>/artifacts/.
#
#   tests/fuzz/run.sh [seconds-per-target] [build-dir] [target ...]
#   tests/fuzz/run.sh 30 build-fuzz                 # every target, 30 s each, concurrently
#   tests/fuzz/run.sh 3600 build-fuzz attend        # one target, an hour
#
# The targets fuzz at the same time, one process each (output goes to
# <build-dir>/fuzz_<name>.log and is printed when all are done): on a 2-core machine the
# two targets take the wall time of one.
#
# Needs clang++ and its runtimes (Debian: clang, libclang-rt-14-dev), Eigen and nlohmann-json.
# CXX_FUZZ overrides the compiler, FUZZ_OPT the optimisation level (default -O1),
# FUZZ_CXXFLAGS the extra compiler flags (default -DKVHEADS_SHAPE_SPECIALIZATIONS=0: the
# run-time-size kernels only, as in the sanitizer builds of .ci/run; fuzz_attend then
# compiles in ~30 s instead of ~6 minutes; FUZZ_CXXFLAGS= with nothing fuzzes the
# compile-time shapes too), FUZZ_FLAGS adds libFuzzer flags (e.g. -jobs=2 -workers=2).
set -euo pipefail

seconds="${1:-45}"
build="${2:-build-fuzz}"
shift $(($# < 2 ? $# : 2))
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cxx="${CXX_FUZZ:-clang++}"
mkdir -p "$build/artifacts"
build="$(cd "$build" && pwd)"

# -isystem, not -I: warnings inside Eigen's own headers are not ours to fix.
eigen_flags="$(pkg-config --cflags-only-I eigen3 2>/dev/null || echo -I/usr/include/eigen3)"
eigen_flags="${eigen_flags//-I/-isystem }"
flags=(-std=c++17 -gline-tables-only "${FUZZ_OPT:--O1}" -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all
       -fno-omit-frame-pointer -Wall -Wextra -I"$root/include" $eigen_flags ${FUZZ_CXXFLAGS--DKVHEADS_SHAPE_SPECIALIZATIONS=0})
if "$cxx" -march=native -E -x c++ /dev/null >/dev/null 2>&1; then flags+=(-march=native); fi

if [[ $# -gt 0 ]]; then
  names=("$@")
else
  names=()
  for source in "$root"/tests/fuzz/fuzz_*.cpp; do
    name="$(basename "$source" .cpp)"
    names+=("${name#fuzz_}")
  done
fi

# Compile all targets at once (they are independent; one core each).
pids=()
for name in "${names[@]}"; do
  echo "--- building fuzz_$name"
  "$cxx" "${flags[@]}" "$root/tests/fuzz/fuzz_$name.cpp" -o "$build/fuzz_$name" &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done

# Largest input each target reads: attend decodes a few dozen bytes; files can be long.
max_len_of() {
  case "$1" in
    attend) echo 64 ;;
    *) echo 4096 ;;
  esac
}

run_target() {
  local name="$1" corpus status=0
  corpus="$(mktemp -d)"
  if [[ -d "$root/tests/fuzz/corpus/$name" ]]; then cp "$root/tests/fuzz/corpus/$name"/* "$corpus"/; fi
  echo "--- fuzzing fuzz_$name for ${seconds}s from $(ls "$corpus" | wc -l) seed(s)"
  "$build/fuzz_$name" -max_total_time="$seconds" -max_len="$(max_len_of "$name")" -timeout=60 \
    -rss_limit_mb=4096 -print_final_stats=1 -artifact_prefix="$build/artifacts/${name}-" \
    ${FUZZ_FLAGS:-} "$corpus" || status=$?
  echo "--- fuzz_$name: corpus grew to $(ls "$corpus" | wc -l) input(s)"
  rm -rf "$corpus"
  return $status
}

pids=()
for name in "${names[@]}"; do
  echo "--- fuzz_$name: running (log: $build/fuzz_$name.log)"
  run_target "$name" >"$build/fuzz_$name.log" 2>&1 &
  pids+=($!)
done
failed=()
for i in "${!names[@]}"; do
  name="${names[$i]}"
  status=0
  wait "${pids[$i]}" || status=$?
  cat "$build/fuzz_$name.log"
  if [[ $status -ne 0 ]]; then
    echo "fuzz_$name FAILED (exit $status); reproduce with: $build/fuzz_$name $build/artifacts/${name}-*"
    failed+=("$name")
  fi
done
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "fuzz targets that failed: ${failed[*]}"
  exit 1
fi
echo "all fuzz targets ran clean"
