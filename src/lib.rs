//! domainrag: an on-prem RAG appliance. Collections of documents are chunked, embedded and indexed
//! (tantivy BM25 + Qdrant vectors) and searched with hybrid retrieval.
//!
//! Module graph (one way): {`cli`, `http`} -> `app` (the operations both edges perform) ->
//! {`access`, `collection`, `adapters`, `answerlog`, `ingest`, `generate`, `rag` (types)};
//! {`cli`, `http`} -> `adapt` -> `train` -> `eval` -> `rag` ->
//! {`retrieve`, `generate`}; `http` -> `jobs`;
//! `cli` -> {`ingest`, `bench`} -> `collection` -> {`index`, `vectors`, `embed`, `chunk`};
//! {`cli`, `http`, `train`} -> `answerlog` -> {`eval`, `rag`};
//! `generate` -> `adapters`; everything -> {`config`, `error`}. See ARCHITECTURE.md.

#![warn(unreachable_pub)]

/// Big blocks from reusable mappings, the rest from the system allocator (see [`heap::blocks`]).
#[global_allocator]
static ALLOCATOR: heap::Allocator = heap::Allocator;

pub mod access;
pub mod adapt;
pub mod adapters;
pub mod answerlog;
pub mod app;
pub mod bench;
pub mod chunk;
pub mod cli;
pub mod collection;
pub mod config;
pub mod datadir;
pub mod embed;
pub mod engine;
pub mod error;
pub mod eval;
pub mod generate;
pub mod heap;
pub mod http;
pub mod index;
pub mod ingest;
pub mod jobs;
pub mod killpoint;
pub mod llama;
pub mod rag;
pub mod retrieve;
pub mod rng;
pub mod telemetry;
pub mod train;
pub mod tune;
pub mod vectors;
