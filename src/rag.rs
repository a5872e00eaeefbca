//! The RAG pipeline: retrieve (hybrid) -> numbered sources within a token budget -> chat prompt ->
//! generate with the collection's adapter -> keep the `[n]` citations that point at sources given.
//!
//! Owns prompt construction and citation parsing (pure, unit-tested). Retrieval and generation are
//! called, not owned; nothing here touches tantivy, Qdrant or mistral.rs types.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use tokio::sync::mpsc;

use crate::collection::Collection;
use crate::config::RagConfig;
use crate::error::ErrorKind;
use crate::generate::{ChatMessage, GenEvent, GenerateError, Generator, Role, Sampling};
use crate::retrieve::{Mode, RetrieveError, Retriever, SearchHit};

#[derive(Debug, thiserror::Error)]
pub enum RagError {
    #[error(transparent)]
    Retrieve(#[from] RetrieveError),
    #[error(transparent)]
    Generate(#[from] GenerateError),
    #[error("{0}")]
    InvalidInput(String),
}

impl RagError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            RagError::Retrieve(e) => e.kind(),
            RagError::Generate(e) => e.kind(),
            RagError::InvalidInput(_) => ErrorKind::InvalidInput,
        }
    }
}

/// Which adapter answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdapterChoice {
    /// The collection's configured adapter; if it has none, the house adapter (`rag.house_adapter`)
    /// when that is registered; else the base model.
    Collection,
    /// This adapter.
    Named(String),
    /// The base model.
    Base,
}

/// A source given to the model.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Source {
    pub n: usize,
    pub chunk_id: String,
    pub doc_id: String,
    pub title: String,
    pub source: String,
    pub text: String,
    pub score: f32,
}

/// A source the answer cites.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Citation {
    pub n: usize,
    pub chunk_id: String,
    pub doc_id: String,
    pub title: String,
    pub source: String,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Timings {
    pub retrieve: f64,
    pub first_token: f64,
    pub total: f64,
}

/// A complete answer, as `ask --json` prints it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Answer {
    pub answer: String,
    pub adapter: Option<String>,
    pub citations: Vec<Citation>,
    pub sources: Vec<Source>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Why generation ended: `stop` (the model ended its turn) or `length` (`max_tokens` reached:
    /// the answer is cut off).
    pub finish_reason: String,
    pub timings_ms: Timings,
}

/// A question being answered: its sources are known, its tokens arrive on `events`.
#[derive(Debug)]
pub struct AnswerStream {
    pub adapter: Option<String>,
    pub sources: Vec<Source>,
    pub events: mpsc::Receiver<GenEvent>,
    pub retrieve_ms: f64,
    started: Instant,
}

const SYSTEM_PROMPT: &str = "You answer questions using only the numbered sources you are given. \
Cite the sources you use with their numbers in brackets, like [1]. If the sources do not contain \
the answer, say \"I don't know.\"";

/// The chat messages for `question` over `sources`, after earlier turns of the conversation.
pub fn build_messages_with_history(
    history: &[ChatMessage],
    question: &str,
    sources: &[Source],
) -> Vec<ChatMessage> {
    let mut messages = build_messages(question, sources);
    let user = messages
        .pop()
        .expect("build_messages returns system + user");
    messages.extend(history.iter().filter(|m| m.role != Role::System).cloned());
    messages.push(user);
    messages
}

/// The numbered sources block of the prompt (what training triplets store as `context`).
pub fn format_sources(sources: &[Source]) -> String {
    let mut out = String::from("Sources:\n");
    for s in sources {
        out.push_str(&format!("[{}] {}\n{}\n\n", s.n, s.title, s.text));
    }
    out
}

/// The chat messages for `question` over `sources`.
pub fn build_messages(question: &str, sources: &[Source]) -> Vec<ChatMessage> {
    build_messages_from_context(question, &format_sources(sources))
}

/// The chat messages for `question` over an already formatted sources block.
pub fn build_messages_from_context(question: &str, context: &str) -> Vec<ChatMessage> {
    let user = format!(
        "{context}Question: {question}\nAnswer briefly from the sources and cite them like [1]."
    );
    vec![
        ChatMessage {
            role: Role::System,
            content: SYSTEM_PROMPT.to_string(),
        },
        ChatMessage {
            role: Role::User,
            content: user,
        },
    ]
}

/// Source numbers cited in `answer` as `[n]` or `[n, m]`, in order of first citation, keeping only
/// numbers from 1 to `n_sources` (a model can invent numbers; those are dropped).
pub fn parse_citations(answer: &str, n_sources: usize) -> Vec<usize> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    let mut rest = answer;
    while let Some(open) = rest.find('[') {
        let after = &rest[open + 1..];
        let Some(close) = after.find(']') else { break };
        let inside = &after[..close];
        let numbers: Option<Vec<usize>> = inside
            .split(',')
            .map(|p| p.trim().parse::<usize>().ok())
            .collect();
        for n in numbers.unwrap_or_default() {
            if (1..=n_sources).contains(&n) && seen.insert(n) {
                out.push(n);
            }
        }
        rest = &after[close + 1..];
    }
    out
}

/// The citations of `answer` resolved against `sources`.
pub fn citations(answer: &str, sources: &[Source]) -> Vec<Citation> {
    parse_citations(answer, sources.len())
        .into_iter()
        .filter_map(|n| sources.iter().find(|s| s.n == n))
        .map(|s| Citation {
            n: s.n,
            chunk_id: s.chunk_id.clone(),
            doc_id: s.doc_id.clone(),
            title: s.title.clone(),
            source: s.source.clone(),
        })
        .collect()
}

/// The adapter that answers for a collection whose own adapter is `own`: that one; else the house
/// adapter `house` when it is configured and `registered`; else none (the base model).
pub fn adapter_in_service(
    own: Option<String>,
    house: &str,
    registered: impl Fn(&str) -> bool,
) -> Option<String> {
    own.or_else(|| (!house.is_empty() && registered(house)).then(|| house.to_string()))
}

/// The pipeline.
#[derive(Debug, Clone)]
pub struct Rag {
    retriever: Retriever,
    generator: Arc<Generator>,
    config: RagConfig,
    sampling: Sampling,
}

impl Rag {
    pub fn new(
        retriever: Retriever,
        generator: Arc<Generator>,
        config: RagConfig,
        sampling: Sampling,
    ) -> Rag {
        Rag {
            retriever,
            generator,
            config,
            sampling,
        }
    }

    pub fn generator(&self) -> &Arc<Generator> {
        &self.generator
    }

    /// The adapter that answers `choice` for `collection` (`None`: the base model).
    pub fn resolve_adapter(
        &self,
        choice: &AdapterChoice,
        collection: &Collection,
    ) -> Option<String> {
        match choice {
            AdapterChoice::Collection => adapter_in_service(
                collection.settings().adapter,
                &self.config.house_adapter,
                |a| self.generator.registry().contains(a),
            ),
            AdapterChoice::Named(n) => Some(n.clone()),
            AdapterChoice::Base => None,
        }
    }

    /// The house adapter, when one is configured and registered.
    pub fn house_adapter(&self) -> Option<String> {
        adapter_in_service(None, &self.config.house_adapter, |a| {
            self.generator.registry().contains(a)
        })
    }

    /// Retrieve and pick the sources that fit the token budget.
    pub async fn sources(
        &self,
        collection: &Collection,
        question: &str,
    ) -> Result<Vec<Source>, RagError> {
        let hits: Vec<SearchHit> = self
            .retriever
            .search(collection, question, Mode::Hybrid, self.config.max_sources)
            .await?;
        let mut sources = Vec::new();
        let mut used = 0;
        for hit in hits {
            let tokens = self
                .generator
                .count_tokens(&format!("{}\n{}", hit.title, hit.text))
                .await?;
            if used + tokens > self.config.context_tokens && !sources.is_empty() {
                break;
            }
            used += tokens;
            sources.push(Source {
                n: sources.len() + 1,
                chunk_id: hit.chunk_id,
                doc_id: hit.doc_id,
                title: hit.title,
                source: hit.source,
                text: hit.text,
                score: hit.score,
            });
        }
        Ok(sources)
    }

    /// Start answering: retrieval happens now, tokens stream on the returned receiver.
    pub async fn answer_stream(
        &self,
        collection: &Collection,
        question: &str,
        adapter: &AdapterChoice,
    ) -> Result<AnswerStream, RagError> {
        self.answer_stream_with_history(collection, &[], question, adapter)
            .await
    }

    /// Like [`Rag::answer_stream`], continuing a conversation: the previous user turn joins the
    /// retrieval query (follow-ups like "and how do I drop it?" need it) and earlier turns precede
    /// the question in the prompt.
    pub async fn answer_stream_with_history(
        &self,
        collection: &Collection,
        history: &[ChatMessage],
        question: &str,
        adapter: &AdapterChoice,
    ) -> Result<AnswerStream, RagError> {
        let started = Instant::now();
        let query = match history.iter().rev().find(|m| m.role == Role::User) {
            Some(previous) => format!("{}\n{question}", previous.content),
            None => question.to_string(),
        };
        let sources = self.sources(collection, &query).await?;
        let retrieve_ms = started.elapsed().as_secs_f64() * 1e3;
        self.generate(
            question,
            sources,
            self.resolve_adapter(adapter, collection),
            retrieve_ms,
            started,
        )
        .await
    }

    /// Start generating the answer to `question` over `sources`.
    async fn generate(
        &self,
        question: &str,
        sources: Vec<Source>,
        adapter: Option<String>,
        retrieve_ms: f64,
        started: Instant,
    ) -> Result<AnswerStream, RagError> {
        self.check_question(question).await?;
        let sampling = Sampling {
            cite_sources: if self.config.cite_only_given_sources {
                sources.len()
            } else {
                0
            },
            ..self.sampling
        };
        let events = self
            .generator
            .stream(
                adapter.as_deref(),
                build_messages(question, &sources),
                sampling,
            )
            .await?;
        Ok(AnswerStream {
            adapter,
            sources,
            events,
            retrieve_ms,
            started,
        })
    }

    /// Refuse a question longer than `rag.max_question_tokens` (bytes are checked first, so a
    /// megabyte of text is not tokenised to be refused).
    async fn check_question(&self, question: &str) -> Result<(), RagError> {
        let max = self.config.max_question_tokens;
        let too_long = |size: String| {
            RagError::InvalidInput(format!(
                "the question is {size} long; at most {max} tokens are answered \
                 (rag.max_question_tokens)"
            ))
        };
        if question.len() > max.saturating_mul(32) {
            return Err(too_long(format!("{} bytes", question.len())));
        }
        let tokens = self.generator.count_tokens(question).await?;
        if tokens > max {
            return Err(too_long(format!("{tokens} tokens")));
        }
        Ok(())
    }

    /// Answer `question` over given `sources` (no retrieval: gold-context evaluation).
    pub async fn answer_with_sources(
        &self,
        question: &str,
        sources: Vec<Source>,
        adapter: Option<String>,
    ) -> Result<Answer, RagError> {
        let stream = self
            .generate(question, sources, adapter, 0.0, Instant::now())
            .await?;
        collect(stream, |_| {}).await
    }

    /// Answer a question completely.
    pub async fn answer(
        &self,
        collection: &Collection,
        question: &str,
        adapter: &AdapterChoice,
    ) -> Result<Answer, RagError> {
        let stream = self.answer_stream(collection, question, adapter).await?;
        collect(stream, |_| {}).await
    }
}

/// Drain a stream into an [`Answer`], calling `on_token` for each piece as it arrives.
pub async fn collect(
    mut stream: AnswerStream,
    mut on_token: impl FnMut(&str),
) -> Result<Answer, RagError> {
    let mut text = String::new();
    let mut first_token = None;
    let mut counts = (0, 0);
    let mut finish = String::new();
    while let Some(event) = stream.events.recv().await {
        match event {
            GenEvent::Token(t) => {
                first_token.get_or_insert(stream.started.elapsed().as_secs_f64() * 1e3);
                on_token(&t);
                text.push_str(&t);
            }
            GenEvent::Done {
                prompt_tokens,
                completion_tokens,
                finish_reason,
            } => {
                counts = (prompt_tokens, completion_tokens);
                finish = finish_reason;
                break;
            }
            GenEvent::Error(e) => return Err(GenerateError::Generation(e).into()),
        }
    }
    let answer = text.trim().to_string();
    Ok(Answer {
        citations: citations(&answer, &stream.sources),
        answer,
        adapter: stream.adapter,
        sources: stream.sources,
        prompt_tokens: counts.0,
        completion_tokens: counts.1,
        finish_reason: finish,
        timings_ms: Timings {
            retrieve: stream.retrieve_ms,
            first_token: first_token.unwrap_or_default(),
            total: stream.started.elapsed().as_secs_f64() * 1e3,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_goes_between_system_and_question() {
        let history = vec![
            ChatMessage {
                role: Role::User,
                content: "first".into(),
            },
            ChatMessage {
                role: Role::Assistant,
                content: "reply".into(),
            },
            ChatMessage {
                role: Role::System,
                content: "ignored".into(),
            },
        ];
        let m = build_messages_with_history(&history, "next?", &[source(1)]);
        let roles: Vec<Role> = m.iter().map(|m| m.role).collect();
        assert_eq!(
            roles,
            [Role::System, Role::User, Role::Assistant, Role::User]
        );
        assert!(m[3].content.contains("Question: next?"));
    }

    fn source(n: usize) -> Source {
        Source {
            n,
            chunk_id: format!("c{n}"),
            doc_id: format!("d{n}"),
            title: format!("T{n}"),
            source: format!("/s/{n}"),
            text: format!("text {n}"),
            score: 1.0,
        }
    }

    #[test]
    fn citations_keep_only_given_sources_in_first_cited_order() {
        assert_eq!(
            parse_citations("A [2] and B [1][2], C [7] [0].", 3),
            vec![2, 1]
        );
        assert_eq!(parse_citations("see [1, 3] and [x] [", 3), vec![1, 3]);
        assert_eq!(parse_citations("no citations", 3), Vec::<usize>::new());
        let sources = [source(1), source(2)];
        let c = citations("It is so [2][5].", &sources);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].chunk_id, "c2");
    }

    #[test]
    fn prompt_numbers_sources_and_asks_the_question() {
        let m = build_messages("Why?", &[source(1), source(2)]);
        assert_eq!(m[0].role, Role::System);
        assert!(m[0].content.contains("only the numbered sources"));
        assert!(m[1].content.contains("[1] T1\ntext 1"));
        assert!(m[1].content.contains("[2] T2\ntext 2"));
        assert!(m[1].content.contains("Question: Why?\n"));
    }
}
