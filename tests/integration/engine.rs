//! The native engine (`generate.engine = "native"`) on the real converted SmolLM2-135M-Instruct:
//! the same greedy tokens as mistral.rs with and without an adapter (a RAG prompt among them),
//! and with the adapter's matrices kept in f16 or 8 bits,
//! the same prompt tokens, requests for different adapters batched together answering as they
//! do alone, adapters loaded and forgotten without a restart, a dropped request leaving the
//! engine, and prompts too long for the KV budget refused as bad input.

use std::sync::Arc;
use std::time::{Duration, Instant};

use domainrag::adapters::{BaseModelInfo, LORA_MODULES, write_test_adapter};
use domainrag::error::ErrorKind;
use domainrag::generate::{ChatMessage, GenEvent, Generator};
use domainrag::rag::build_messages_from_context;

use crate::helpers::{
    exclusive_generation, generator, greedy, models_dir, native_generator, native_lora_generator,
    user,
};

/// Register a deterministic synthetic LoRA adapter on all seven modules.
pub(crate) fn register_adapter(g: &Generator, tag: &str, seed: usize) -> String {
    let base = BaseModelInfo::from_dir(&models_dir().join("SmolLM2-135M-Instruct-hf")).unwrap();
    let src = tempfile::tempdir().expect("tempdir");
    let layers: Vec<usize> = (0..base.num_hidden_layers).collect();
    write_test_adapter(src.path(), &base, 8, 16.0, &LORA_MODULES, &layers, |i| {
        (((i * 7919 + seed * 104_729) % 13) as f32 - 6.0) * 0.012
    })
    .expect("write adapter");
    let name = format!("{tag}-{}", std::process::id());
    g.registry()
        .add(&name, src.path(), &base)
        .expect("adapter is valid");
    name
}

/// Run `jobs` (adapter, question) one at a time, then all at once, and check each answers the
/// same in the batch as alone (greedy, 24 tokens); returns the answers.
pub(crate) async fn batched_like_alone(
    g: &Arc<Generator>,
    jobs: &[(Option<String>, &str)],
) -> Vec<String> {
    let mut alone = Vec::new();
    for (adapter, q) in jobs {
        let c = g.complete(adapter.as_deref(), user(q), greedy(24)).await;
        alone.push(c.expect("alone").text);
    }
    let together = futures::future::join_all(jobs.iter().map(|(adapter, q)| {
        let g = Arc::clone(g);
        async move { g.complete(adapter.as_deref(), user(q), greedy(24)).await }
    }))
    .await;
    for ((job, alone), together) in jobs.iter().zip(&alone).zip(together) {
        assert_eq!(&together.expect("batched").text, alone, "{job:?}");
    }
    alone
}

fn prompts() -> Vec<Vec<ChatMessage>> {
    let context = "[1] The Normans were the people who in the 10th and 11th centuries gave their \
                   name to Normandy, a region in France. They were descended from Norse raiders \
                   and pirates from Denmark, Iceland and Norway who, under their leader Rollo, \
                   agreed to swear fealty to King Charles III of West Francia.\n[2] The Norman \
                   dynasty had a major political, cultural and military impact on medieval \
                   Europe and even the Near East.";
    vec![
        user("What is the capital of France?"),
        user("Write a short poem about the sea."),
        build_messages_from_context("In what country is Normandy located?", context),
    ]
}

#[tokio::test]
async fn native_engine_gives_mistralrs_greedy_tokens_with_and_without_an_adapter() {
    let _alone = exclusive_generation().await;
    let (mistral, native) = (generator().await, native_generator().await);
    let name = register_adapter(&mistral, "parity", 1);
    let mut changed = 0;
    for messages in prompts() {
        assert_eq!(
            native.tokenize_chat(messages.clone()).await.unwrap(),
            mistral.tokenize_chat(messages.clone()).await.unwrap(),
            "the prompt's tokens"
        );
        let mut texts = Vec::new();
        for adapter in [None, Some(name.as_str())] {
            let want = mistral
                .complete(adapter, messages.clone(), greedy(64))
                .await
                .expect("mistral.rs answers");
            let got = native
                .complete(adapter, messages.clone(), greedy(64))
                .await
                .expect("native answers");
            assert_eq!(got.text, want.text, "adapter {adapter:?}, {messages:?}");
            assert_eq!(got.completion_tokens, want.completion_tokens);
            assert_eq!(got.prompt_tokens, want.prompt_tokens);
            if adapter.is_some() {
                // The same adapter kept in f16 or 8 bits (`generate.lora_dtype`): the same
                // greedy tokens.
                for dtype in ["f16", "q8"] {
                    let kept = native_lora_generator(dtype)
                        .await
                        .complete(adapter, messages.clone(), greedy(64))
                        .await
                        .expect("native answers");
                    assert_eq!(kept.text, got.text, "{dtype}, {messages:?}");
                }
            }
            texts.push(got.text);
        }
        changed += usize::from(texts[0] != texts[1]);
    }
    assert!(
        changed > 0,
        "the adapter changed no answer: the test shows nothing"
    );
    assert_eq!(
        native.end_of_turn_token().await.unwrap(),
        mistral.end_of_turn_token().await.unwrap()
    );
}

#[tokio::test]
async fn requests_for_different_adapters_batched_together_answer_as_alone() {
    let g = native_generator().await;
    let a = register_adapter(&g, "mix-a", 2);
    let b = register_adapter(&g, "mix-b", 3);
    let jobs: Vec<(Option<String>, &str)> = vec![
        (None, "Name three colours."),
        (Some(a.clone()), "Name three colours."),
        (Some(b.clone()), "Name three colours."),
        (Some(a.clone()), "What is two plus two?"),
        (None, "What is two plus two?"),
    ];
    let alone = batched_like_alone(&g, &jobs).await;
    assert_ne!(alone[0], alone[1], "adapter a has no effect");
    assert_ne!(alone[1], alone[2], "adapters a and b answer alike");
    let stats = g.stats().engine.expect("native figures");
    assert!(
        stats.step_rows > stats.steps,
        "no step ever ran more than one row: {stats:?}"
    );
}

#[tokio::test]
async fn adapters_come_and_go_without_a_restart() {
    let g = native_generator().await;
    let name = register_adapter(&g, "hot", 4);
    g.preload_registered().await.expect("preload");
    assert!(
        g.resident_adapters().await.contains(&name),
        "every registered adapter is loaded"
    );
    let before = g
        .complete(Some(&name), user("Hi"), greedy(8))
        .await
        .unwrap();
    g.evict(&name).await;
    assert!(!g.resident_adapters().await.contains(&name));
    // Loaded again at its next request, from the registry's files.
    let again = g
        .complete(Some(&name), user("Hi"), greedy(8))
        .await
        .unwrap();
    assert_eq!(again.text, before.text);
    g.registry().remove(&name, &[]).expect("remove");
    g.evict(&name).await;
    let err = g
        .complete(Some(&name), user("Hi"), greedy(8))
        .await
        .expect_err("a removed adapter cannot answer");
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
}

#[tokio::test]
async fn a_dropped_request_leaves_the_engine_and_a_too_long_one_is_refused() {
    let g = native_generator().await;
    let mut rx = g
        .stream(None, user("Count from one to five hundred."), greedy(400))
        .await
        .expect("stream");
    assert!(matches!(rx.recv().await, Some(GenEvent::Token(_))));
    let cancelled = g.stats().engine.unwrap().cancelled;
    drop(rx);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = g.stats().engine.unwrap();
        if s.cancelled > cancelled {
            break;
        }
        assert!(Instant::now() < deadline, "the request kept running: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let long = "word ".repeat(20_000);
    let err = g
        .complete(None, user(&long), greedy(16))
        .await
        .expect_err("too long");
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    assert!(err.to_string().contains("tokens"), "{err}");
}

#[tokio::test]
async fn the_native_engine_answers_through_rag_with_citations() {
    use domainrag::rag::{AdapterChoice, Rag};
    use domainrag::retrieve::Retriever;

    use crate::helpers::{TestCollection, embedder};
    let t = TestCollection::with_corpus("native-answers").await;
    let col = t.open().await;
    let settings = crate::helpers::settings(t.dir.path());
    let rag = Rag::new(
        Retriever::new(embedder().await),
        native_generator().await,
        settings.rag.clone(),
        greedy(96),
    );
    let answer = rag
        .answer(&col, "How do I reset my password?", &AdapterChoice::Base)
        .await
        .expect("answer");
    assert_eq!(answer.sources[0].doc_id, "faq-password");
    assert!(answer.completion_tokens > 0 && !answer.answer.is_empty());
    assert!(
        !answer.citations.is_empty(),
        "the answer cites no source: {:?}",
        answer.answer
    );
}

#[tokio::test]
async fn the_quantised_engines_answer_like_the_f32_one() {
    let f32 = native_generator().await;
    let q = "What is the capital of France?";
    let b = f32.complete(None, user(q), greedy(16)).await.expect("f32");
    assert!(b.text.contains("Paris"), "{:?}", b.text);
    for isq in ["q8_0", "q4_0"] {
        let mut s = crate::helpers::settings(crate::helpers::adapter_data_dir());
        s.generate.engine = "native".into();
        s.generate.isq = isq.into();
        let g = Generator::load(&s).await.expect("quantised engine loads");
        let a = g.complete(None, user(q), greedy(16)).await.expect(isq);
        assert!(a.text.contains("Paris"), "{isq}: {:?}", a.text);
        let stats = g.stats().engine.expect("native");
        assert!(stats.finished >= 1);
    }
}

/// Tokens that decode to nothing (here the end-of-turn token, a special token) leave nothing
/// behind: the text after them streams as if they were not there.
#[tokio::test]
async fn the_detokenizer_passes_over_tokens_that_decode_to_nothing() {
    use domainrag::engine::{ChatTokenizer, Detokenizer};
    let chat = ChatTokenizer::load(&models_dir().join("SmolLM2-135M-Instruct-hf")).unwrap();
    let mut d = Detokenizer::default();
    let mut text = String::new();
    for _ in 0..300 {
        assert_eq!(d.push(&chat, chat.end_of_turn()).unwrap(), None);
    }
    for id in chat.encode_text("The capital is Paris.").unwrap() {
        text.extend(d.push(&chat, id).unwrap());
    }
    text.extend(d.finish(&chat).unwrap());
    assert_eq!(text, "The capital is Paris.");
}

#[tokio::test]
async fn the_model_tokenizer_cites_only_given_sources() {
    use domainrag::engine::ChatTokenizer;
    let chat = ChatTokenizer::load(&models_dir().join("SmolLM2-135M-Instruct-hf")).unwrap();
    let vocab = chat.citation_vocab();
    let id = |text: &str| {
        let ids = chat.encode_text(text).unwrap();
        assert_eq!(ids.len(), 1, "{text:?} is one token: {ids:?}");
        ids[0]
    };
    // The observed loop, tokenised as the model writes it: with 5 sources, "[7" is banned,
    // "[3" is not; after "[1] [2] [3] [4] [5]" no bracket may open the run again.
    let answer = chat.encode_text("Use a GIN index. [").unwrap();
    let banned = vocab.banned(&answer, 5);
    assert!(
        banned.contains(&id("7")) && banned.contains(&id("0")),
        "{banned:?}"
    );
    assert!(!banned.contains(&id("3")));
    let counted = chat
        .encode_text("Use a GIN index. [1] [2] [3] [4] [5]")
        .unwrap();
    assert!(vocab.banned(&counted, 5).contains(&id(" [")));
    // A subscript is not a citation.
    let subscript = chat.encode_text("SELECT arr[").unwrap();
    assert!(!vocab.banned(&subscript, 5).contains(&id("7")));
}
