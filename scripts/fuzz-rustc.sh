#!/usr/bin/env bash
# RUSTC_WRAPPER for scripts/fuzz.sh: adds libFuzzer's coverage instrumentation to domainrag's own
# crates (the library and the fuzz targets) and leaves every dependency as the release build made
# it, so a fuzz build reuses them instead of rebuilding ~850 crates instrumented (~40 min on 2
# cores). fuzz.sh also sets debug-assertions for exactly these two packages, which gives them
# artifacts of their own: the release library is never overwritten by the instrumented one.
set -euo pipefail
rustc="$1"
shift
name=""
prev=""
for arg in "$@"; do
  if [ "$prev" = "--crate-name" ]; then name="$arg"; fi
  prev="$arg"
done
case "$name" in
  domainrag | load | query)
    exec "$rustc" "$@" --cfg fuzzing \
      -Cpasses=sancov-module \
      -Cllvm-args=-sanitizer-coverage-level=4 \
      -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
      -Cllvm-args=-sanitizer-coverage-pc-table \
      -Cllvm-args=-sanitizer-coverage-trace-compares
    ;;
  *) exec "$rustc" "$@" ;;
esac
