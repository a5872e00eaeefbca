#!/usr/bin/env bash
# Builds the fuzz targets (fuzz/) with libFuzzer coverage on domainrag's own code only (see
# scripts/fuzz-rustc.sh) and runs each for a while from its seed corpus (fuzz/corpus/<target>).
#   scripts/fuzz.sh [--seconds N] [--out report.json] [target ...]   (targets: load query)
# New inputs go to a scratch copy of the corpus; a crash, timeout or over-memory input is written
# to fuzz/artifacts/<target>/ and the script fails, naming it. The report has, per target, the
# seconds run, executions, executions per second, the corpus size and findings.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/domainrag-target}"

seconds=30
out=""
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    -h | --help) sed -n '2,7p' "$0"; exit 0 ;;
    *) targets+=("$1"); shift ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=(load query)

RUSTC_WRAPPER="$PWD/scripts/fuzz-rustc.sh" cargo build --release -p domainrag-fuzz \
  --config 'profile.release.package.domainrag.debug-assertions=true' \
  --config 'profile.release.package.domainrag-fuzz.debug-assertions=true' \
  --config 'profile.release.package.domainrag.overflow-checks=true' \
  --config 'profile.release.package.domainrag-fuzz.overflow-checks=true'

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
failed=0
results=()
for target in "${targets[@]}"; do
  bin="$CARGO_TARGET_DIR/release/$target"
  [ -x "$bin" ] || { echo "no fuzz target named $target (fuzz/fuzz_targets/)" >&2; exit 2; }
  mkdir -p "$scratch/$target" "fuzz/artifacts/$target"
  cp fuzz/corpus/"$target"/* "$scratch/$target/"
  echo "== fuzz $target for ${seconds}s"
  status=0
  "$bin" "$scratch/$target" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -max_len=65536 -print_final_stats=1 -artifact_prefix="fuzz/artifacts/$target/" \
    > "$scratch/$target.log" 2>&1 || status=$?
  tail -n 12 "$scratch/$target.log"
  execs=$(grep -o 'number_of_executed_units: [0-9]*' "$scratch/$target.log" | grep -o '[0-9]*$' || echo 0)
  findings=$(grep -c '^artifact_prefix=\|Test unit written to' "$scratch/$target.log" || true)
  corpus=$(find "$scratch/$target" -type f | wc -l)
  if [ "$status" -ne 0 ]; then
    failed=1
    echo "FAILED: fuzz target $target exited with $status; inputs in fuzz/artifacts/$target/" >&2
  fi
  results+=("{\"target\":\"$target\",\"seconds\":$seconds,\"executions\":${execs:-0},\"executions_per_second\":$(( ${execs:-0} / (seconds > 0 ? seconds : 1) )),\"corpus\":$corpus,\"findings\":$findings,\"exit\":$status}")
done
report="{\"date\":\"$(date -u +%Y-%m-%dT%H:%M:%SZ)\",\"targets\":[$(IFS=,; echo "${results[*]}")]}"
echo "$report"
[ -z "$out" ] || { mkdir -p "$(dirname "$out")"; echo "$report" | python3 -m json.tool > "$out"; }
exit "$failed"
