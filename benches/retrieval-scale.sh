#!/usr/bin/env bash
# Retrieval at >= 100k chunks: SQuAD dev (2,452 chunks) plus 86,000 distractor documents
# (benches/scale_corpus.py: sentences of new_wiki and Amazon reviews, ~123 words each) in one
# collection, kept outside the repo in $SCALE_DATA. Ingested once (~30 min on 2 cores when nothing
# else runs; its seconds and peak RSS are kept); the ingest's end builds the HNSW graph. Then
# `eval retrieval` on 2,000 SQuAD dev questions at that size, then $ROUNDS (default 3) rounds of
# `bench search` (latency per mode without and with query embedding, and the vector store's
# recall@10 against exact search) and the Python peer on the same documents (random vectors for
# the distractors: timing only), in turn. Writes bench/retrieval/scale-*.json and
# summary-scale.{json,md} (round 1's tables, and every round's hybrid speed-up with the median).
#   bash benches/retrieval-scale.sh       (or: make bench-retrieval-scale)
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/domainrag-target}"
BIN="${DOMAINRAG_BIN:-$CARGO_TARGET_DIR/release/domainrag}"
D="${SCALE_DATA:-$HOME/.cache/domainrag/bench-scale}"
OUT=bench/retrieval
SQUAD=data/squad/squaddev_v1.1.json
PY=$(bash benches/retrieval-peer-venv.sh)
mkdir -p "$OUT" "$D"
[ -f "$D/distractors.jsonl" ] || python3 benches/scale_corpus.py --out "$D/distractors.jsonl" --docs 86000
if ! "$BIN" --data-dir "$D/data" collection show scale >/dev/null 2>&1; then
    "$BIN" --data-dir "$D/data" collection create scale
    /usr/bin/time -v "$BIN" --data-dir "$D/data" ingest --collection scale --format squad --no-progress \
        --json "$SQUAD" > "$D/ingest-squad.json" 2> "$D/ingest-squad.time"
    /usr/bin/time -v "$BIN" --data-dir "$D/data" ingest --collection scale --no-progress \
        --json "$D/distractors.jsonl" > "$D/ingest-distractors.json" 2> "$D/ingest-distractors.time"
else
    # Nothing changes (every document is unchanged); the ingest's end builds any missing index.
    "$BIN" --data-dir "$D/data" ingest --collection scale --format squad --no-progress "$SQUAD"
fi
python3 - "$D" "$OUT/scale-ingest.json" <<'PY'
import json, re, sys
d, out = sys.argv[1], sys.argv[2]
def rss(path):
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(path).read())
    return int(m.group(1)) / 1024
parts = {p: json.load(open(f"{d}/ingest-{p}.json")) for p in ("squad", "distractors")}
chunks = sum(v["chunks"] for v in parts.values())
seconds = sum(v["seconds"] for v in parts.values())
result = {"documents": sum(v["documents"] for v in parts.values()), "chunks": chunks,
          "seconds": seconds, "chunks_per_second": chunks / seconds,
          "distractors_chunks_per_second": parts["distractors"]["chunks"] / parts["distractors"]["seconds"],
          "peak_rss_mib": max(rss(f"{d}/ingest-{p}.time") for p in parts)}
try:  # a note written by hand about the ingest these figures come from (kept across reruns)
    result["note"] = json.load(open(out))["note"]
except (OSError, KeyError, ValueError):
    pass
json.dump(result, open(out, "w"), indent=2)
PY
"$BIN" --data-dir "$D/data" eval retrieval --collection scale --format squad --questions "$SQUAD" \
    --limit 2000 --json > "$OUT/scale-eval.json"
# Latency: domainrag and the peer in turn, $ROUNDS times (this machine's speed drifts by tens of
# percent within an hour, so the speed-up is taken per round and reported with its median).
for r in $(seq 1 "${ROUNDS:-3}"); do
    "$BIN" --data-dir "$D/data" bench search --collection scale --format squad --questions "$SQUAD" \
        --n 1000 --out "$OUT/scale-search-$r.json"
    "$PY" benches/retrieval_peer.py --squad "$SQUAD" --model-dir data/models/all-MiniLM-L6-v2 \
        --extra-jsonl "$D/distractors.jsonl" --limit 1000 --out "$OUT/scale-peer-$r.json"
done
cp "$OUT/scale-search-1.json" "$OUT/scale-search.json"
cp "$OUT/scale-peer-1.json" "$OUT/scale-peer.json"
python3 benches/retrieval_report.py scale "$OUT"
