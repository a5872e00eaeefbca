//! Adapters of kinds other than LoRA, made by the peft library: a PEFT (IA)³ adapter
//! (`tests/fixtures/peft/ia3`, written with the greedy tokens peft gives with it by
//! `benches/peft_reference.py`) is registered and served by the native engine with the same
//! greedy answers as peft's, in batches mixed with LoRA and base requests, and refused with the
//! reason by mistral.rs, which serves LoRA only.

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

#[tokio::test]
async fn a_peft_ia3_adapter_gives_the_peft_librarys_greedy_tokens() {
    let _alone = exclusive_generation().await;
    let g = native_generator().await;
    let name = register_peft(&g, "ia3");
    assert_eq!(g.registry().get(&name).unwrap().kind, AdapterKind::Ia3);
    let reference = reference("ia3");
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
                "adapter {adapter:?}, prompt {:?}",
                case.messages.last().map(|m| &m.content)
            );
        }
        assert_ne!(
            case.base.text, case.adapter.text,
            "the reference adapter changes nothing"
        );
    }
}

#[tokio::test]
async fn ia3_lora_and_base_requests_batched_together_answer_as_alone() {
    let g = native_generator().await;
    let ia3 = register_peft(&g, "ia3");
    let lora = register_adapter(&g, "mix-ia3-lora", 5);
    let jobs: Vec<(Option<String>, &str)> = vec![
        (Some(ia3.clone()), "Name three colours."),
        (None, "Name three colours."),
        (Some(lora.clone()), "Name three colours."),
        (Some(ia3.clone()), "What is two plus two?"),
        (Some(lora.clone()), "What is two plus two?"),
    ];
    let alone = batched_like_alone(&g, &jobs).await;
    assert_ne!(alone[0], alone[1], "the (IA)³ adapter has no effect");
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
