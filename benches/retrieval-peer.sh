#!/usr/bin/env bash
# Retrieval quality, side by side with the Python peer (benches/retrieval_peer.py: bm25s + Snowball
# stemmer + English stopwords, MiniLM ONNX + numpy cosine, weighted and RRF fusion), on SQuAD dev,
# SQuAD-Shifts new_wiki and SQuAD-Shifts Amazon reviews, every question of each. domainrag runs
# with a fresh collection's default settings (config/default.toml). Collections live outside the
# repo in $BENCH_DATA (created and ingested once, ~2 min each). Writes bench/retrieval/
# {domainrag,peer}-<set>.json and summary.{json,md}.
#   bash benches/retrieval-peer.sh        (or: make bench-retrieval)
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/domainrag-target}"
BIN="${DOMAINRAG_BIN:-$CARGO_TARGET_DIR/release/domainrag}"
DATA="${BENCH_DATA:-$HOME/.cache/domainrag/bench-retrieval}"
OUT=bench/retrieval
PY=$(bash benches/retrieval-peer-venv.sh)
mkdir -p "$OUT"
for entry in squad:squaddev_v1.1 newwiki:new_wiki_v1.0 amazon:amazon_reviews_v1.0; do
    name=${entry%%:*}
    file=data/squad/${entry#*:}.json
    if ! "$BIN" --data-dir "$DATA" collection show "$name" >/dev/null 2>&1; then
        "$BIN" --data-dir "$DATA" collection create "$name"
        "$BIN" --data-dir "$DATA" ingest --collection "$name" --format squad --no-progress "$file"
    fi
    echo "== $name: domainrag"
    "$BIN" --data-dir "$DATA" eval retrieval --collection "$name" --format squad \
        --questions "$file" --json > "$OUT/domainrag-$name.json"
    echo "== $name: peer"
    "$PY" benches/retrieval_peer.py --squad "$file" --model-dir data/models/all-MiniLM-L6-v2 \
        --out "$OUT/peer-$name.json"
done
python3 benches/retrieval_report.py peer "$OUT"
