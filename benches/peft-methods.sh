#!/usr/bin/env bash
# Four PEFT methods side by side (`make bench-methods`): LoRA, (IA)³, prompt tuning and prefix
# tuning trained by `domainrag train` on the same triplets, epochs, batch and threads, then
# answered through the full pipeline (hybrid retrieval, 5 sources) by the native engine — the
# only one that serves all four — with the base model as a fifth arm, in one `eval answers` run.
#
#   1. SQuAD-Shifts new_wiki split by article (benches/squad_shifts_split.py, seed 7): 300
#      training questions from 24 articles, 200 held-out questions from 24 others;
#   2. gold-context triplets of the 300 training questions (short sequences: ~5 min per method);
#   3. each method trained for EPOCHS (1) epoch, 2 sequences a step, one per core, 10% of the
#      triplets held back for the validation loss. Learning rates are each method's usual one
#      (LoRA 4e-4 as `make bench-train`; (IA)³ 1e-2; prefix tuning 1e-2 as peft's examples use),
#      one run each, not tuned on anything scored here. Prompt tuning's recipe (100 virtual
#      tokens, 1e-2) is the best validation loss of 5 variants (bench/methods/prompt-variants/:
#      20 tokens at 3e-2 / 1e-2 / 1e-1, 50 and 100 tokens at 1e-2), none scored on questions;
#   4. `eval answers` over the first EVAL_LIMIT (100) held-out questions, arms none + the four
#      adapters, 64-token answers, greedy;
#   5. benches/adapter_overhead.py: OVERHEAD_N (20) of those questions asked again through `serve`,
#      every arm per question in a rotated order: time to first token and decode time per token;
#   6. the same on the demo corpus (POSTGRES=1, the default; ~2.5 h more): the four methods trained
#      on the 150 synthetic triplets of the PostgreSQL manual (bench/synth/), scored on the 89
#      hand-written questions of data/eval/postgres-manual.jsonl (bench/methods/postgres/);
#   7. benches/methods_report.py: parameters, size, training time and tokens/s, serving time to
#      first token and decode time per token against the base (paired, same questions), and EM /
#      F1 / faithfulness / hallucination with paired bootstrap intervals vs the base and vs LoRA.
# Writes bench/methods/{triplets.jsonl, train-*.txt, adapter-*.json, eval.json, eval.html, overhead.json,
# report.json, summary.md} and bench/methods/postgres/. SKIP_TRAIN=1 reuses the registered
# adapters; KEEP_TRAINED=1 trains only those not registered yet (a run cut short goes on where it
# stopped); NEWWIKI=0 runs the PostgreSQL part alone.
set -euo pipefail
cd "$(dirname "$0")/.."
DR="${DR:-${CARGO_TARGET_DIR:-$HOME/.cache/domainrag-target}/release/domainrag}"
DATA="${DATA:-data}"
OUT="${OUT:-bench/methods}"
SPLIT=bench/train/split
THREADS="${THREADS:-2}"
EPOCHS="${EPOCHS:-1}"
EVAL_LIMIT="${EVAL_LIMIT:-100}"
OVERHEAD_N="${OVERHEAD_N:-20}"
mkdir -p "$OUT"
dr() { "$DR" --data-dir "$DATA" "$@"; }
export DOMAINRAG__GENERATE__THREADS="$THREADS" RAYON_NUM_THREADS="$THREADS"

python3 benches/squad_shifts_split.py --input data/squad/new_wiki_v1.0.json --out-dir "$SPLIT"
dr collection show newwiki >/dev/null 2>&1 || dr collection create newwiki
dr ingest --collection newwiki --format squad --no-progress data/squad/new_wiki_v1.0.json
dr triplets build --collection newwiki --format squad --questions "$SPLIT/train.json" \
    --context gold --out "$OUT/triplets.jsonl"

COMMON=(--batch 2 --workers "$THREADS" --epochs "$EPOCHS" --warmup 10 --val-split 0.1 --seed 7)
declare -A ARGS=(
    [lora]="--method lora --rank 16 --alpha 32 --lr 4e-4"
    [ia3]="--method ia3 --lr 1e-2"
    [prompt]="--method prompt --virtual-tokens 100 --lr 1e-2"
    [prefix]="--method prefix --virtual-tokens 20 --lr 1e-2"
)
METHODS=(lora ia3 prompt prefix)

# compare DIR COLLECTION TRIPLETS PREFIX MAX_TOKENS QUESTIONS EVAL_ARGS...: train the four
# methods on TRIPLETS as PREFIX-<method>, answer QUESTIONS with the base and each (eval answers,
# then the serving cost with the arms interleaved), write the report.
compare() {
    local dir=$1 collection=$2 triplets=$3 prefix=$4 max_tokens=$5 questions=$6
    shift 6
    local arms=(--adapter none)
    mkdir -p "$dir"
    for m in "${METHODS[@]}"; do
        if [ "${KEEP_TRAINED:-0}" = 1 ] && dr adapters show "$prefix-$m" >/dev/null 2>&1; then
            echo "$prefix-$m is registered: not trained again (KEEP_TRAINED=1)"
        elif [ "${SKIP_TRAIN:-0}" != 1 ]; then
            # shellcheck disable=SC2086 # ARGS values are word lists
            dr train --collection "$collection" --no-progress \
                --triplets "$triplets" --name "$prefix-$m" --replace ${ARGS[$m]} \
                "${COMMON[@]}" | tee "$dir/train-$m.txt"
        fi
        dr adapters show "$prefix-$m" --json > "$dir/adapter-$m.json"
        arms+=(--adapter "$prefix-$m")
    done
    DOMAINRAG__GENERATE__ENGINE=native DOMAINRAG__GENERATE__MAX_TOKENS="$max_tokens" \
        dr eval answers --collection "$collection" --questions "$questions" "$@" "${arms[@]}" \
        --json "$dir/eval.json" --html "$dir/eval.html"
    # Serving cost with the arms interleaved per question (the evaluation runs them in turn).
    DOMAINRAG__GENERATE__ENGINE=native python3 benches/adapter_overhead.py --bin "$DR" \
        --data-dir "$DATA" --collection "$collection" --questions "$questions" \
        --n "$OVERHEAD_N" --max-tokens "$max_tokens" "${arms[@]:2}" --out "$dir/overhead.json"
    python3 benches/methods_report.py --dir "$dir" --prefix "$prefix" --methods "${METHODS[@]}" \
        --out "$dir/report.json" | tee "$dir/summary.md"
}

if [ "${NEWWIKI:-1}" = 1 ]; then
    compare "$OUT" newwiki "$OUT/triplets.jsonl" methods 64 "$SPLIT/heldout.json" \
        --format squad --limit "$EVAL_LIMIT"
fi

# The demo corpus: the four methods trained on the 150 synthetic triplets of the PostgreSQL manual
# that README's postgres-synth adapter was trained on (`triplets synth`: no question/answer pairs),
# scored on the 89 hand-written questions of data/eval/postgres-manual.jsonl, 256-token answers.
if [ "${POSTGRES:-1}" = 1 ]; then
    dr collection show postgres >/dev/null 2>&1 || dr collection create postgres
    dr ingest --collection postgres --no-progress data/demo/postgresql-15
    compare "$OUT/postgres" postgres bench/synth/postgres-synth-train.jsonl pg-methods 256 \
        data/eval/postgres-manual.jsonl --limit "${PG_EVAL_LIMIT:-89}"
fi
