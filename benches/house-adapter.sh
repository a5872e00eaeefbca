#!/usr/bin/env bash
# The house adapter: a general "answer briefly from the numbered sources and cite them" LoRA that
# every collection without an adapter of its own answers with (`rag.house_adapter`, "house").
#
# Trained only on data that no scored set comes from: SQuAD 1.1 dev (Wikipedia), optionally
# SQuAD-Shifts amazon_reviews (product reviews) and two manuals of other software, the Debian
# Reference and Git's documentation (`scripts/fetch-models.sh` fetches them from Debian's
# archive); never new_wiki (its held-out split scores it) nor the PostgreSQL manual or its
# question set.
#   1. ingest SQuAD dev as collection `squad`, amazon_reviews as `amazon` (when asked) and the
#      two manuals' HTML pages as `manuals` (the retriever builds the contexts serving would give);
#   2. triplets: HOUSE_SQUAD SQuAD dev questions and HOUSE_AMAZON amazon questions with the
#      sources serving retrieves for them (span answers + the citation of the source holding
#      them; HOUSE_SHUFFLE=1 puts the sources in a shuffled order), and HOUSE_SYNTH synthetic
#      triplets from the manuals' chunks (`triplets synth`: how-to and definition questions
#      answered in a sentence, as a manual's readers ask them), HOUSE_SYNTH_PASSES times over
#      (their weight against the span answers). A part of count 0 is skipped with its ingest.
#      The defaults are the fourth recipe, the one README reports and `make demo` trains (300
#      SQuAD + no amazon + 200 synthetic twice over, unshuffled; ~90 min on 2 cores); the third
#      was 560 + 100 + 200 once (HOUSE_SQUAD=560 HOUSE_AMAZON=100 HOUSE_SYNTH_PASSES=1);
#   3. one epoch of LoRA (r 16, alpha 32, all 7 projections; HOUSE_METHOD sets another method and
#      its options; 2 sequences a step, one per core), registered as `house`;
#   4. with EVAL=1 (`make eval-house`): `eval answers` on the 200 held-out new_wiki questions the
#      README's adapter table uses (the first EVAL_LIMIT of them), base model vs house, 64-token
#      answers, bench/house/eval-newwiki.{json,html}; then the share of the in-domain adapter's
#      gain that house keeps (benches/house_share.py against bench/train/eval-retrieved.json).
# Writes bench/house/{triplets-*.jsonl, synth-report.json, train.txt, adapter.json}.
set -euo pipefail
cd "$(dirname "$0")/.."
DR="${DR:-${CARGO_TARGET_DIR:-$HOME/.cache/domainrag-target}/release/domainrag}"
DATA="${DATA:-data}"
OUT="${OUT:-bench/house}"
HOUSE_SQUAD="${HOUSE_SQUAD:-300}"
HOUSE_AMAZON="${HOUSE_AMAZON:-0}"
HOUSE_SYNTH="${HOUSE_SYNTH:-200}"
HOUSE_SYNTH_PASSES="${HOUSE_SYNTH_PASSES:-2}"
MANUALS="$DATA/demo/house-manuals"
# 1 = the retrieved sources in a shuffled order (the answer's source is not always [1]).
HOUSE_SHUFFLE="${HOUSE_SHUFFLE:-0}"
# The method and its options (word list), e.g. "--method ia3 --lr 1e-2".
HOUSE_METHOD="${HOUSE_METHOD:---method lora --rank 16 --alpha 32 --lr 4e-4}"
THREADS="${THREADS:-2}"
mkdir -p "$OUT"
dr() { "$DR" --data-dir "$DATA" "$@"; }

if [ "${EVAL:-0}" = 1 ]; then
    SPLIT=bench/train/split
    python3 benches/squad_shifts_split.py --input data/squad/new_wiki_v1.0.json --out-dir "$SPLIT" \
        --served 700
    dr collection show newwiki >/dev/null 2>&1 || dr collection create newwiki
    dr ingest --collection newwiki --format squad --no-progress data/squad/new_wiki_v1.0.json
    DOMAINRAG__GENERATE__MAX_TOKENS=64 dr eval answers --collection newwiki --format squad \
        --questions "$SPLIT/heldout.json" --limit "${EVAL_LIMIT:-200}" --adapter none --adapter house \
        --json "$OUT/eval-newwiki.json" --html "$OUT/eval-newwiki.html"
    python3 benches/house_share.py "$OUT/eval-newwiki.json" bench/train/eval-retrieved.json \
        --out "$OUT/share-newwiki.json"
    exit 0
fi

for c in squad:squaddev_v1.1:$HOUSE_SQUAD amazon:amazon_reviews_v1.0:$HOUSE_AMAZON; do
    IFS=: read -r name file n <<< "$c"
    file=data/squad/$file.json
    [ "$n" -gt 0 ] || continue
    dr collection show "$name" >/dev/null 2>&1 || dr collection create "$name"
    dr ingest --collection "$name" --format squad --no-progress "$file"
done
if [ "$HOUSE_SYNTH" -gt 0 ]; then
    [ -d "$MANUALS" ] || { echo "no $MANUALS: run scripts/fetch-models.sh" >&2; exit 1; }
    dr collection show manuals >/dev/null 2>&1 || dr collection create manuals
    find "$MANUALS" -name '*.html' -print0 | sort -z | xargs -0 "$DR" --data-dir "$DATA" ingest \
        --collection manuals --no-progress
fi
shuffle=(); [ "$HOUSE_SHUFFLE" = 1 ] && shuffle=(--shuffle-sources)
: > "$OUT/triplets-house.jsonl"
# part COUNT COMMAND...: one part of the triplets (none when COUNT is 0), appended to the set.
part() {
    local n=$1 out=$2; shift 2
    rm -f "$out"
    [ "$n" -gt 0 ] || return 0
    dr "$@" --out "$out"
    cat "$out" >> "$OUT/triplets-house.jsonl"
}
part "$HOUSE_SQUAD" "$OUT/triplets-squad.jsonl" triplets build --collection squad --format squad \
    --questions data/squad/squaddev_v1.1.json --context retrieved "${shuffle[@]}" \
    --sample "$HOUSE_SQUAD" --seed 31
part "$HOUSE_AMAZON" "$OUT/triplets-amazon.jsonl" triplets build --collection amazon \
    --format squad --questions data/squad/amazon_reviews_v1.0.json --context retrieved \
    "${shuffle[@]}" --sample "$HOUSE_AMAZON" --seed 32
part "$HOUSE_SYNTH" "$OUT/triplets-synth.jsonl" triplets synth --collection manuals \
    --n "$HOUSE_SYNTH" "${shuffle[@]}" --seed 33 --report "$OUT/synth-report.json"
# The manuals' sentence answers HOUSE_SYNTH_PASSES times over (their weight against the spans).
for ((pass = 1; pass < HOUSE_SYNTH_PASSES; pass++)); do
    cat "$OUT/triplets-synth.jsonl" >> "$OUT/triplets-house.jsonl"
done
# shellcheck disable=SC2086 # HOUSE_METHOD is a word list
RAYON_NUM_THREADS="$THREADS" /usr/bin/time -v "$DR" --data-dir "$DATA" train --collection squad \
    --no-progress --triplets "$OUT/triplets-house.jsonl" --name house --replace \
    $HOUSE_METHOD --warmup 10 --batch 2 --workers "$THREADS" --epochs 1 \
    --val-split 0.05 2> >(tee "$OUT/train.time" >&2) | tee "$OUT/train.txt"
dr adapters show house --json > "$OUT/adapter.json"
