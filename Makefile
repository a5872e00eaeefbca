# domainrag: the two commands a new user needs are `make demo` and `make test`.
# Builds use one profile (release) for tests, benchmarks and the binary, in a target dir that
# survives between runs (the full dependency build takes ~10-25 minutes cold on 2 cores).

CARGO_TARGET_DIR ?= $(HOME)/.cache/domainrag-target
export CARGO_TARGET_DIR
BIN := $(CARGO_TARGET_DIR)/release/domainrag
DATA_DIR ?= data
DR := $(BIN) --data-dir $(DATA_DIR)
SQUAD := data/squad/squaddev_v1.1.json

.PHONY: models build test lint demo demo-adapter demo-postgres-adapter serve eval-squad bench bench-train bench-engines bench-engines-native bench-generate bench-soak bench-answerlog bench-bad-inputs fuzz eval-demo house-adapter eval-house clean-demo bench-retrieval bench-retrieval-tune bench-retrieval-scale bench-methods bench-train-checkpointing

## Fetch, verify (sha256) and lay out models and data into data/ (cached; a rerun takes seconds).
models:
	bash scripts/fetch-models.sh

build:
	cargo build --release

## The test suite: unit + integration tests (real tantivy, qdrant-edge, MiniLM embeddings).
test: models
	bash scripts/test-deps.sh
	cargo test --release

lint:
	cargo fmt --check
	cargo clippy --release --all-targets -- -D warnings

## The main job on the embedded default: PostgreSQL 15 manual -> collection `postgres` -> searches.
demo: models build
	$(DR) collection show postgres >/dev/null 2>&1 || $(DR) collection create postgres
	$(DR) ingest --collection postgres data/demo/postgresql-15
	$(DR) search --collection postgres "how do I create a partial index" --k 3
	$(DR) search --collection postgres "reclaim disk space after deleting many rows" --k 3
	$(DR) search --collection postgres "pg_dump restore into a different database" --mode bm25 --k 3
	$(MAKE) demo-adapter
	$(DR) adapters show house >/dev/null 2>&1 || $(MAKE) house-adapter
	$(MAKE) demo-postgres-adapter
	bash scripts/demo-key.sh $(BIN) $(DATA_DIR)
	@echo "starting the appliance at http://127.0.0.1:8080 (Ctrl-C stops it)"
	@echo "pick collection newwiki: it answers with its trained adapter newwiki-demo; switch to 'base model' to compare"
	$(DR) serve

## A collection with an adapter trained here: SQuAD-Shifts new_wiki, split by article; 120
## training questions -> triplets (gold paragraph as the source, short sequences) -> LoRA (1 epoch,
## ~3 min on 2 cores) -> assigned to the collection; then a held-out question, base vs adapter.
NEWWIKI_SPLIT := bench/train/split
demo-adapter: models build
	python3 benches/squad_shifts_split.py --input data/squad/new_wiki_v1.0.json --out-dir $(NEWWIKI_SPLIT)
	$(DR) collection show newwiki >/dev/null 2>&1 || $(DR) collection create newwiki
	$(DR) ingest --collection newwiki --format squad data/squad/new_wiki_v1.0.json
	$(DR) triplets build --collection newwiki --format squad --questions $(NEWWIKI_SPLIT)/train.json \
		--context gold --sample 120 --out $(NEWWIKI_SPLIT)/demo-triplets.jsonl
	$(DR) train --collection newwiki --triplets $(NEWWIKI_SPLIT)/demo-triplets.jsonl \
		--name newwiki-demo --replace --assign --epochs 1 --batch 1 --lr 3e-4 --val-split 0.1
	$(DR) ask --collection newwiki --no-adapter "In what year did the NHL make the two-lane pass legal?"
	$(DR) ask --collection newwiki "In what year did the NHL make the two-lane pass legal?"

## A collection's adapter from its documents alone: SYNTH_N triplets synthesised from the
## PostgreSQL manual (questions from definitions, purposes and instructions in its text, answered
## by the sentence and its citation; kept only when the retriever finds the source) -> LoRA
## (r 16 on all 7 projections, 1 epoch, 2 sequences a step; ~25 min on 2 cores: the recipe README
## scores) -> assigned to `postgres`; then one question, base vs adapter.
SYNTH_N ?= 150
demo-postgres-adapter: models build
	$(DR) collection show postgres >/dev/null 2>&1 || $(DR) collection create postgres
	$(DR) ingest --collection postgres data/demo/postgresql-15
	$(DR) triplets synth --collection postgres --n $(SYNTH_N) --seed 42 \
		--out $(DATA_DIR)/postgres-synth.jsonl --report $(DATA_DIR)/postgres-synth-report.json
	$(DR) train --collection postgres --triplets $(DATA_DIR)/postgres-synth.jsonl \
		--name postgres-synth --replace --assign --method lora --rank 16 --alpha 32 --lr 4e-4 \
		--batch 2 --epochs 1 --warmup 10 --val-split 0.1 --seed 7
	$(DR) ask --collection postgres --no-adapter "How do I reclaim disk space after deleting many rows?"
	$(DR) ask --collection postgres "How do I reclaim disk space after deleting many rows?"

## The house adapter every collection without its own answers with: LoRA trained on the
## retrieved triplets of 300 SQuAD dev questions and 200 synthetic how-to/definition triplets
## from the Debian Reference and Git's docs, the latter twice over (never new_wiki or the
## PostgreSQL set it is scored on); ~90 min on 2 cores. bench/house/.
## `make eval-house`: base vs house on the 200 held-out new_wiki questions (EVAL_LIMIT).
house-adapter: models build
	bash benches/house-adapter.sh

eval-house: models build
	EVAL=1 bash benches/house-adapter.sh

## Adapter training, domainrag vs Hugging Face peft side by side (~2 h): bench/train/.
bench-train: models build
	bash benches/train-vs-peft.sh

## The trainer's layer checkpointing against plain backpropagation: tokens/s and peak RSS of the
## same LoRA run on short and long sequences (~15 min; needs the collections bench-methods makes,
## DATA=its data dir). bench/train/checkpointing.{json,md}.
bench-train-checkpointing: build
	bash benches/train-checkpointing.sh

## LoRA, (IA)3, prompt and prefix tuning side by side (~1.3 h new_wiki on an idle machine, ~2.5 h more the PostgreSQL set): trained on the same new_wiki
## triplets and threads, answered through the full pipeline on held-out questions with the base
## as a fifth arm. bench/methods/ (benches/peft-methods.sh).
bench-methods: models build
	bash benches/peft-methods.sh

## Generation speed, native engine and mistral.rs configurations vs llama.cpp side by side (~17 min):
## bench/engines.json.
## The native engine (f32, q8_0, with and without an adapter) against llama.cpp alone (~5 min).
bench-engines-native: models build
	$(DR) bench engines --isq none,q8_0 --no-mistralrs \
		--peer-python "$$(bash benches/llama-cpp-venv.sh)" --reps 5 --max-tokens 128 \
		--out bench/engines-native.json

bench-engines: models build
	$(DR) bench engines --isq none,q8_0,q4_0,q4k \
		--mistralrs-gguf data/models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf \
		--peer-python "$$(bash benches/llama-cpp-venv.sh)" --reps 3 --max-tokens 128 --out bench/engines.json

## The native engine and mistral.rs side by side (~35 min): speed, memory with 10 adapters, a
## never-used adapter's TTFT, 8 requests over 4 adapters. bench/generate/.
bench-generate: models build
	bash benches/generate-engines.sh

## Memory soak (~75 min): the server answers 500 distinct new_wiki questions, base and the demo
## adapter alternating, RSS read after each; then `eval answers` over 300 questions with two arms.
## Needs the newwiki collection and its adapter (`make demo-adapter`). bench/soak/*.json.
## It runs on the default engine, native (files *-native.json); SOAK_ENGINE=mistralrs on mistral.rs;
## SOAK_ADAPTERS="newwiki-demo house ..." makes the server soak's traffic rotate over the base
## model and each of them (registered adapters).
SOAK_TOKENS ?= 64
SOAK_ADAPTERS ?= newwiki-demo
# The engine the server soak runs on (native or mistralrs).
SOAK_ENGINE ?= native
SOAK_SUFFIX := $(if $(filter native,$(SOAK_ENGINE)),-native,)
bench-soak: models build
	$(DR) adapters show newwiki-demo >/dev/null 2>&1 || $(MAKE) demo-adapter
	DOMAINRAG__GENERATE__ENGINE=$(SOAK_ENGINE) python3 benches/soak.py server --bin $(BIN) --data-dir $(DATA_DIR) --collection newwiki \
		$(foreach a,$(SOAK_ADAPTERS),--adapter $(a)) --questions data/squad/new_wiki_v1.0.json --answers 500 \
		--max-tokens $(SOAK_TOKENS) --model-dir data/models/SmolLM2-135M-Instruct-hf \
		--progress 50 --out bench/soak/server$(SOAK_SUFFIX).json
	DOMAINRAG__GENERATE__ENGINE=$(SOAK_ENGINE) DOMAINRAG__GENERATE__MAX_TOKENS=$(SOAK_TOKENS) \
		$(DR) eval answers --collection newwiki \
		--format squad --questions data/squad/new_wiki_v1.0.json --sample 300 \
		--adapter none --adapter newwiki-demo --json bench/soak/eval-report$(SOAK_SUFFIX).json
	python3 benches/soak.py eval --report bench/soak/eval-report$(SOAK_SUFFIX).json --warmup 150 \
		--out bench/soak/eval$(SOAK_SUFFIX).json

## What the answer log costs an ask (~9 min, nothing else running): wrk on loopback against
## Hostile inputs (~3 min): each against a fresh `serve`: status, whether the next request is
## answered, the server's peak RSS against its baseline. bench/bad-inputs.json.
## Fuzz the loaders and the BM25 query builder (libFuzzer; scripts/fuzz.sh). FUZZ_SECONDS per target;
## the report goes to bench/fuzz.json. CI runs it briefly (30 s per target).
FUZZ_SECONDS ?= 600
fuzz:
	bash scripts/fuzz.sh --seconds $(FUZZ_SECONDS) --out bench/fuzz.json

bench-bad-inputs: models build
	python3 benches/bad_inputs.py --bin $(BIN) --models-dir data/models --out bench/bad-inputs.json

## `serve` with the log on and off in alternating rounds, on a collection of this repo's docs.
## Needs wrk (apt-get install wrk). bench/answerlog/load.json.
ANSWERLOG_DIR ?= $(HOME)/.cache/domainrag/bench-answerlog
bench-answerlog: models build
	rm -rf $(ANSWERLOG_DIR) && mkdir -p $(ANSWERLOG_DIR)
	$(BIN) --data-dir $(ANSWERLOG_DIR) --models-dir data/models collection create docs
	$(BIN) --data-dir $(ANSWERLOG_DIR) --models-dir data/models ingest -c docs --no-progress README.md ARCHITECTURE.md
	python3 benches/answerlog_load.py --bin $(BIN) --data-dir $(ANSWERLOG_DIR) --models-dir data/models \
		--collection docs --out bench/answerlog/load.json

## Answer quality on the demo corpus: data/eval/postgres-manual.jsonl (89 questions written by
## reading the PostgreSQL manual) through the full pipeline: the base model, the house adapter
## (when registered) and the adapter trained from the manual alone (`demo-postgres-adapter`),
## with paired differences against the base (~40 min). bench/demo/.
eval-demo: models build
	$(DR) collection show postgres >/dev/null 2>&1 || $(DR) collection create postgres
	$(DR) ingest --collection postgres data/demo/postgresql-15
	$(DR) adapters show postgres-synth >/dev/null 2>&1 || $(MAKE) demo-postgres-adapter
	mkdir -p bench/demo
	$(DR) eval answers --collection postgres --questions data/eval/postgres-manual.jsonl \
		--adapter none $$($(DR) adapters show house >/dev/null 2>&1 && echo --adapter house) \
		--adapter postgres-synth --json bench/demo/eval.json --html bench/demo/eval.html

## The appliance alone (API, OpenAI-compatible /v1, web UI) on the config's server.bind.
serve: build
	bash scripts/demo-key.sh $(BIN) $(DATA_DIR)
	$(DR) serve

## Retrieval quality on SQuAD 1.1 dev (all 10565 questions; bm25, dense, hybrid side by side).
eval-squad: models build
	$(DR) collection show squad >/dev/null 2>&1 || $(DR) collection create squad
	$(DR) ingest --collection squad --format squad $(SQUAD)
	$(DR) eval retrieval --collection squad --format squad --questions $(SQUAD) --json | tee bench/eval-squad.json

## Speed: ingest throughput and search latency (p50/p95 over 1000 queries, with/without embedding).
bench: eval-squad
	$(DR) bench ingest --format squad --out bench/ingest-squad.json $(SQUAD)
	$(DR) bench search --collection squad --format squad --questions $(SQUAD) --n 1000 --out bench/search-squad.json

clean-demo:
	-$(DR) collection delete postgres

## Retrieval side by side with a Python peer (bm25s + numpy) on SQuAD dev, new_wiki and Amazon
## reviews; `collection tune` checked on questions it did not tune on; retrieval at >= 100k chunks
## (HNSW, latency against the peer, ingest throughput and RSS). bench/retrieval/, README
## "Retrieval against a Python peer".
bench-retrieval: models build
	bash benches/retrieval-peer.sh

bench-retrieval-tune: models build
	bash benches/retrieval-tune.sh

bench-retrieval-scale: models build
	bash benches/retrieval-scale.sh
