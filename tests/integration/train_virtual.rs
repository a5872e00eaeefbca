//! Prompt and prefix tuning in the trainer: gradients of the virtual tokens' table against finite
//! differences, and a short run whose adapter is written in peft's format, registers, and is
//! served by the native engine with the trainer's own greedy tokens. Also layer checkpointing's
//! gradients against plain backpropagation's, for every method.

use candle_core::{DType, Device, Tensor};
use domainrag::adapters::{AdapterKind, BaseModelInfo};
use domainrag::generate::Generator;
use domainrag::train::model::{Ia3Spec, LlamaLora, LoraSpec, VirtualSpec};
use domainrag::train::{Method, TrainOptions, encode, init_ids, register, sequence_gradients};

use crate::helpers::{generator, native_generator};
use crate::train::{
    adapter_gradients, base_dir, first_and_last_loss, fixture, loss_of, matches_finite_differences,
    served_like_the_trainer, train_quietly,
};

/// Each kind, and its method with the reparameterisation MLP's width (0 = none).
const KINDS: [(AdapterKind, Method, usize); 3] = [
    (AdapterKind::Prompt, Method::Prompt, 0),
    (AdapterKind::Prefix, Method::Prefix, 0),
    (AdapterKind::Prefix, Method::Prefix, 32),
];

async fn spec(g: &Generator, kind: AdapterKind, tokens: usize, projection: usize) -> VirtualSpec {
    let init_text = "Answer briefly from the sources.".to_string();
    VirtualSpec {
        kind,
        tokens,
        init_ids: g.tokenize_text(&init_text).await.unwrap(),
        init_text,
        projection,
        seed: 5,
    }
}

/// The loss's gradient at the table element of largest gradient against central finite
/// differences; no frozen weight gets a gradient.
#[tokio::test]
async fn virtual_token_gradients_match_finite_differences() {
    let g = generator().await;
    let (examples, _) = encode(&g, &fixture(), 512).await.expect("encode");
    let ex = &examples[0];
    for (kind, _, projection) in KINDS {
        let spec = spec(&g, kind, 4, projection).await;
        let model = LlamaLora::load_virtual(&base_dir(), &Device::Cpu, spec).expect("model");
        let table = model
            .virtual_tokens()
            .expect("virtual tokens")
            .table
            .clone();
        let grads = adapter_gradients(&model, ex);
        let grad = grads
            .get(table.as_tensor())
            .expect("the table has a gradient");
        let label = format!("{kind:?} projection {projection}");
        matches_finite_differences(&table, grad, || loss_of(&model, ex), 1e-4, 1e-3, &label);
        if let Some(mlp) = &model.virtual_tokens().unwrap().projection {
            let grad = grads
                .get(mlp.w2.as_tensor())
                .expect("the MLP has a gradient");
            let label = format!("{label} w2");
            matches_finite_differences(&mlp.w2, grad, || loss_of(&model, ex), 1e-4, 1e-3, &label);
        }
    }
}

/// `train --method prompt|prefix` in a few steps: the loss falls, the adapter is written in
/// peft's format, registers with its virtual tokens, and the native engine serves it with the
/// greedy tokens of the trainer's forward pass.
#[tokio::test]
async fn trained_virtual_tokens_are_served_as_the_trainer_computes_them() {
    let g = generator().await;
    let native = native_generator().await;
    let triplets = fixture();
    let base = BaseModelInfo::from_dir(&base_dir()).unwrap();
    for (kind, method, projection) in KINDS {
        let (examples, report) = encode(&g, &triplets, 512).await.expect("encode");
        let dir = tempfile::tempdir().expect("tempdir");
        let options = TrainOptions {
            virtual_tokens: 8,
            prefix_projection: projection,
            lr: if projection > 0 { 3e-3 } else { 1e-2 },
            epochs: 6,
            batch: 1,
            max_len: 512,
            val_split: 0.0,
            seed: 3,
            warmup_steps: 2,
            workers: 1,
            ..TrainOptions::for_method(method)
        };
        let ids = init_ids(&g, &options).await.unwrap();
        let trained = train_quietly(
            dir.path(),
            &triplets,
            (examples, report),
            options.clone(),
            ids,
        );
        let (first, last) = first_and_last_loss(&trained, 4);
        assert!(
            last < first,
            "{kind:?} projection {projection}: loss went from {first} to {last}"
        );
        let width = table_width(kind, &base);
        let kv = base.num_key_value_heads * base.head_dim;
        let params = if projection > 0 {
            8 * kv + (kv + 1) * projection + (projection + 1) * width
        } else {
            8 * width
        };
        assert_eq!(trained.record.trainable_params, params);

        let name = format!(
            "zorblat-{}-{projection}-{}",
            kind.label().replace(' ', "-"),
            std::process::id()
        );
        let info = register(g.registry(), &name, &trained, &base, false).expect("register");
        assert_eq!((info.kind, info.virtual_tokens), (kind, 8));
        // The trainer's forward pass over the written table (an MLP's output, with one).
        let mut trainer_spec = spec(&g, kind, 8, 0).await;
        trainer_spec.init_ids = init_ids(&g, &options).await.unwrap();
        let trainer = LlamaLora::load_virtual(&base_dir(), &Device::Cpu, trainer_spec).unwrap();
        let written = candle_core::safetensors::load(
            trained.dir.join("adapter_model.safetensors"),
            &Device::Cpu,
        )
        .expect("the adapter's tensors");
        let table = &trainer.virtual_tokens().unwrap().table;
        table.set(&written["prompt_embeddings"]).unwrap();
        let changed = served_like_the_trainer(&g, &native, &trainer, &name, &triplets).await;
        assert!(
            changed > 0,
            "{kind:?} projection {projection}: the trained tokens changed no answer"
        );
    }
}

fn table_width(kind: AdapterKind, base: &BaseModelInfo) -> usize {
    match kind {
        AdapterKind::Prefix => {
            base.num_hidden_layers * 2 * base.num_key_value_heads * base.head_dim
        }
        _ => base.hidden_size,
    }
}

/// Layer checkpointing (`--gradient-checkpointing true`) gives each method's variables the
/// gradients plain backpropagation gives, LoRA's dropout masks included (its B matrices set off
/// zero first, so that A and the layers' inputs get gradients through them).
#[tokio::test]
async fn checkpointed_gradients_are_the_plain_ones() {
    let g = generator().await;
    let (examples, _) = encode(&g, &fixture(), 512).await.expect("encode");
    let ex = &examples[1];
    let base = base_dir();
    for case in 0..2 + KINDS.len() {
        let (label, model) = match case {
            0 => {
                let spec = LoraSpec {
                    rank: 4,
                    alpha: 8.0,
                    targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
                    dropout: 0.1,
                };
                let model = LlamaLora::load(&base, &Device::Cpu, Some(spec), 3).expect("lora");
                for (_, lora) in model.loras() {
                    let n = lora.b.elem_count() as u32;
                    let values = Tensor::arange(0u32, n, &Device::Cpu)
                        .and_then(|t| t.to_dtype(DType::F32))
                        .and_then(|t| t.affine(0.37, 0.0))
                        .and_then(|t| t.sin())
                        .and_then(|t| t.affine(0.01, 0.0))
                        .and_then(|t| t.reshape(lora.b.shape()))
                        .expect("values");
                    lora.b.set(&values).expect("set B");
                }
                ("LoRA".to_string(), model)
            }
            1 => {
                let spec = Ia3Spec {
                    targets: vec!["k_proj".into(), "v_proj".into(), "down_proj".into()],
                    feedforward: vec!["down_proj".into()],
                };
                let model = LlamaLora::load_ia3(&base, &Device::Cpu, spec).expect("ia3");
                ("(IA)3".to_string(), model)
            }
            _ => {
                let (kind, _, projection) = KINDS[case - 2];
                let spec = spec(&g, kind, 4, projection).await;
                let model = LlamaLora::load_virtual(&base, &Device::Cpu, spec).expect("model");
                (format!("{kind:?} projection {projection}"), model)
            }
        };
        let (plain_loss, plain) = sequence_gradients(&model, ex, 11, false).expect("plain");
        let (loss, checkpointed) = sequence_gradients(&model, ex, 11, true).expect("checkpointed");
        assert!(
            (loss - plain_loss).abs() <= 1e-5 * plain_loss.abs(),
            "{label}: loss {loss} vs {plain_loss}"
        );
        assert_eq!(plain.len(), model.vars().len());
        for (i, (a, b)) in plain.iter().zip(&checkpointed).enumerate() {
            let a = a.as_ref().expect("a plain gradient");
            let b = b.as_ref().expect("a checkpointed gradient");
            let largest = |t: &Tensor| {
                t.abs()
                    .and_then(|t| t.max_all())
                    .and_then(|t| t.to_scalar::<f32>())
                    .expect("max")
            };
            let scale = largest(a);
            let diff = largest(&(a - b).expect("difference"));
            assert!(scale > 0.0, "{label} variable {i}: no gradient");
            assert!(
                diff <= 1e-4 * scale,
                "{label} variable {i}: largest difference {diff}, largest gradient {scale}"
            );
        }
    }
}
