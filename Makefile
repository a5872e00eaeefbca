# domainrag: the two commands a new user needs are `make demo` and `make test`.
# Builds use one profile (release) for tests, benchmarks and the binary, in a target dir that
# survives between runs (the full dependency build takes ~10-25 minutes cold on 2 cores).

CARGO_TARGET_DIR ?= $(HOME)/.cache/domainrag-target
export CARGO_TARGET_DIR
BIN := $(CARGO_TARGET_DIR)/release/domainrag
DATA_DIR ?= data
DR := $(BIN) --data-dir $(DATA_DIR)
SQUAD := data/squad/squaddev_v1.1.json

.PHONY: models build test lint demo serve eval-squad bench clean-demo

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
	@echo "starting the appliance at http://127.0.0.1:8080 (Ctrl-C stops it)"
	$(DR) serve

## The appliance alone (API, OpenAI-compatible /v1, web UI) on the config's server.bind.
serve: build
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
