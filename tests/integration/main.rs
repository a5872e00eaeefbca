//! The integration suite, one test binary: real tantivy, real qdrant-edge, real MiniLM embeddings
//! (from `data/models`, fetched by scripts/fetch-models.sh), the real CLI binary.

mod access;
mod app;
mod cli;
mod deploy;
mod embedding;
mod engine;
mod experiment;
mod faults;
mod generate;
mod helpers;
mod http;
mod ingest;
mod jobs;
mod operations;
mod peft_kinds;
mod retrieval;
mod schema;
mod soak;
mod train;
mod train_virtual;
mod tune;
mod vector_store;
