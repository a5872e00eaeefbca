//! What a valid PEFT adapter is, checked before anything is installed: its
//! `adapter_config.json` (kind, rank, alpha, target modules), the names and shapes of the tensors
//! in `adapter_model.safetensors` against the base model's, the file's header and layout, and,
//! once those hold, that every value is finite. Errors are the problem in words; the registry wraps
//! them with the adapter's name and file. The kinds that learn virtual tokens have their own
//! fields and tensor, checked by [`super::prompt`].

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use serde::Deserialize;

use super::{
    AdapterError, AdapterKind, BaseModelInfo, CONFIG_FILE, WEIGHTS_FILE, invalid, io, prompt,
};

/// How PEFT names the LoRA weights of a llama decoder layer.
pub(super) const TENSOR_PREFIX: &str = "base_model.model.model.layers.";
/// The safetensors format caps its JSON header at 100 MB; larger is a broken or hostile file.
pub(super) const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

/// The llama linear modules a LoRA may target, by the block that holds them.
pub(super) const ATTENTION_MODULES: [&str; 4] = ["q_proj", "k_proj", "v_proj", "o_proj"];
pub(super) const MLP_MODULES: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];
/// Every llama linear module a LoRA adapter can target, in a layer's forward order.
pub const LORA_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// What `add` needs from `adapter_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct PeftConfig {
    pub(super) kind: AdapterKind,
    /// LoRA's rank and `lora_alpha`; 0 for other kinds.
    pub(super) rank: usize,
    pub(super) alpha: f64,
    /// Without duplicates, in the config's order; empty for prompt and prefix tuning.
    pub(super) target_modules: Vec<String>,
    /// (IA)³: the targets whose input is scaled (the rest have their output scaled).
    pub(super) feedforward_modules: Vec<String>,
    /// Prompt and prefix tuning's `num_virtual_tokens`; 0 for other kinds.
    pub(super) virtual_tokens: usize,
    pub(super) base_model_name_or_path: Option<String>,
}

/// The block (`self_attn` or `mlp`) holding a llama linear module; `None` for any other name.
pub(super) fn module_block(module: &str) -> Option<(&'static str, &'static str)> {
    if let Some(m) = ATTENTION_MODULES.iter().find(|m| **m == module) {
        return Some((*m, "self_attn"));
    }
    MLP_MODULES
        .iter()
        .find(|m| **m == module)
        .map(|m| (*m, "mlp"))
}

/// Check a PEFT `adapter_config.json`; the error is the problem, for [`AdapterError::Invalid`].
pub(super) fn parse_peft_config(bytes: &[u8]) -> Result<PeftConfig, String> {
    use serde_json::Value;

    let value: Value = serde_json::from_slice(bytes).map_err(|e| format!("not valid JSON: {e}"))?;
    let Some(fields) = value.as_object() else {
        return Err("not a JSON object".to_string());
    };
    let kind = match fields.get("peft_type") {
        None | Some(Value::Null) => AdapterKind::Lora,
        Some(Value::String(t)) if t == "LORA" => AdapterKind::Lora,
        Some(Value::String(t)) if t == "IA3" => AdapterKind::Ia3,
        Some(Value::String(t)) if t == "PROMPT_TUNING" => AdapterKind::Prompt,
        Some(Value::String(t)) if t == "PREFIX_TUNING" => AdapterKind::Prefix,
        Some(other) => {
            return Err(format!(
                "peft_type is {other}; \"LORA\", \"IA3\", \"PROMPT_TUNING\" and \
                 \"PREFIX_TUNING\" adapters are supported"
            ));
        }
    };
    let base_model_name_or_path = fields
        .get("base_model_name_or_path")
        .and_then(Value::as_str)
        .map(str::to_string);
    let mut config = PeftConfig {
        kind,
        rank: 0,
        alpha: 0.0,
        target_modules: Vec::new(),
        feedforward_modules: Vec::new(),
        virtual_tokens: 0,
        base_model_name_or_path,
    };
    match kind {
        AdapterKind::Lora => {
            config.target_modules = target_modules(fields)?;
            (config.rank, config.alpha) = lora_scale(fields)?;
        }
        AdapterKind::Ia3 => {
            config.target_modules = target_modules(fields)?;
            config.feedforward_modules = ia3_feedforward(fields, &config.target_modules)?;
        }
        AdapterKind::Prompt | AdapterKind::Prefix => {
            config.virtual_tokens = prompt::virtual_tokens(fields)?;
        }
    }
    Ok(config)
}

/// A LoRA config's rank and alpha.
fn lora_scale(fields: &serde_json::Map<String, serde_json::Value>) -> Result<(usize, f64), String> {
    use serde_json::Value;

    // mistral.rs 0.8.1 scales every LoRA by lora_alpha / r; these variants would load and then
    // compute something else than what was trained.
    for flag in ["use_rslora", "use_dora"] {
        if fields.get(flag).and_then(Value::as_bool) == Some(true) {
            return Err(format!(
                "`{flag}` is true; mistral.rs supports plain LoRA only (scale lora_alpha / r)"
            ));
        }
    }
    let rank = match fields.get("r") {
        None => return Err("`r` (the LoRA rank) is missing".to_string()),
        Some(v) => v
            .as_u64()
            .filter(|&r| r > 0)
            .and_then(|r| usize::try_from(r).ok())
            .ok_or_else(|| format!("`r` must be a positive integer, got {v}"))?,
    };
    let alpha = match fields.get("lora_alpha") {
        None => return Err("`lora_alpha` is missing".to_string()),
        Some(v) => v
            .as_f64()
            .filter(|a| a.is_finite() && *a > 0.0)
            .ok_or_else(|| format!("`lora_alpha` must be a number > 0, got {v}"))?,
    };
    Ok((rank, alpha))
}

/// `target_modules`: llama linear modules, without duplicates, in the config's order.
fn target_modules(
    fields: &serde_json::Map<String, serde_json::Value>,
) -> Result<Vec<String>, String> {
    use serde_json::Value;

    let Some(listed) = fields
        .get("target_modules")
        .and_then(Value::as_array)
        .filter(|l| !l.is_empty())
    else {
        return Err("`target_modules` must be a non-empty list of module names".to_string());
    };
    let mut target_modules: Vec<String> = Vec::new();
    for item in listed {
        let Some(module) = item.as_str() else {
            return Err(format!(
                "`target_modules` entries must be strings, got {item}"
            ));
        };
        if module_block(module).is_none() {
            return Err(format!(
                "target module {module:?} is not supported; use llama linear modules: {}, {}",
                ATTENTION_MODULES.join(", "),
                MLP_MODULES.join(", ")
            ));
        }
        if !target_modules.iter().any(|t| t == module) {
            target_modules.push(module.to_string());
        }
    }
    Ok(target_modules)
}

/// An (IA)³ config's `feedforward_modules` (absent = none): each must be a target, as in peft.
fn ia3_feedforward(
    fields: &serde_json::Map<String, serde_json::Value>,
    target_modules: &[String],
) -> Result<Vec<String>, String> {
    use serde_json::Value;

    if fields.get("fan_in_fan_out").and_then(Value::as_bool) == Some(true) {
        return Err(
            "`fan_in_fan_out` is true; llama's linear layers are not stored transposed".into(),
        );
    }
    let listed = match fields.get("feedforward_modules") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(listed)) => listed,
        Some(other) => {
            return Err(format!(
                "`feedforward_modules` must be a list of module names, got {other}"
            ));
        }
    };
    let mut feedforward: Vec<String> = Vec::new();
    for item in listed {
        let module = item
            .as_str()
            .ok_or_else(|| format!("`feedforward_modules` entries must be strings, got {item}"))?;
        if !target_modules.iter().any(|t| t == module) {
            return Err(format!(
                "feedforward module {module:?} is not in target_modules {target_modules:?}"
            ));
        }
        if !feedforward.iter().any(|f| f == module) {
            feedforward.push(module.to_string());
        }
    }
    Ok(feedforward)
}

/// The JSON header of a safetensors file and the sizes to check its offsets against.
#[derive(Debug)]
pub(super) struct SafetensorsHeader {
    pub(super) file_len: u64,
    /// Bytes after the header: where `data_offsets` point into.
    pub(super) data_len: u64,
    pub(super) json: Vec<u8>,
}

/// Read the header only: adapters can be large ([`check_finite`] streams the data later).
pub(super) fn read_safetensors_header(
    name: &str,
    src: &Path,
    path: &Path,
) -> Result<SafetensorsHeader, AdapterError> {
    let refuse = |problem: String| invalid(name, WEIGHTS_FILE, problem);
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(refuse(format!("missing from {}", src.display())));
        }
        Err(e) => return Err(io(path, e)),
    };
    let meta = file.metadata().map_err(|e| io(path, e))?;
    if !meta.is_file() {
        return Err(refuse("is not a regular file".to_string()));
    }
    let file_len = meta.len();
    if file_len < 8 {
        return Err(refuse(format!(
            "{file_len} bytes is too short for a safetensors file"
        )));
    }
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes).map_err(|e| io(path, e))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > file_len - 8 || header_len > MAX_HEADER_BYTES {
        return Err(refuse(format!(
            "header length {header_len} does not fit the {file_len}-byte file; not a \
             safetensors file?"
        )));
    }
    let mut json = vec![0u8; usize::try_from(header_len).expect("bounded by MAX_HEADER_BYTES")];
    file.read_exact(&mut json).map_err(|e| io(path, e))?;
    Ok(SafetensorsHeader {
        file_len,
        data_len: file_len - 8 - header_len,
        json,
    })
}

/// The tensors must tile the data exactly, in offset order, as the safetensors loader requires:
/// tensors that share bytes are accepted by nothing that reads the file later (they were once
/// registered, and then every answer with the adapter failed and the server would not restart).
pub(super) fn check_layout(
    mut spans: Vec<(u64, u64, String)>,
    data_len: u64,
) -> Result<(), String> {
    spans.sort();
    let mut at = 0;
    for (begin, end, name) in &spans {
        if *begin < at {
            return Err(format!(
                "{name}: data_offsets [{begin}, {end}] overlap the tensor before it (which ends \
                 at {at}); each tensor needs bytes of its own"
            ));
        }
        if *begin > at {
            return Err(format!(
                "{name}: data_offsets start at {begin}, leaving bytes {at}..{begin} unused"
            ));
        }
        at = *end;
    }
    if at != data_len {
        return Err(format!(
            "the tensors end at byte {at} of {data_len} bytes of data: the file has trailing bytes"
        ));
    }
    Ok(())
}

/// Bytes read at a time by [`check_finite`] (a multiple of every element size).
const FINITE_CHUNK: usize = 1 << 20;

/// Every value of every tensor is finite. One NaN or infinity (a training run that diverged, a
/// broken conversion) would turn each answer with the adapter into noise, so it is refused at
/// the door with the tensor and element named. Streams the data once, in file order; the
/// header and layout were checked by [`check_weights`] (contiguous tensors from byte 0).
pub(super) fn check_finite(
    name: &str,
    path: &Path,
    header: &SafetensorsHeader,
) -> Result<(), AdapterError> {
    let entries: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&header.json)
        .map_err(|e| invalid(name, WEIGHTS_FILE, e.to_string()))?;
    let mut tensors = Vec::new();
    for (tensor, value) in entries {
        if tensor != "__metadata__" {
            let entry: TensorEntry = serde_json::from_value(value)
                .map_err(|e| invalid(name, WEIGHTS_FILE, format!("{tensor}: {e}")))?;
            tensors.push((
                entry.data_offsets[0],
                entry.data_offsets[1],
                entry.dtype,
                tensor,
            ));
        }
    }
    tensors.sort();
    let mut file = File::open(path).map_err(|e| io(path, e))?;
    file.seek(SeekFrom::Start(8 + header.json.len() as u64))
        .map_err(|e| io(path, e))?;
    let mut reader = BufReader::new(file);
    let mut buf = vec![0u8; FINITE_CHUNK];
    for (begin, end, dtype, tensor) in tensors {
        let width = if dtype == "F32" { 4 } else { 2 };
        let mut left = usize::try_from(end - begin).expect("checked against the file length");
        let mut element = 0;
        while left > 0 {
            let chunk = &mut buf[..left.min(FINITE_CHUNK)];
            reader.read_exact(chunk).map_err(|e| io(path, e))?;
            if let Some(at) = chunk
                .chunks_exact(width)
                .position(|b| non_finite(&dtype, b))
            {
                return Err(invalid(
                    name,
                    WEIGHTS_FILE,
                    format!(
                        "{tensor} holds a NaN or infinite value (element {}); an adapter with \
                         one answers with noise (did its training diverge?)",
                        element + at
                    ),
                ));
            }
            element += chunk.len() / width;
            left -= chunk.len();
        }
    }
    Ok(())
}

/// Whether one little-endian element of `dtype` (F32, F16 or BF16) is NaN or infinite: all its
/// exponent bits set.
fn non_finite(dtype: &str, bytes: &[u8]) -> bool {
    match (dtype, bytes) {
        ("F32", &[a, b, c, d]) => u32::from_le_bytes([a, b, c, d]) & 0x7F80_0000 == 0x7F80_0000,
        ("F16", &[a, b]) => u16::from_le_bytes([a, b]) & 0x7C00 == 0x7C00,
        ("BF16", &[a, b]) => u16::from_le_bytes([a, b]) & 0x7F80 == 0x7F80,
        _ => false,
    }
}

/// One tensor's entry in a safetensors header.
#[derive(Debug, Deserialize)]
pub(super) struct TensorEntry {
    pub(super) dtype: String,
    pub(super) shape: Vec<usize>,
    pub(super) data_offsets: [u64; 2],
}

/// A tensor's dtype (F32, F16 or BF16) and its `data_offsets`: inside the data and exactly the
/// bytes its shape needs. Returns the offsets.
pub(super) fn check_extent(
    name: &str,
    tensor: &TensorEntry,
    data_len: u64,
) -> Result<[u64; 2], String> {
    let element_bytes: u64 = match tensor.dtype.as_str() {
        "F32" => 4,
        "F16" | "BF16" => 2,
        other => {
            return Err(format!("{name} has dtype {other}; use F32, F16 or BF16"));
        }
    };
    let [begin, end] = tensor.data_offsets;
    if begin > end || end > data_len {
        return Err(format!(
            "{name}: data_offsets [{begin}, {end}] lie outside the {data_len} bytes of \
             tensor data"
        ));
    }
    let needed = tensor
        .shape
        .iter()
        .try_fold(element_bytes, |acc, &d| acc.checked_mul(d as u64));
    if needed != Some(end - begin) {
        return Err(format!(
            "{name}: data_offsets [{begin}, {end}] hold {} bytes, but {} {:?} needs {}",
            end - begin,
            tensor.dtype,
            tensor.shape,
            needed.map_or_else(|| "more than fits".to_string(), |n| n.to_string())
        ));
    }
    Ok([begin, end])
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TensorPart {
    /// LoRA's `lora_A` / `lora_B`.
    A,
    B,
    /// (IA)³'s scaling vector `ia3_l`.
    Ia3,
}

impl TensorPart {
    fn suffix(self) -> &'static str {
        match self {
            TensorPart::A => "lora_A.weight",
            TensorPart::B => "lora_B.weight",
            TensorPart::Ia3 => "ia3_l",
        }
    }
}

/// PEFT's name for one LoRA weight of a llama layer.
pub(super) fn tensor_name(layer: usize, module: &str, part: TensorPart) -> String {
    let block = if MLP_MODULES.contains(&module) {
        "mlp"
    } else {
        "self_attn"
    };
    format!("{TENSOR_PREFIX}{layer}.{block}.{module}.{}", part.suffix())
}

/// `(layer, module, part)` of a PEFT LoRA weight name; `None` for anything else.
pub(super) fn parse_tensor_name(name: &str) -> Option<(usize, &'static str, TensorPart)> {
    let rest = name.strip_prefix(TENSOR_PREFIX)?;
    let (layer, rest) = rest.split_once('.')?;
    // Only the canonical spelling: mistral.rs looks weights up as `layers.3`, never `layers.03`.
    let canonical = !layer.is_empty()
        && layer.bytes().all(|b| b.is_ascii_digit())
        && (layer == "0" || !layer.starts_with('0'));
    if !canonical {
        return None;
    }
    let layer: usize = layer.parse().ok()?;
    let (block, rest) = rest.split_once('.')?;
    let (module, rest) = rest.split_once('.')?;
    let (module, expected_block) = module_block(module)?;
    if block != expected_block {
        return None;
    }
    let part = match rest {
        "lora_A.weight" => TensorPart::A,
        "lora_B.weight" => TensorPart::B,
        "ia3_l" => TensorPart::Ia3,
        _ => return None,
    };
    Some((layer, module, part))
}

/// Check every tensor of the adapter against the config and the base model's shapes.
///
/// Prompt and prefix tuning hold one table of virtual tokens ([`prompt::check_weights`]).
///
/// mistral.rs 0.8.1 applies `target_modules` to every decoder layer and fails to load when one
/// lacks its weights (PEFT's `layers_to_transform` is ignored), and the native engine loads
/// them the same way, so every targeted module of every layer needs its weights: `lora_A` and
/// `lora_B` for LoRA, `ia3_l` for (IA)³.
pub(super) fn check_weights(
    header: &[u8],
    data_len: u64,
    config: &PeftConfig,
    base: &BaseModelInfo,
) -> Result<(), String> {
    let entries: BTreeMap<String, serde_json::Value> = serde_json::from_slice(header)
        .map_err(|e| format!("header is not a safetensors JSON header: {e}"))?;
    if config.kind.learns_virtual_tokens() {
        return prompt::check_weights(entries, data_len, config, base);
    }
    let mut found: BTreeMap<(usize, &'static str), Vec<TensorPart>> = BTreeMap::new();
    let mut spans: Vec<(u64, u64, String)> = Vec::new();
    for (name, value) in entries {
        if name == "__metadata__" {
            continue;
        }
        let t = check_tensor(&name, value, data_len, config, base)?;
        let [begin, end] = t.data_offsets;
        spans.push((begin, end, name));
        found.entry((t.layer, t.module)).or_default().push(t.part);
    }
    if found.is_empty() {
        return Err(format!("holds no {} weights", config.kind.label()));
    }
    for (&(layer, module), parts) in &found {
        for needed in config.kind.parts() {
            if !parts.contains(needed) {
                let have = parts.first().expect("an entry has a part");
                return Err(format!(
                    "{} has no matching {}",
                    tensor_name(layer, module, *have),
                    tensor_name(layer, module, *needed)
                ));
            }
        }
    }
    check_layout(spans, data_len)?;
    for layer in 0..base.num_hidden_layers {
        for module in &config.target_modules {
            if !found
                .keys()
                .any(|&(l, m)| l == layer && m == module.as_str())
            {
                return Err(format!(
                    "no {} weights for {module} of layer {layer}; target_modules apply to all \
                     {} layers of {}, so each needs {}",
                    config.kind.label(),
                    base.num_hidden_layers,
                    base.id,
                    config
                        .kind
                        .parts()
                        .iter()
                        .map(|p| p.suffix().trim_end_matches(".weight"))
                        .collect::<Vec<_>>()
                        .join(" and ")
                ));
            }
        }
    }
    Ok(())
}

/// A tensor that passed [`check_tensor`].
struct CheckedTensor {
    layer: usize,
    module: &'static str,
    part: TensorPart,
    data_offsets: [u64; 2],
}

/// One tensor's name, dtype, shape and offsets against the config and the base model.
fn check_tensor(
    name: &str,
    value: serde_json::Value,
    data_len: u64,
    config: &PeftConfig,
    base: &BaseModelInfo,
) -> Result<CheckedTensor, String> {
    let parsed = parse_tensor_name(name).filter(|(_, _, part)| config.kind.parts().contains(part));
    let Some((layer, module, part)) = parsed else {
        let parts = config
            .kind
            .parts()
            .iter()
            .map(|p| p.suffix())
            .collect::<Vec<_>>();
        return Err(format!(
            "unexpected tensor {name}: only {} weights named \
             {TENSOR_PREFIX}<layer>.<self_attn|mlp>.<module>.<{}> are supported",
            config.kind.label(),
            parts.join("|")
        ));
    };
    if layer >= base.num_hidden_layers {
        return Err(format!(
            "{name}: layer {layer} is out of range; {} has {} layers (0-{})",
            base.id,
            base.num_hidden_layers,
            base.num_hidden_layers.saturating_sub(1)
        ));
    }
    if !config.target_modules.iter().any(|t| t == module) {
        return Err(format!(
            "{name}: {module} is not in target_modules {:?} of {CONFIG_FILE}",
            config.target_modules
        ));
    }
    let tensor: TensorEntry =
        serde_json::from_value(value).map_err(|e| format!("{name}: bad header entry: {e}"))?;
    let (in_features, out_features) = base
        .module_dims(module)
        .expect("parse_tensor_name returns llama modules only");
    let expected = match part {
        TensorPart::A => vec![config.rank, in_features],
        TensorPart::B => vec![out_features, config.rank],
        // peft's layout: a row over the inputs it scales, a column over the outputs.
        TensorPart::Ia3 if config.feedforward_modules.iter().any(|f| f == module) => {
            vec![1, in_features]
        }
        TensorPart::Ia3 => vec![out_features, 1],
    };
    if tensor.shape != expected {
        return Err(format!(
            "{name} has shape {:?}, expected {expected:?} for {module} of {}",
            tensor.shape, base.id
        ));
    }
    let [begin, end] = check_extent(name, &tensor, data_len)?;
    Ok(CheckedTensor {
        layer,
        module,
        part,
        data_offsets: [begin, end],
    })
}

impl AdapterKind {
    /// The tensors each targeted module has (none: prompt and prefix tuning target no module).
    fn parts(self) -> &'static [TensorPart] {
        match self {
            AdapterKind::Lora => &[TensorPart::A, TensorPart::B],
            AdapterKind::Ia3 => &[TensorPart::Ia3],
            AdapterKind::Prompt | AdapterKind::Prefix => &[],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::non_finite;

    #[test]
    fn non_finite_reads_each_dtype_exponent() {
        for (value, bad) in [(1.5f32, false), (-0.0, false), (f32::MAX, false)]
            .into_iter()
            .chain([
                (f32::NAN, true),
                (f32::INFINITY, true),
                (f32::NEG_INFINITY, true),
            ])
        {
            assert_eq!(non_finite("F32", &value.to_le_bytes()), bad, "{value}");
        }
        // F16: 0x3C00 = 1.0, 0x7BFF = 65504 (largest finite), 0x7C00 = inf, 0xFE00 = NaN.
        for (bits, bad) in [
            (0x3C00u16, false),
            (0x7BFF, false),
            (0x7C00, true),
            (0xFE00, true),
        ] {
            assert_eq!(non_finite("F16", &bits.to_le_bytes()), bad, "F16 {bits:#x}");
        }
        // BF16: 0x3F80 = 1.0, 0x7F7F = largest finite, 0x7F80 = inf, 0xFFC0 = NaN.
        for (bits, bad) in [
            (0x3F80u16, false),
            (0x7F7F, false),
            (0x7F80, true),
            (0xFFC0, true),
        ] {
            assert_eq!(
                non_finite("BF16", &bits.to_le_bytes()),
                bad,
                "BF16 {bits:#x}"
            );
        }
    }
}
