//! The trainer (LoRA and (IA)³) against the real converted SmolLM2-135M-Instruct: its forward pass matches the
//! reference (and mistral.rs's tokenisation), gradients reach only the LoRA matrices, a short run
//! overfits a tiny fixture, and mistral.rs serving the trained adapter generates what the
//! trainer's own forward pass generates.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use candle_core::Device;
use domainrag::adapters::{AdapterKind, BaseModelInfo};
use domainrag::generate::{ChatMessage, Generator, Role, Sampling};
use domainrag::rag::build_messages_from_context;
use domainrag::train::model::{Ia3Spec, LlamaLora, LoraSpec};
use domainrag::train::{
    EncodeReport, Example, Method, Progress, TrainJob, TrainOptions, Trained, Triplet, encode,
    register, train as run_training,
};

use crate::helpers::{
    exclusive_generation, generator, greedy, models_dir, native_generator, native_lora_generator,
};

pub(crate) fn base_dir() -> std::path::PathBuf {
    models_dir().join("SmolLM2-135M-Instruct-hf")
}

fn reference() -> serde_json::Value {
    let path = base_dir().join("reference_generations.json");
    serde_json::from_slice(&std::fs::read(path).expect("reference file")).expect("json")
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// The trainer's forward (no adapter) gives the reference greedy tokens and top-1/top-2 logit
/// margins (recorded by an independent float64 numpy forward pass), on prompts tokenised by
/// mistral.rs exactly as the reference tokenised them.
#[tokio::test]
async fn trainer_forward_matches_the_reference() {
    let g = generator().await;
    let model = LlamaLora::load(&base_dir(), &Device::Cpu, None, 0).expect("model loads");
    let reference = reference();
    for case in reference["generations"].as_array().expect("generations") {
        let messages: Vec<ChatMessage> = case["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(|m| ChatMessage {
                role: match m["role"].as_str().expect("role") {
                    "system" => Role::System,
                    "assistant" => Role::Assistant,
                    _ => Role::User,
                },
                content: m["content"].as_str().expect("content").to_string(),
            })
            .collect();
        let prompt = ids(&case["prompt_ids"]);
        assert_eq!(
            g.tokenize_chat(messages).await.expect("tokenize"),
            prompt,
            "mistral.rs tokenises the chat prompt as the reference did"
        );
        let want = ids(&case["greedy_ids"]);
        let (got, logits) = model.greedy(&prompt, want.len(), &[]).expect("greedy");
        assert_eq!(got, want, "greedy tokens of {:?}", case["prompt"]);
        let margins = case["top1_top2_logit_margins"].as_array().expect("margins");
        for (step, (l, m)) in logits.iter().zip(margins).enumerate() {
            let mut sorted = l.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let margin = f64::from(sorted[0] - sorted[1]);
            let want = m.as_f64().expect("margin");
            assert!(
                (margin - want).abs() < 2e-3,
                "step {step}: margin {margin} vs reference {want}"
            );
        }
    }
}

pub(crate) struct Quiet;

impl Progress for Quiet {
    fn start(&mut self, _: usize) {}
    fn step(&mut self, _: usize, _: usize, _: f32, _: f64, _: f64) {}
    fn message(&mut self, _: &str) {}
    fn finish(&mut self) {}
}

pub(crate) fn fixture() -> Vec<Triplet> {
    [
        (
            "What colour is the zorblat?",
            "The zorblat is teal.",
            "teal [1]",
        ),
        (
            "Where do zorblats live?",
            "Zorblats live in Quebec.",
            "Quebec [1]",
        ),
        (
            "What do zorblats eat?",
            "Zorblats eat pine cones.",
            "pine cones [1]",
        ),
        (
            "How old can a zorblat get?",
            "A zorblat can reach 90 years.",
            "90 years [1]",
        ),
    ]
    .into_iter()
    .map(|(q, c, a)| Triplet {
        query: q.into(),
        context: format!("Sources:\n[1] Zorblats\n{c}\n\n"),
        answer: a.into(),
        origin: None,
    })
    .collect()
}

/// `triplets` as a JSONL file in `dir` (what a training record names and hashes).
pub(crate) fn write_triplets_file(
    dir: &std::path::Path,
    triplets: &[Triplet],
) -> std::path::PathBuf {
    let path = dir.join("t.jsonl");
    let lines: String = triplets
        .iter()
        .map(|t| serde_json::to_string(t).unwrap() + "\n")
        .collect();
    std::fs::write(&path, lines).unwrap();
    path
}

/// Before any step: gradients exist for every LoRA matrix B (A's are zero while B is zero) and
/// for no frozen weight.
#[tokio::test]
async fn gradients_reach_only_the_lora_matrices() {
    let g = generator().await;
    let (examples, _) = encode(&g, &fixture(), 512).await.expect("encode");
    let spec = LoraSpec {
        rank: 4,
        alpha: 8.0,
        targets: vec!["q_proj".into(), "down_proj".into()],
        dropout: 0.0,
    };
    let model = LlamaLora::load(&base_dir(), &Device::Cpu, Some(spec), 1).expect("model");
    let ex = &examples[0];
    let grads = model
        .loss(&ex.ids, &ex.positions, None)
        .expect("loss")
        .backward()
        .expect("backward");
    let loras = model.loras();
    assert_eq!(loras.len(), 2 * model.config.num_hidden_layers);
    for (path, lora) in &loras {
        let gb = grads.get(lora.b.as_tensor()).expect("B has a gradient");
        let norm = gb
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0, "{path}: zero gradient for B");
        assert!(
            grads.get(lora.a.as_tensor()).is_some(),
            "{path}: A not reached"
        );
    }
    for w in model.frozen_tensors() {
        assert!(grads.get(w).is_none(), "a frozen weight got a gradient");
    }
}

/// A short run (100 steps of 2 sequences on 2 threads, with dropout) overfits four examples; the adapter, registered and served by mistral.rs, generates
/// the trained answers, token for token what the trainer's forward pass generates.
#[tokio::test]
async fn trained_adapter_overfits_and_both_engines_serve_it_identically() {
    let g = generator().await;
    let triplets = fixture();
    let (examples, report) = encode(&g, &triplets, 512).await.expect("encode");
    assert_eq!(report.kept, 4);
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = LoraSpec {
        rank: 8,
        alpha: 16.0,
        targets: ["q_proj", "v_proj", "o_proj", "down_proj"]
            .map(String::from)
            .to_vec(),
        dropout: 0.05,
    };
    // Two sequences per step on two worker threads, with dropout: the parallel path.
    let options = TrainOptions {
        method: Method::Lora,
        rank: spec.rank,
        alpha: spec.alpha,
        targets: spec.targets.clone(),
        feedforward: Vec::new(),
        dropout: spec.dropout,
        lr: 2e-3,
        epochs: 50,
        batch: 2,
        max_len: 512,
        val_split: 0.0,
        seed: 3,
        warmup_steps: 5,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
        workers: 2,
        ..TrainOptions::default()
    };
    let trained = train_quietly(
        dir.path(),
        &triplets,
        (examples.clone(), report),
        options,
        Vec::new(),
    );
    assert_eq!(trained.record.steps, 100);
    let (first, last) = first_and_last_loss(&trained, 2);
    assert!(last < first * 0.1, "loss fell from {first} to only {last}");

    let base = BaseModelInfo::from_dir(&base_dir()).unwrap();
    register(g.registry(), "zorblat", &trained, &base, false).expect("register");
    assert!(
        g.registry().training_record("zorblat").unwrap().is_some(),
        "the training record is kept with the adapter"
    );
    let trainer_model = LlamaLora::load_with_adapter(&base_dir(), &Device::Cpu, &trained.dir, spec)
        .expect("trained weights load into the trainer");
    let end = g.end_of_turn_token().await.unwrap();
    let _lock = exclusive_generation().await;
    for t in &triplets {
        let messages = build_messages_from_context(&t.query, &t.context);
        let prompt = g.tokenize_chat(messages.clone()).await.unwrap();
        let (trainer_ids, _) = trainer_model.greedy(&prompt, 12, &[end]).unwrap();
        let greedy12 = Sampling {
            temperature: 0.0,
            top_p: 1.0,
            max_tokens: 12,
            no_repeat_ngram: 0,
            cite_sources: 0,
        };
        let served = g
            .complete(Some("zorblat"), messages, greedy12)
            .await
            .expect("mistral.rs serves the adapter");
        let mut served_ids = g.tokenize_text(&served.text).await.unwrap();
        served_ids.push(end);
        let trainer_text_ids: Vec<u32> = trainer_ids.clone();
        assert_eq!(
            served_ids, trainer_text_ids,
            "{:?}: mistral.rs said {:?}",
            t.query, served.text
        );
        assert_eq!(
            served.text.trim(),
            t.answer,
            "the adapter learned {:?}",
            t.query
        );
        // The native engine serves the trained adapter unmerged, its matrices kept in f32, f16
        // or 8 bits: the same answer.
        for dtype in ["f32", "f16", "q8"] {
            let kept = native_lora_generator(dtype)
                .await
                .complete(
                    Some("zorblat"),
                    build_messages_from_context(&t.query, &t.context),
                    greedy12,
                )
                .await
                .expect("the native engine serves the adapter");
            assert_eq!(kept.text, served.text, "{dtype}: {:?}", t.query);
        }
    }
}

/// (IA)³ gradients against central finite differences of the loss, at the element of largest
/// gradient of an output-scaled vector (layer 0's v_proj) and of an input-scaled one (the last
/// layer's down_proj); no frozen weight gets a gradient.
#[tokio::test]
async fn ia3_gradients_match_finite_differences() {
    let g = generator().await;
    let (examples, _) = encode(&g, &fixture(), 512).await.expect("encode");
    let spec = Ia3Spec {
        targets: vec!["v_proj".into(), "down_proj".into()],
        feedforward: vec!["down_proj".into()],
    };
    let model = LlamaLora::load_ia3(&base_dir(), &Device::Cpu, spec).expect("model");
    let ex = &examples[0];
    let grads = adapter_gradients(&model, ex);
    let ia3s = model.ia3s();
    assert_eq!(ia3s.len(), 2 * model.config.num_hidden_layers);
    let last = model.config.num_hidden_layers - 1;
    let picked = [
        "model.layers.0.self_attn.v_proj".to_string(),
        format!("model.layers.{last}.mlp.down_proj"),
    ];
    for (path, ia3) in ia3s.iter().filter(|(p, _)| picked.contains(p)) {
        let grad = grads
            .get(ia3.l.as_tensor())
            .expect("the vector has a gradient");
        matches_finite_differences(&ia3.l, grad, || loss_of(&model, ex), 1e-3, 0.0, path);
    }
}

/// The loss on `ex`, no dropout.
/// Train quietly on the CPU in `dir`: `examples` are `triplets` encoded (`report`).
pub(crate) fn train_quietly(
    dir: &std::path::Path,
    triplets: &[Triplet],
    (examples, report): (Vec<Example>, EncodeReport),
    options: TrainOptions,
    init_ids: Vec<u32>,
) -> Trained {
    run_training(TrainJob {
        base_dir: base_dir(),
        triplets_path: write_triplets_file(dir, triplets),
        examples,
        encode: report,
        options,
        init_ids,
        work_dir: dir.join("work"),
        device: Device::Cpu,
        stop: Arc::new(AtomicBool::new(false)),
        progress: &mut Quiet,
    })
    .expect("training runs")
}

/// Mean training loss of the first and of the last `n` steps.
pub(crate) fn first_and_last_loss(trained: &Trained, n: usize) -> (f32, f32) {
    let curve = &trained.record.curve;
    let mean = |points: &[domainrag::train::LossPoint]| {
        points.iter().map(|p| p.train_loss).sum::<f32>() / points.len() as f32
    };
    (mean(&curve[..n]), mean(&curve[curve.len() - n..]))
}

pub(crate) fn loss_of(model: &LlamaLora, ex: &Example) -> f32 {
    model
        .loss(&ex.ids, &ex.positions, None)
        .and_then(|l| l.to_scalar::<f32>())
        .expect("loss")
}

/// The loss's gradients on `ex`, checked to reach no frozen weight.
pub(crate) fn adapter_gradients(
    model: &LlamaLora,
    ex: &Example,
) -> candle_core::backprop::GradStore {
    let grads = model
        .loss(&ex.ids, &ex.positions, None)
        .expect("loss")
        .backward()
        .expect("backward");
    for w in model.frozen_tensors() {
        assert!(grads.get(w).is_none(), "a frozen weight got a gradient");
    }
    grads
}

/// The loss's gradient `grad` of `var` at its element of largest gradient (which must exceed
/// `min_grad`) against central finite differences (step 1e-2; within 5% plus `slack`); `var` is
/// left as it was.
pub(crate) fn matches_finite_differences(
    var: &candle_core::Var,
    grad: &candle_core::Tensor,
    loss: impl Fn() -> f32,
    min_grad: f32,
    slack: f32,
    label: &str,
) {
    let grad = grad.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (i, &analytic) = grad
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
        .expect("a non-empty variable");
    assert!(analytic.abs() > min_grad, "{label}: gradient {analytic}");
    let original = var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let shape = var.as_tensor().shape().clone();
    let at = |delta: f32| -> f32 {
        let mut values = original.clone();
        values[i] += delta;
        var.set(&candle_core::Tensor::from_vec(values, shape.clone(), &Device::Cpu).unwrap())
            .unwrap();
        loss()
    };
    let eps = 1e-2;
    let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
    at(0.0);
    assert!(
        (numeric - analytic).abs() <= 0.05 * analytic.abs() + slack,
        "{label}[{i}]: autograd {analytic}, finite differences {numeric}"
    );
}

/// `train --method ia3` in a few steps: the loss falls, the adapter is written in PEFT's (IA)³
/// format, registers, and the native engine serves it with the trainer's own greedy tokens.
#[tokio::test]
async fn a_trained_ia3_adapter_is_served_as_the_trainer_computes_it() {
    let g = generator().await;
    let triplets = fixture();
    let (examples, report) = encode(&g, &triplets, 512).await.expect("encode");
    let dir = tempfile::tempdir().expect("tempdir");
    let targets = Method::Ia3.default_targets();
    let options = TrainOptions {
        method: Method::Ia3,
        feedforward: Method::Ia3.default_feedforward(&targets),
        targets,
        lr: 3e-2,
        epochs: 6,
        batch: 1,
        max_len: 512,
        val_split: 0.0,
        seed: 3,
        warmup_steps: 2,
        workers: 1,
        ..TrainOptions::default()
    };
    let trained = train_quietly(
        dir.path(),
        &triplets,
        (examples, report),
        options,
        Vec::new(),
    );
    assert_eq!(trained.record.steps, 24);
    let (first, last) = first_and_last_loss(&trained, 4);
    assert!(last < first, "loss went from {first} to {last}");

    let base = BaseModelInfo::from_dir(&base_dir()).unwrap();
    let name = format!("zorblat-ia3-{}", std::process::id());
    let info = register(g.registry(), &name, &trained, &base, false).expect("register");
    assert_eq!(info.kind, AdapterKind::Ia3);
    assert_eq!(info.feedforward_modules, ["down_proj"]);
    let spec = Ia3Spec {
        targets: info.target_modules.clone(),
        feedforward: info.feedforward_modules.clone(),
    };
    let trainer = LlamaLora::load_ia3(&base_dir(), &Device::Cpu, spec).expect("model");
    let written =
        candle_core::safetensors::load(trained.dir.join("adapter_model.safetensors"), &Device::Cpu)
            .expect("the adapter's tensors");
    for (path, ia3) in trainer.ia3s() {
        let t = &written[&format!("base_model.model.{path}.ia3_l")];
        ia3.l.set(&t.flatten_all().unwrap()).unwrap();
    }
    let native = native_generator().await;
    let changed = served_like_the_trainer(&g, &native, &trainer, &name, &triplets).await;
    assert!(changed > 0, "the trained vectors changed no answer");
}

/// Each triplet's prompt answered greedily (12 tokens) by the native engine with adapter `name`
/// and by `trainer`'s own forward pass: the same tokens. Returns how many answers differ from
/// the base's.
pub(crate) async fn served_like_the_trainer(
    g: &Generator,
    native: &Generator,
    trainer: &LlamaLora,
    name: &str,
    triplets: &[Triplet],
) -> usize {
    let end = g.end_of_turn_token().await.unwrap();
    let mut changed = 0;
    for t in triplets {
        let messages = build_messages_from_context(&t.query, &t.context);
        let prompt = g.tokenize_chat(messages.clone()).await.unwrap();
        let (trainer_ids, _) = trainer.greedy(&prompt, 12, &[end]).unwrap();
        let served = native
            .complete(Some(name), messages.clone(), greedy(12))
            .await
            .expect("the native engine serves the adapter");
        let mut served_ids = g.tokenize_text(&served.text).await.unwrap();
        if trainer_ids.last() == Some(&end) {
            served_ids.push(end);
        }
        assert_eq!(
            served_ids, trainer_ids,
            "{name} {:?}: served {:?}",
            t.query, served.text
        );
        let base_answer = native.complete(None, messages, greedy(12)).await.unwrap();
        changed += usize::from(base_answer.text != served.text);
    }
    changed
}
