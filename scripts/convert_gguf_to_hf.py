#!/usr/bin/env python3
"""Convert a llama-architecture GGUF into a Hugging Face model directory.

mistral.rs applies LoRA adapters only to models loaded from a Hugging Face
directory (safetensors), not to GGUF files, so scripts/fetch-models.sh turns the
GGUF it ships into one with this script. OUT_DIR receives:

  config.json              LlamaForCausalLM config from the GGUF metadata
  model.safetensors        every tensor dequantized to float32, HF names
  tokenizer.json           HF tokenizers byte-level BPE built from the GGUF vocab
  tokenizer_config.json    chat template, special tokens, model_max_length
  special_tokens_map.json
  generation_config.json   bos / eos (/ pad) token ids
  conversion.json          source sha256, converter version + sha256, package
                           versions, and the sha256 of each file above

The weights are exactly the GGUF's (dequantization is lossless in float32): the
conversion undoes no quantization error and adds none.

Layout notes:
  * GGUF stores a linear layer as ne = [in, out], which the reader returns as a
    numpy array of shape (out, in): the same as torch.nn.Linear's weight.
  * llama.cpp's converter permutes the rows of attn_q / attn_k so that its
    rotary embedding can rotate adjacent pairs (x[2i], x[2i+1]). Per head of
    size d, HF row  half*d/2 + i  is stored at GGUF row  2*i + half  (i < d/2,
    half in {0, 1}), i.e. GGUF = HF.reshape(h, 2, d/2, in).swapaxes(1, 2).
    HF's rotate_half pairs x[i] with x[i + d/2], so we invert that permutation:
    HF = GGUF.reshape(h, d/2, 2, in).swapaxes(1, 2), with h = n_head for q and
    n_head_kv for k. scripts/check_converted_llm.py verifies the direction.

Only what this project needs is supported: architecture "llama", tokenizer model
"gpt2" (byte-level BPE) with pre-tokenizer "gpt2" or "smollm", no rope scaling,
no biases, no MoE. Anything else stops with an error instead of converting wrongly.

Usage: convert_gguf_to_hf.py IN.gguf OUT_DIR
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np

# Bump when the output for the same GGUF changes (fetch-models.sh also reconverts
# whenever this file's sha256 changes).
CONVERTER_VERSION = "1"

try:
    import gguf
    from gguf.quants import dequantize
    from safetensors.numpy import save_file
except ImportError as e:  # pragma: no cover - message for a hand-run without the venv
    sys.exit(f"convert_gguf_to_hf: {e}; run it with the venv that scripts/fetch-models.sh builds")

# GGUF token types (llama.cpp's llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Per-layer GGUF tensor name -> HF name (after "model.layers.N.").
LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

OUTPUT_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


class ConversionError(Exception):
    pass


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def package_version(name: str) -> str | None:
    try:
        return importlib_metadata.version(name)
    except importlib_metadata.PackageNotFoundError:
        return None


def f32_value(x: float) -> float:
    """A GGUF float32 as the shortest decimal that round-trips in float32 (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(x)))


class Gguf:
    def __init__(self, path: Path):
        self.reader = gguf.GGUFReader(path)
        self.fields = self.reader.fields
        self.tensors = {t.name: t for t in self.reader.tensors}

    def has(self, key: str) -> bool:
        return key in self.fields

    def get(self, key: str, default=None):
        field = self.fields.get(key)
        if field is None:
            return default
        return field.contents()

    def need(self, key: str):
        if key not in self.fields:
            raise ConversionError(f"GGUF metadata has no {key}")
        return self.fields[key].contents()

    def tensor_f32(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        out = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        expected = tuple(int(n) for n in reversed(t.shape.tolist()))
        if out.shape != expected:
            raise ConversionError(f"{name}: dequantized shape {out.shape}, expected {expected} from the GGUF header")
        return np.ascontiguousarray(out)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of attn_q / attn_k (see the module doc)."""
    out_features, in_features = w.shape
    if out_features % (2 * n_head):
        raise ConversionError(f"q/k rows {out_features} not divisible by 2 * {n_head} heads")
    half = out_features // n_head // 2
    return np.ascontiguousarray(w.reshape(n_head, half, 2, in_features).swapaxes(1, 2).reshape(out_features, in_features))


# --- config -------------------------------------------------------------------
def build_config(g: Gguf) -> dict:
    arch = g.need("general.architecture")
    if arch != "llama":
        raise ConversionError(f"general.architecture is {arch!r}; only 'llama' is supported")

    def p(key):
        return f"{arch}.{key}"

    for unsupported in ("rope.scaling.type", "rope.scaling.factor", "expert_count"):
        if g.has(p(unsupported)):
            value = g.get(p(unsupported))
            if unsupported == "rope.scaling.type" and value == "none":
                continue
            if unsupported == "rope.scaling.factor" and float(value) in (0.0, 1.0):
                continue
            if unsupported == "expert_count" and int(value) == 0:
                continue
            raise ConversionError(f"{p(unsupported)} = {value!r} is not supported by this converter")

    hidden = int(g.need(p("embedding_length")))
    n_head = int(g.need(p("attention.head_count")))
    n_kv = int(g.get(p("attention.head_count_kv"), n_head))
    head_dim = hidden // n_head
    if hidden % n_head:
        raise ConversionError(f"embedding_length {hidden} not divisible by head_count {n_head}")
    if int(g.get(p("attention.key_length"), head_dim)) != head_dim or int(g.get(p("attention.value_length"), head_dim)) != head_dim:
        raise ConversionError("attention key/value length != embedding_length / head_count is not supported")
    rope_dim = int(g.get(p("rope.dimension_count"), head_dim))
    if rope_dim != head_dim:
        raise ConversionError(f"partial rotary (rope.dimension_count {rope_dim} != head_dim {head_dim}) is not supported")

    tokens = g.need("tokenizer.ggml.tokens")
    vocab_size = int(g.get(p("vocab_size"), len(tokens)))
    if vocab_size != len(tokens):
        raise ConversionError(f"{p('vocab_size')} {vocab_size} != {len(tokens)} tokens")

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(g.need(p("feed_forward_length"))),
        "num_hidden_layers": int(g.need(p("block_count"))),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": f32_value(g.need(p("attention.layer_norm_rms_epsilon"))),
        "rope_theta": f32_value(g.get(p("rope.freq_base"), 10000.0)),
        "rope_scaling": None,
        "max_position_embeddings": int(g.need(p("context_length"))),
        "vocab_size": vocab_size,
        "tie_word_embeddings": "output.weight" not in g.tensors,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    for key, hf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"), ("padding_token_id", "pad_token_id")):
        value = g.get(f"tokenizer.ggml.{key}")
        if value is not None:
            config[hf_key] = int(value)
    return config


# --- weights ------------------------------------------------------------------
def build_tensors(g: Gguf, config: dict) -> dict[str, np.ndarray]:
    n_layers = config["num_hidden_layers"]
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    hidden, head_dim = config["hidden_size"], config["head_dim"]
    out: dict[str, np.ndarray] = {}
    seen = set()
    for name in GLOBAL_TENSORS:
        if name in g.tensors:
            out[GLOBAL_TENSORS[name]] = g.tensor_f32(name)
            seen.add(name)
    for required in ("token_embd.weight", "output_norm.weight"):
        if required not in seen:
            raise ConversionError(f"GGUF has no {required}")
    for layer in range(n_layers):
        for suffix, hf_suffix in LAYER_TENSORS.items():
            name = f"blk.{layer}.{suffix}"
            if name not in g.tensors:
                raise ConversionError(f"GGUF has no {name}")
            w = g.tensor_f32(name)
            if suffix == "attn_q.weight":
                w = unpermute_qk(w, n_head)
            elif suffix == "attn_k.weight":
                w = unpermute_qk(w, n_kv)
            out[f"model.layers.{layer}.{hf_suffix}"] = w
            seen.add(name)
    unknown = sorted(set(g.tensors) - seen)
    if unknown:
        raise ConversionError(f"GGUF tensors this converter does not know (refusing to drop them): {unknown[:8]}")

    expected_shapes = {
        "model.embed_tokens.weight": (config["vocab_size"], hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (config["vocab_size"], hidden),
    }
    inter = config["intermediate_size"]
    for layer in range(n_layers):
        pre = f"model.layers.{layer}."
        expected_shapes.update({
            pre + "input_layernorm.weight": (hidden,),
            pre + "post_attention_layernorm.weight": (hidden,),
            pre + "self_attn.q_proj.weight": (n_head * head_dim, hidden),
            pre + "self_attn.k_proj.weight": (n_kv * head_dim, hidden),
            pre + "self_attn.v_proj.weight": (n_kv * head_dim, hidden),
            pre + "self_attn.o_proj.weight": (hidden, n_head * head_dim),
            pre + "mlp.gate_proj.weight": (inter, hidden),
            pre + "mlp.up_proj.weight": (inter, hidden),
            pre + "mlp.down_proj.weight": (hidden, inter),
        })
    for name, w in out.items():
        if w.shape != expected_shapes[name]:
            raise ConversionError(f"{name}: shape {w.shape}, config implies {expected_shapes[name]}")
        if not np.all(np.isfinite(w)):
            raise ConversionError(f"{name}: non-finite values after dequantization")
    return out


# --- tokenizer ----------------------------------------------------------------
def pre_tokenizer_for(pre: str | None) -> dict:
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if pre in (None, "gpt2"):
        return byte_level
    if pre == "smollm":
        # llama.cpp's "smollm" pre-tokenizer splits every digit on its own (\p{N})
        # before the GPT-2 regex: HF's Digits(individual_digits) then ByteLevel.
        return {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    raise ConversionError(f"tokenizer.ggml.pre = {pre!r} is not supported (only 'gpt2' and 'smollm')")


def build_tokenizer(g: Gguf) -> tuple[dict, dict]:
    model = g.need("tokenizer.ggml.model")
    if model != "gpt2":
        raise ConversionError(f"tokenizer.ggml.model is {model!r}; only 'gpt2' (byte-level BPE) is supported")
    tokens: list[str] = g.need("tokenizer.ggml.tokens")
    types = g.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    merges: list[str] = g.need("tokenizer.ggml.merges")
    if len(types) != len(tokens):
        raise ConversionError("tokenizer.ggml.token_type and tokenizer.ggml.tokens differ in length")

    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        if tok in vocab:
            raise ConversionError(f"token {tok!r} appears twice (ids {vocab[tok]} and {i})")
        vocab[tok] = i
    merge_pairs = []
    for m in merges:
        parts = m.split(" ")
        if len(parts) != 2:
            raise ConversionError(f"merge {m!r} is not two space-separated tokens")
        merge_pairs.append(parts)

    added = []
    for i, (tok, ty) in enumerate(zip(tokens, types)):
        ty = int(ty)
        if ty in (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED):
            added.append({
                "id": i,
                "content": tok,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                # llama.cpp's converter writes HF special tokens as CONTROL and
                # non-special added tokens as USER_DEFINED; map them back the same way.
                "special": ty != TOKEN_USER_DEFINED,
            })

    specials = {}
    for key in ("bos", "eos", "unknown", "padding"):
        tid = g.get(f"tokenizer.ggml.{key}_token_id")
        if tid is not None:
            tid = int(tid)
            if not 0 <= tid < len(tokens):
                raise ConversionError(f"tokenizer.ggml.{key}_token_id {tid} is out of range")
            specials[key] = (tid, tokens[tid])

    add_bos = bool(g.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(g.get("tokenizer.ggml.add_eos_token", False))
    if g.get("tokenizer.ggml.add_space_prefix", False):
        raise ConversionError("tokenizer.ggml.add_space_prefix = true is not supported for byte-level BPE")
    if add_bos or add_eos:
        special_tokens = {}

        def special(key: str, type_id: int) -> list[dict]:
            if key not in specials:
                raise ConversionError(f"add_{key}_token is set but there is no {key}_token_id")
            tid, content = specials[key]
            special_tokens[content] = {"id": content, "ids": [tid], "tokens": [content]}
            return [{"SpecialToken": {"id": content, "type_id": type_id}}]

        def around(seq: str, type_id: int) -> list[dict]:
            return ((special("bos", type_id) if add_bos else [])
                    + [{"Sequence": {"id": seq, "type_id": type_id}}]
                    + (special("eos", type_id) if add_eos else []))

        single = around("A", 0)
        pair = around("A", 0) + around("B", 1)
        post_processor = {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special_tokens}
    else:
        # No tokens added around the text (SmolLM2: add_bos_token = false); ByteLevel
        # only maps offsets back to the original string.
        post_processor = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True}

    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer_for(g.get("tokenizer.ggml.pre")),
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merge_pairs,
        },
    }
    info = {"added": added, "specials": specials, "add_bos": add_bos, "add_eos": add_eos}
    return tokenizer, info


def build_tokenizer_files(g: Gguf, config: dict, info: dict) -> tuple[dict, dict, dict]:
    specials = info["specials"]
    names = {"bos": "bos_token", "eos": "eos_token", "padding": "pad_token", "unknown": "unk_token"}
    named = {names[k]: content for k, (_, content) in specials.items()}
    named_contents = set(named.values())
    additional = [t["content"] for t in info["added"] if t["special"] and t["content"] not in named_contents]

    tokenizer_config = {
        "add_bos_token": info["add_bos"],
        "add_eos_token": info["add_eos"],
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
            for t in info["added"]
        },
        "additional_special_tokens": additional,
        **{k: named[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if k in named},
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    chat_template = g.get("tokenizer.chat_template")
    if chat_template is not None:
        tokenizer_config["chat_template"] = chat_template

    special_tokens_map = {k: named[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if k in named}
    if additional:
        special_tokens_map["additional_special_tokens"] = additional

    generation_config = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in config:
            generation_config[key] = config[key]
    # End-of-turn tokens llama.cpp also stops on, when the GGUF names them.
    extra_eos = []
    for key in ("eot_token_id", "eom_token_id"):
        tid = g.get(f"tokenizer.ggml.{key}")
        if tid is not None and int(tid) != config.get("eos_token_id"):
            extra_eos.append(int(tid))
    if extra_eos and "eos_token_id" in generation_config:
        generation_config["eos_token_id"] = [generation_config["eos_token_id"], *extra_eos]
    return tokenizer_config, special_tokens_map, generation_config


# --- output -------------------------------------------------------------------
def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def convert(gguf_path: Path, out_dir: Path) -> dict:
    source_sha = sha256_file(gguf_path)
    g = Gguf(gguf_path)
    config = build_config(g)
    tokenizer, info = build_tokenizer(g)
    tokenizer_config, special_tokens_map, generation_config = build_tokenizer_files(g, config, info)
    tensors = build_tensors(g, config)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "conversion.json").unlink(missing_ok=True)  # present only once everything is written
    write_json(out_dir / "config.json", config)
    write_json(out_dir / "tokenizer.json", tokenizer)
    write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    write_json(out_dir / "special_tokens_map.json", special_tokens_map)
    write_json(out_dir / "generation_config.json", generation_config)
    st_tmp = out_dir / "model.safetensors.tmp"
    save_file(tensors, str(st_tmp), metadata={"format": "pt"})
    os.chmod(st_tmp, 0o644)  # safetensors creates it owner-only, unlike the other files
    os.replace(st_tmp, out_dir / "model.safetensors")

    type_counts: dict[str, int] = {}
    for t in g.reader.tensors:
        type_counts[t.tensor_type.name] = type_counts.get(t.tensor_type.name, 0) + 1
    record = {
        "converter": "scripts/convert_gguf_to_hf.py",
        "converter_version": CONVERTER_VERSION,
        "converter_sha256": sha256_file(Path(__file__).resolve()),
        "source": {
            "file": gguf_path.name,
            "sha256": source_sha,
            "size": gguf_path.stat().st_size,
            "general.name": g.get("general.name"),
            "tensor_types": dict(sorted(type_counts.items())),
        },
        "packages": {name: package_version(name) for name in ("gguf", "numpy", "safetensors")},
        "parameters": int(sum(w.size for w in tensors.values())),
        "tie_word_embeddings": config["tie_word_embeddings"],
        "files": {name: sha256_file(out_dir / name) for name in OUTPUT_FILES},
    }
    write_json(out_dir / "conversion.json", record)
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf", type=Path, help="input .gguf (llama architecture)")
    ap.add_argument("out_dir", type=Path, help="output directory (created; files in it are overwritten)")
    args = ap.parse_args(argv)
    try:
        record = convert(args.gguf, args.out_dir)
    except (ConversionError, OSError, NotImplementedError) as e:
        print(f"convert_gguf_to_hf: error: {e}", file=sys.stderr)
        return 1
    print(f"converted {args.gguf.name} ({record['source']['sha256'][:12]}, {record['source']['tensor_types']}) "
          f"-> {args.out_dir}: {record['parameters']:,} float32 parameters, "
          f"tie_word_embeddings={record['tie_word_embeddings']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
