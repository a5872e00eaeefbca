//! What a valid PEFT adapter of the kinds that learn virtual tokens is: prompt tuning
//! (`PROMPT_TUNING`, an input embedding per virtual token) and prefix tuning (`PREFIX_TUNING`,
//! a key and a value per virtual token in every layer). Their config names how many virtual
//! tokens there are; `adapter_model.safetensors` holds one table, `prompt_embeddings`:
//!
//! - prompt tuning: `(num_virtual_tokens, hidden_size)`;
//! - prefix tuning: `(num_virtual_tokens, num_layers * 2 * kv_heads * head_dim)`, row `t` holding
//!   for each layer its key, then its value, each `(kv_heads, head_dim)` (peft sizes the prefix
//!   by the key/value heads of grouped-query attention). A prefix trained with peft's
//!   reparameterisation MLP is saved as the MLP's output, so it has the same table.

use std::collections::BTreeMap;

use super::peft::{PeftConfig, TensorEntry, check_extent, check_layout};
use super::{AdapterKind, BaseModelInfo};

/// The one tensor of a prompt-learning adapter.
pub(super) const TABLE: &str = "prompt_embeddings";
/// More virtual tokens than this is a broken config (peft's examples use 8-100): each takes
/// room in every request's KV cache.
pub const MAX_VIRTUAL_TOKENS: usize = 1024;

/// `num_virtual_tokens` of a prompt- or prefix-tuning config, after checking the fields that
/// would change what the table means.
pub(super) fn virtual_tokens(
    fields: &serde_json::Map<String, serde_json::Value>,
) -> Result<usize, String> {
    use serde_json::Value;

    if let Some(task) = fields.get("task_type").and_then(Value::as_str)
        && task != "CAUSAL_LM"
    {
        return Err(format!(
            "task_type is {task:?}; only CAUSAL_LM adapters generate text"
        ));
    }
    match fields.get("num_transformer_submodules") {
        None | Some(Value::Null) => {}
        Some(v) if v.as_u64() == Some(1) => {}
        Some(other) => {
            return Err(format!(
                "num_transformer_submodules is {other}; a decoder-only model has 1"
            ));
        }
    }
    let n = match fields.get("num_virtual_tokens") {
        None | Some(Value::Null) => return Err("`num_virtual_tokens` is missing".to_string()),
        Some(v) => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .filter(|n| (1..=MAX_VIRTUAL_TOKENS).contains(n))
            .ok_or_else(|| {
                format!("`num_virtual_tokens` must be an integer from 1 to {MAX_VIRTUAL_TOKENS}, got {v}")
            })?,
    };
    Ok(n)
}

/// The width of a row of the table for `kind` on `base`.
pub(super) fn row_width(kind: AdapterKind, base: &BaseModelInfo) -> usize {
    match kind {
        AdapterKind::Prefix => {
            base.num_hidden_layers * 2 * base.num_key_value_heads * base.head_dim
        }
        _ => base.hidden_size,
    }
}

/// The header's tensors: exactly [`TABLE`], `(virtual_tokens, row_width)`, tiling the data.
pub(super) fn check_weights(
    entries: BTreeMap<String, serde_json::Value>,
    data_len: u64,
    config: &PeftConfig,
    base: &BaseModelInfo,
) -> Result<(), String> {
    let mut table = None;
    for (name, value) in entries {
        if name == "__metadata__" {
            continue;
        }
        if name != TABLE {
            return Err(format!(
                "unexpected tensor {name}: a {} adapter holds one tensor, {TABLE}",
                config.kind.label()
            ));
        }
        let entry: TensorEntry =
            serde_json::from_value(value).map_err(|e| format!("{name}: bad header entry: {e}"))?;
        table = Some(entry);
    }
    let Some(entry) = table else {
        return Err(format!("holds no {TABLE} tensor"));
    };
    let width = row_width(config.kind, base);
    let expected = vec![config.virtual_tokens, width];
    if entry.shape != expected {
        let per_row = match config.kind {
            AdapterKind::Prefix => format!(
                "{} layers x key and value x {} key/value heads x head_dim {}",
                base.num_hidden_layers, base.num_key_value_heads, base.head_dim
            ),
            _ => format!("hidden_size {}", base.hidden_size),
        };
        return Err(format!(
            "{TABLE} has shape {:?}, expected {expected:?} ({} virtual tokens x {per_row} of {})",
            entry.shape, config.virtual_tokens, base.id
        ));
    }
    let [begin, end] = check_extent(TABLE, &entry, data_len)?;
    check_layout(vec![(begin, end, TABLE.to_string())], data_len)
}

#[cfg(test)]
mod tests {
    use super::super::fixture::{tiny_base, write_safetensors};
    use super::super::peft::parse_peft_config;
    use super::super::{
        AdapterError, AdapterRegistry, CONFIG_FILE, WEIGHTS_FILE, write_test_prompt_adapter,
    };
    use super::*;

    /// A registry and an adapter of `kind` (3 virtual tokens) on the tiny base.
    fn setup(kind: AdapterKind) -> (tempfile::TempDir, AdapterRegistry, std::path::PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src-adapter");
        write_test_prompt_adapter(&src, &tiny_base(), kind, 3, |i| i as f32).unwrap();
        let registry = AdapterRegistry::new(&tmp.path().join("data"));
        (tmp, registry, src)
    }

    fn refusal(registry: &AdapterRegistry, src: &std::path::Path) -> String {
        let err = registry.add("p", src, &tiny_base()).expect_err("refused");
        assert!(matches!(err, AdapterError::Invalid { .. }), "{err:?}");
        assert!(registry.list().unwrap().is_empty());
        err.to_string()
    }

    #[test]
    fn prompt_and_prefix_adapters_register_with_their_virtual_tokens() {
        for (kind, width) in [
            (AdapterKind::Prompt, 16),
            (AdapterKind::Prefix, 2 * 2 * 2 * 6),
        ] {
            assert_eq!(row_width(kind, &tiny_base()), width);
            let (_tmp, registry, src) = setup(kind);
            let info = registry.add("p", &src, &tiny_base()).unwrap();
            assert_eq!((info.kind, info.virtual_tokens), (kind, 3));
            assert!(info.target_modules.is_empty());
            assert_eq!(info.targets(), "-");
            assert_eq!(info.method(), format!("{}, 3 virtual tokens", kind.label()));
            assert_eq!(registry.get("p").unwrap(), info);
        }
    }

    #[test]
    fn the_table_must_fit_the_base_and_the_config() {
        let (_tmp, registry, src) = setup(AdapterKind::Prefix);
        let write = |tensors: &[(String, Vec<usize>)]| {
            write_safetensors(&src.join(WEIGHTS_FILE), tensors, &|_| 0.0).unwrap()
        };
        // A prompt-tuning table (hidden_size wide) under a prefix-tuning config.
        write(&[(TABLE.to_string(), vec![3, 16])]);
        let err = refusal(&registry, &src);
        assert!(err.contains("expected [3, 48]"), "{err}");
        assert!(err.contains("2 key/value heads x head_dim 6"), "{err}");
        // More rows than num_virtual_tokens.
        write(&[(TABLE.to_string(), vec![4, 48])]);
        assert!(refusal(&registry, &src).contains("expected [3, 48]"));
        // Another tensor beside the table, or none.
        write(&[
            (TABLE.to_string(), vec![3, 48]),
            ("prefix_encoder.weight".to_string(), vec![1]),
        ]);
        assert!(refusal(&registry, &src).contains("unexpected tensor prefix_encoder.weight"));
        write(&[]);
        assert!(refusal(&registry, &src).contains("no prompt_embeddings"));
    }

    #[test]
    fn config_rules() {
        let parse = |json: &str| parse_peft_config(json.as_bytes());
        let ok = parse(r#"{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 20, "task_type": "CAUSAL_LM", "num_transformer_submodules": 1}"#).unwrap();
        assert_eq!((ok.kind, ok.virtual_tokens), (AdapterKind::Prompt, 20));
        let ok = parse(
            r#"{"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 1, "prefix_projection": true}"#,
        )
        .unwrap();
        assert_eq!((ok.kind, ok.virtual_tokens), (AdapterKind::Prefix, 1));
        for (json, needle) in [
            (
                r#"{"peft_type": "PROMPT_TUNING"}"#,
                "`num_virtual_tokens` is missing",
            ),
            (
                r#"{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 0}"#,
                "from 1 to 1024",
            ),
            (
                r#"{"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4096}"#,
                "from 1 to 1024",
            ),
            (
                r#"{"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 2.5}"#,
                "from 1 to 1024",
            ),
            (
                r#"{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 8, "num_transformer_submodules": 2}"#,
                "decoder-only",
            ),
            (
                r#"{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 8, "task_type": "SEQ_CLS"}"#,
                "CAUSAL_LM",
            ),
        ] {
            let err = parse(json).expect_err(json);
            assert!(err.contains(needle), "{json}: {err}");
        }
    }

    #[test]
    fn a_config_without_its_table_file_is_refused_and_nothing_is_kept() {
        let (_tmp, registry, src) = setup(AdapterKind::Prompt);
        std::fs::write(src.join(CONFIG_FILE), br#"{"peft_type": "PROMPT_TUNING"}"#).unwrap();
        assert!(refusal(&registry, &src).contains("num_virtual_tokens"));
    }
}
