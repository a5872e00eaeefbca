#!/usr/bin/env bash
# Layer checkpointing in the trainer (`train --gradient-checkpointing true`) against plain
# backpropagation (`make bench-train-checkpointing`, ~15 min on 2 cores): the same LoRA r16 run
# (first N triplets, 1 epoch, 2 sequences a step on 2 workers, seed 7) with each, on short
# sequences (gold-context new_wiki triplets, ~270 tokens) and long ones (the PostgreSQL manual's
# synthetic triplets with the sources serving gives, ~1,000 tokens). Each run is its own process,
# so its peak RSS is its own. Reports training tokens/s, peak RSS and the losses, which should
# agree (the gradients are the same; a test checks them).
#
# Needs the collections `newwiki` and `postgres` in DATA (`make bench-methods` makes both) and
# bench/methods/triplets.jsonl. Writes bench/train/checkpointing.{json,md}; registers and then
# removes adapters named ckpt-*.
set -euo pipefail
cd "$(dirname "$0")/.."
DR="${DR:-${CARGO_TARGET_DIR:-$HOME/.cache/domainrag-target}/release/domainrag}"
DATA="${DATA:-data}"
N="${N:-24}"
THREADS="${THREADS:-2}"
OUT="${OUT:-bench/train}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
dr() { "$DR" --data-dir "$DATA" "$@"; }
export RAYON_NUM_THREADS="$THREADS"

head -n "$N" bench/methods/triplets.jsonl > "$WORK/short.jsonl"
head -n "$N" bench/synth/postgres-synth-train.jsonl > "$WORK/long.jsonl"
for set in short:newwiki long:postgres; do
    name=${set%%:*} collection=${set##*:}
    for checkpoint in false true; do
        adapter="ckpt-$name-$checkpoint"
        dr train --collection "$collection" --no-progress --triplets "$WORK/$name.jsonl" \
            --name "$adapter" --replace --method lora --rank 16 --alpha 32 --lr 4e-4 --warmup 2 \
            --batch 2 --workers "$THREADS" --epochs 1 --val-split 0.1 --seed 7 \
            --gradient-checkpointing "$checkpoint"
        dr adapters show "$adapter" --json > "$WORK/$name-$checkpoint.json"
        dr adapters remove "$adapter" >/dev/null
    done
done

python3 - "$WORK" "$OUT" "$N" <<'EOF'
import json, sys
work, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = []
for name in ("short", "long"):
    for checkpoint in ("false", "true"):
        rec = json.load(open(f"{work}/{name}-{checkpoint}.json"))["training"]
        rows.append({
            "sequences": name,
            "gradient_checkpointing": checkpoint == "true",
            "tokens_per_s": round(rec["tokens_per_s"], 1),
            "peak_rss_mib": round(rec["peak_rss_mib"]),
            "wall_s": round(rec["wall_s"], 1),
            "train_losses": [round(p["train_loss"], 5) for p in rec["curve"]],
            "best_val_loss": rec["best_val_loss"],
        })
json.dump({"triplets": n, "runs": rows}, open(f"{out}/checkpointing.json", "w"), indent=1)
lines = [
    f"## Layer checkpointing vs plain backpropagation: LoRA r16, first {n} triplets, 1 epoch",
    "",
    "| sequences | checkpointing | tokens/s | peak RSS MiB | wall s | val loss | first / last train loss |",
    "|---|---|---|---|---|---|---|",
]
for r in rows:
    losses = r["train_losses"]
    lines.append(
        f"| {r['sequences']} | {'yes' if r['gradient_checkpointing'] else 'no'} | "
        f"{r['tokens_per_s']} | {r['peak_rss_mib']} | {r['wall_s']} | "
        f"{r['best_val_loss']:.4f} | {losses[0]:.4f} / {losses[-1]:.4f} |"
    )
for name in ("short", "long"):
    plain, ckpt = [r for r in rows if r["sequences"] == name]
    lines.append("")
    lines.append(
        f"{name}: checkpointing at {ckpt['tokens_per_s'] / plain['tokens_per_s']:.2f}x the "
        f"tokens/s, {ckpt['peak_rss_mib'] / plain['peak_rss_mib']:.2f}x the peak RSS"
    )
open(f"{out}/checkpointing.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
