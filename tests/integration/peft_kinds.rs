//! Adapters of kinds other than LoRA, made by the peft library: PEFT (IA)³, prompt-tuning and
//! prefix-tuning adapters (`tests/fixtures/peft/{ia3,prompt,prefix}`, written with the greedy
//! tokens peft gives with them by `benches/peft_reference.py`) are registered and served by the
//! native engine with the same greedy answers as peft's, in batches mixed with each other, LoRA
//! and base requests, and refused with the reason by mistral.rs, which serves LoRA only.

use domainrag::adapters::{AdapterKind, BaseModelInfo};
use domainrag::error::ErrorKind;
use domainrag::generate::{ChatMessage, Generator, Role};
use serde::Deserialize;

use crate::engine::{batched_like_alone, register_adapter};
use crate::helpers::{
    exclusive_generation, generator, greedy, models_dir, native_generator, repo_root, user,
};

#[derive(Deserialize)]
struct Reference {
    max_new_tokens: usize,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    messages: Vec<Message>,
    base: Answer,
    adapter: Answer,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: String,
}

#[derive(Deserialize)]
struct Answer {
    prompt_tokens: usize,
    text: String,
}

fn fixture_dir(kind: &str) -> std::path::PathBuf {
    repo_root().join("tests/fixtures/peft").join(kind)
}

fn reference(kind: &str) -> Reference {
    let path = fixture_dir(kind).join("reference.json");
    let text =
        std::fs::read_to_string(&path).expect("the peft reference (benches/peft_reference.py)");
    serde_json::from_str(&text).expect("reference.json")
}

fn chat(messages: &[Message]) -> Vec<ChatMessage> {
    messages
        .iter()
        .map(|m| ChatMessage {
            role: match m.role.as_str() {
                "system" => Role::System,
                "assistant" => Role::Assistant,
                _ => Role::User,
            },
            content: m.content.clone(),
        })
        .collect()
}

/// Register the PEFT-made adapter of `kind` under a name of this process.
fn register_peft(g: &Generator, kind: &str) -> String {
    let base = BaseModelInfo::from_dir(&models_dir().join("SmolLM2-135M-Instruct-hf")).unwrap();
    let name = format!("peft-{kind}-{}", std::process::id());
    g.registry()
        .replace(&name, &fixture_dir(kind), &base)
        .expect("the PEFT adapter is valid");
    name
}

/// The native engine answers the reference's prompts with and without the PEFT-made adapter of
/// `kind` as the peft library did.
async fn gives_the_peft_librarys_greedy_tokens(kind: &str, want_kind: AdapterKind) {
    let _alone = exclusive_generation().await;
    let g = native_generator().await;
    let name = register_peft(&g, kind);
    assert_eq!(g.registry().get(&name).unwrap().kind, want_kind);
    let reference = reference(kind);
    let mut changed = 0;
    for case in &reference.cases {
        let messages = chat(&case.messages);
        let prompt = g.tokenize_chat(messages.clone()).await.unwrap();
        assert_eq!(
            prompt.len(),
            case.base.prompt_tokens,
            "{:?}",
            case.messages[0].content
        );
        for (adapter, want) in [(None, &case.base), (Some(name.as_str()), &case.adapter)] {
            let got = g
                .complete(adapter, messages.clone(), greedy(reference.max_new_tokens))
                .await
                .expect("native answers");
            assert_eq!(
                got.text.trim(),
                want.text.trim(),
                "{kind} adapter {adapter:?}, prompt {:?}",
                case.messages.last().map(|m| &m.content)
            );
        }
        changed += usize::from(case.base.text != case.adapter.text);
    }
    assert!(
        changed >= 2,
        "the reference {kind} adapter changes too little"
    );
}

#[tokio::test]
async fn a_peft_ia3_adapter_gives_the_peft_librarys_greedy_tokens() {
    gives_the_peft_librarys_greedy_tokens("ia3", AdapterKind::Ia3).await;
}

#[tokio::test]
async fn a_peft_prompt_tuning_adapter_gives_the_peft_librarys_greedy_tokens() {
    gives_the_peft_librarys_greedy_tokens("prompt", AdapterKind::Prompt).await;
}

#[tokio::test]
async fn a_peft_prefix_tuning_adapter_gives_the_peft_librarys_greedy_tokens() {
    gives_the_peft_librarys_greedy_tokens("prefix", AdapterKind::Prefix).await;
}

#[tokio::test]
async fn every_kind_and_base_requests_batched_together_answer_as_alone() {
    let g = native_generator().await;
    let ia3 = register_peft(&g, "ia3");
    let prompt = register_peft(&g, "prompt");
    let prefix = register_peft(&g, "prefix");
    let lora = register_adapter(&g, "mix-kinds-lora", 5);
    let q = "Write a short poem about the sea.";
    let jobs: Vec<(Option<String>, &str)> = vec![
        (None, q),
        (Some(ia3.clone()), q),
        (Some(prompt.clone()), q),
        (Some(prefix.clone()), q),
        (Some(lora.clone()), q),
        (Some(prefix.clone()), "What is two plus two?"),
        (Some(prompt.clone()), "What is two plus two?"),
        (Some(ia3.clone()), "What is two plus two?"),
        (Some(lora.clone()), "What is two plus two?"),
    ];
    let alone = batched_like_alone(&g, &jobs).await;
    for (i, kind) in [(1, "(IA)³"), (2, "prompt-tuning"), (3, "prefix-tuning")] {
        assert_ne!(alone[i], alone[0], "the {kind} adapter has no effect");
    }
}

#[tokio::test]
async fn virtual_tokens_count_against_the_context() {
    let g = native_generator().await;
    let prefix = register_peft(&g, "prefix");
    let virtual_tokens = g.registry().get(&prefix).unwrap().virtual_tokens;
    assert_eq!(virtual_tokens, 8);
    let messages = user("Hi");
    let prompt = g.tokenize_chat(messages.clone()).await.unwrap().len();
    // SmolLM2's context is 8192 tokens: a request that fills it exactly fits without the
    // adapter and is refused with it, naming the virtual tokens.
    let max_tokens = 8192 - prompt;
    let err = g
        .complete(Some(&prefix), messages.clone(), greedy(max_tokens))
        .await
        .expect_err("the virtual tokens do not fit");
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    assert!(err.to_string().contains("8 virtual tokens"), "{err}");
    let fits = g
        .complete(Some(&prefix), messages, greedy(max_tokens - virtual_tokens))
        .await;
    assert!(fits.is_ok(), "{fits:?}");
}

#[tokio::test]
async fn mistralrs_refuses_an_ia3_adapter_with_the_reason() {
    let g = generator().await;
    let name = register_peft(&g, "ia3");
    let err = g
        .complete(Some(&name), user("Hi"), greedy(4))
        .await
        .expect_err("mistral.rs serves LoRA only");
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    assert!(err.to_string().contains("native"), "{err}");
    let base = g.complete(None, user("Hi"), greedy(4)).await;
    assert!(base.is_ok(), "the base model still answers: {base:?}");
}
