#!/usr/bin/env bash
# Does `collection tune` hold on questions it did not tune on? For each set (SQuAD dev, new_wiki,
# Amazon reviews): its articles are split in two halves (seeded); a copy of the collection made by
# benches/retrieval-peer.sh is tuned on the first half's QA pairs and scored with `eval retrieval`
# on the second half before and after; then another copy is tuned on 1,000 questions drafted from
# its own documents (`--synthetic`) and scored on all of the set's real questions. Writes
# bench/retrieval/tune-<set>.json and summary-tune.md.
#   bash benches/retrieval-tune.sh        (after benches/retrieval-peer.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/domainrag-target}"
BIN="${DOMAINRAG_BIN:-$CARGO_TARGET_DIR/release/domainrag}"
DATA="${BENCH_DATA:-$HOME/.cache/domainrag/bench-retrieval}"
OUT=bench/retrieval
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
for entry in squad:squaddev_v1.1 newwiki:new_wiki_v1.0 amazon:amazon_reviews_v1.0; do
    name=${entry%%:*}
    file=data/squad/${entry#*:}.json
    python3 benches/retrieval_report.py split "$file" "$WORK/$name-tune.json" "$WORK/$name-check.json"
    for how in qa synthetic; do
        rm -rf "$WORK/data" && mkdir -p "$WORK/data/collections"
        cp -r "$DATA/collections/$name" "$WORK/data/collections/"
        check="$WORK/$name-check.json"
        [ "$how" = synthetic ] && check="$file"
        "$BIN" --data-dir "$WORK/data" eval retrieval --collection "$name" --format squad \
            --questions "$check" --json > "$WORK/$name-$how-before.json"
        if [ "$how" = qa ]; then
            "$BIN" --data-dir "$WORK/data" collection tune -c "$name" --questions "$WORK/$name-tune.json" \
                --format squad --json > "$WORK/$name-$how-tune.json"
        else
            "$BIN" --data-dir "$WORK/data" collection tune -c "$name" --synthetic 1000 \
                --json > "$WORK/$name-$how-tune.json"
        fi
        "$BIN" --data-dir "$WORK/data" eval retrieval --collection "$name" --format squad \
            --questions "$check" --json > "$WORK/$name-$how-after.json"
    done
    python3 benches/retrieval_report.py tune-entry "$WORK" "$name" "$OUT/tune-$name.json"
done
python3 benches/retrieval_report.py tune "$OUT"
