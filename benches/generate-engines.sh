#!/usr/bin/env bash
# The native engine (f32, q8_0 and q4_0 weights) and mistral.rs (f32) side by side in one run:
# `bench generate` for each with ten synthetic adapters of two shapes (rank 8 on q/k/v/o, as
# `bench engines` uses; rank 16 on all seven modules, as `train` makes), in a scratch data dir,
# one after another on an otherwise idle machine. Writes
# bench/generate/<engine>-<isq>-<shape>.json and bench/generate/summary.md.
#   bash benches/generate-engines.sh      (make bench-generate)
#   BENCH_RUNS="native:none" bash benches/generate-engines.sh   (some engine:isq pairs only; the
#   summary still lists every file in bench/generate). A run may name the LoRA matrices' dtype:
#   native:none:q8 (generate.lora_dtype f16 or q8; files <engine>-<isq>-q8-<shape>.json).
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/domainrag-target}"
BIN="${DOMAINRAG_BIN:-$CARGO_TARGET_DIR/release/domainrag}"
OUT=bench/generate
TOKENS="${BENCH_TOKENS:-64}"
RUNS="${BENCH_RUNS:-native:none native:none:q8 native:q8_0 native:q4_0 mistralrs:none}"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
for shape in 8:attention 16:all; do
    rank=${shape%%:*}
    modules=${shape#*:}
    for run in $RUNS; do
        IFS=: read -r engine isq lora <<< "$run"
        lora=${lora:-f32}
        tag=$engine-$isq$([ "$lora" = f32 ] || echo "-$lora")
        echo "== $engine (isq $isq, LoRA $lora), rank $rank on $modules" >&2
        DOMAINRAG__GENERATE__ISQ=$isq DOMAINRAG__GENERATE__LORA_DTYPE=$lora "$BIN" --data-dir "$WORK" \
            bench generate --engine "$engine" --adapters 10 --adapter-rank "$rank" \
            --adapter-modules "$modules" --max-tokens "$TOKENS" \
            --out "$OUT/$tag-r$rank-$modules.json" > /dev/null
    done
done
python3 - "$OUT" > "$OUT/summary.md" <<'PY'
import json, sys, glob, os
out = sys.argv[1]
rows = []


def never_used(b):
    """A never-used adapter's TTFT against the base's: the median of pairs (a base request just
    before each) where the run has them, else against the base's figure from the run's start."""
    a = b["adapter_never_used"]["first_token_ms"]
    if "never_used_ttft_ratio" in b:
        return f'{a:.0f} ({b["never_used_ttft_ratio"]:.2f}x the base beside it)'
    return f'{a:.0f} ({a / b["base"]["first_token_ms"]:.2f}x base)'


def mixed_decode(b):
    """8 requests over 4 adapters: aggregate decode tokens/s against one request's decode rate
    (runs from before the field existed have none)."""
    if "mixed_8_over_4_decode_tokens_per_s" not in b:
        return "-"
    d = b["mixed_8_over_4_decode_tokens_per_s"]
    text = f'{d:.1f} ({d / b["decode_throughput_tokens_per_s"]["1"]:.2f}x one request)'
    p = b.get("mixed_8_over_4_against_one")
    if p and p["end_to_end_ci95"] and p["decode_ci95"]:
        e, c = p["end_to_end_ci95"], p["decode_ci95"]
        text += (f'; paired with one request ({p["pairs"]}): end to end {e[1]:.2f}x '
                 f'({e[0]:.2f}..{e[2]:.2f}), decode {c[1]:.2f}x ({c[0]:.2f}..{c[2]:.2f})')
    return text


for path in sorted(glob.glob(os.path.join(out, "*-*-r*-*.json"))):
    b = json.load(open(path))
    base = b["rss_after_base_mib"]
    rss = b["rss_with_adapters_mib"]
    most = max(rss, key=int)
    single = b["throughput_tokens_per_s"]["1"]
    rows.append([
        f'{b["engine"]} ({b["isq"]}' + (f', LoRA {b["lora_dtype"]})' if b.get("lora_dtype", "f32") != "f32" else ")"),
        b["adapters"],
        f'{b["base"]["first_token_ms"]:.0f} / {b["base"]["decode_tokens_per_s"]:.1f}',
        f'{b["adapter"]["first_token_ms"]:.0f} / {b["adapter"]["decode_tokens_per_s"]:.1f}',
        never_used(b),
        f'{base:.0f}' + (f' / {b["rss_base_served_mib"]:.0f}' if "rss_base_served_mib" in b else ""),
        f'{rss[most]:.0f} with {most} ({rss[most] / base:.2f}x'
        + (f' / {rss[most] / b["rss_base_served_mib"]:.2f}x)' if "rss_base_served_mib" in b else ")"),
        f'{single:.1f} / {b["throughput_tokens_per_s"]["8"]:.1f}',
        f'{b["mixed_8_over_4_tokens_per_s"]:.1f} ({b["mixed_8_over_4_tokens_per_s"] / single:.2f}x one request)',
        mixed_decode(b),
    ])
print("| engine | adapters | base TTFT ms / decode tok/s | adapter TTFT / decode | never-used adapter TTFT ms | RSS base MiB (loaded / after answering) | RSS with adapters resident (x each) | 1 / 8 concurrent base tok/s | 8 requests over 4 adapters tok/s | their decode tok/s |")
print("|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    print("| " + " | ".join(r) + " |")
PY
cat "$OUT/summary.md"
