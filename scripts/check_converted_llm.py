#!/usr/bin/env python3
"""Check the Hugging Face directory that scripts/convert_gguf_to_hf.py made from a GGUF.

  (a) tokenizer: tokenizer.json's encodings of a few strings (ASCII, digits,
      whitespace, unicode, the chat template's special tokens) equal those of a
      small independent byte-level BPE written here from the GGUF's vocab and
      merges, and decode back to the input;
  (b) tensors: a few tensors re-dequantized from the GGUF by code written here
      (Q4_1, Q8_0, F32 block formats), with attn_q / attn_k un-permuted by an
      explicit index formula, equal model.safetensors;
  (c) forward pass: a plain numpy llama (RMSNorm, rotary embeddings in HF's
      rotate_half convention, GQA attention, SwiGLU MLP), float64, over
      model.safetensors, greedy-decodes PROMPTS formatted with the chat template
      (jinja2). The continuations must be English that answers the prompt;
  (d) the same forward in llama.cpp's convention (raw GGUF attn_q / attn_k,
      rotary on adjacent pairs) gives the same logits: the un-permutation is
      exactly the inverse of llama.cpp's permutation;
  (e) controls: skipping the un-permutation, or applying it in the wrong
      direction, gives other tokens and a much higher perplexity on English text.

Writes MODEL_DIR/reference_generations.json (prompts, token ids, greedy token ids,
per-step top-1/top-2 logit margins, tokenizer checks) for the Rust tests, which
can assert that mistral.rs produces the same greedy tokens. Exits non-zero with a
message on any failure.

Usage: check_converted_llm.py MODEL_DIR --gguf FILE [--output FILE] [--max-new-tokens N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import gguf
import jinja2
import jinja2.sandbox
import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

# (user message, words of which the greedy continuation must contain one, case-insensitive)
PROMPTS = [
    ("What is the capital of France?", ["Paris"]),
    ("What color is the sky?", ["blue"]),
    ("What language is spoken in Spain?", ["Spanish"]),
]
MAX_NEW_TOKENS = 12

# Text whose perplexity the controls must make clearly worse.
ENGLISH_TEXT = (
    "The capital of France is Paris. It is known for the Eiffel Tower, the Louvre museum "
    "and its cafes. Water boils at one hundred degrees Celsius at sea level, and the sky "
    "looks blue because air scatters blue light more than red light."
)
# The correct model's perplexity must be below this, and each control's at least
# CONTROL_PPL_FACTOR times higher.
MAX_PPL = 30.0
CONTROL_PPL_FACTOR = 2.0
# Same logits from the two rotary conventions (float64; only summation order differs).
MAX_CONVENTION_LOGIT_DIFF = 1e-6

TOKENIZER_STRINGS = [
    "The capital of France is Paris.",
    "In 2024, SmolLM2 scored 42.5% on 3 tests (v1.2.3)!",
    "  leading spaces,\ttabs\nand\n\nnewlines  \n",
    "Café, naïve résumé — 東京 and Zürich 🚀 ✓",
    "don't we'll it's I'm they've you're he'd snake_case __init__",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>x<file_sep>",
]


class CheckFailed(Exception):
    pass


def require(cond: bool, msg: str) -> None:
    if not cond:
        raise CheckFailed(msg)


# --- (a) tokenizer ----------------------------------------------------------------
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable latin-1 bytes stand for themselves, the rest map to U+0100..."""
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(0x100 + extra)
            extra += 1
    return table


# GPT-2's pre-tokenizer regex with \p{L} as [^\W\d_] and \p{N} as \d (exact for the test strings,
# which have no combining marks and no non-ASCII digits); [^\s\p{L}\p{N}] includes "_".
GPT2_SPLIT = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")


class ReferenceBpe:
    """An independent byte-level BPE encoder straight from the GGUF vocab and merges."""

    def __init__(self, tokens: list[str], merges: list[str], specials: list[str], digits_individual: bool):
        self.vocab = {t: i for i, t in enumerate(tokens)}
        self.ranks = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
        self.specials = sorted(specials, key=len, reverse=True)
        self.digits_individual = digits_individual
        self.b2u = byte_to_unicode()

    def _bpe(self, word: str) -> list[str]:
        parts = list(word)
        while len(parts) > 1:
            best = min(range(len(parts) - 1), key=lambda i: self.ranks.get((parts[i], parts[i + 1]), math.inf))
            pair = (parts[best], parts[best + 1])
            if pair not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def _pieces(self, text: str) -> list[str]:
        chunks = [text]
        if self.digits_individual:
            chunks = [c for c in re.split(r"(\d)", text) if c]
        return [p for c in chunks for p in GPT2_SPLIT.findall(c)]

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        pos = 0
        while pos < len(text):
            # next special token at or after pos (longest first at the same position)
            hits = [(text.find(s, pos), -len(s), s) for s in self.specials]
            hits = [h for h in hits if h[0] >= 0]
            nxt = min(hits) if hits else None
            end = nxt[0] if nxt else len(text)
            for piece in self._pieces(text[pos:end]):
                mapped = "".join(self.b2u[b] for b in piece.encode("utf-8"))
                ids.extend(self.vocab[t] for t in self._bpe(mapped))
            if nxt is None:
                break
            ids.append(self.vocab[nxt[2]])
            pos = end + len(nxt[2])
        return ids


def check_tokenizer(tok: Tokenizer, g: gguf.GGUFReader, tokenizer_config: dict) -> list[dict]:
    tokens = g.fields["tokenizer.ggml.tokens"].contents()
    types = g.fields["tokenizer.ggml.token_type"].contents()
    merges = g.fields["tokenizer.ggml.merges"].contents()
    specials = [t for t, ty in zip(tokens, types) if ty in (2, 3, 4)]
    pre = g.fields["tokenizer.ggml.pre"].contents() if "tokenizer.ggml.pre" in g.fields else "gpt2"
    ref = ReferenceBpe(tokens, merges, specials, digits_individual=(pre == "smollm"))

    require(tok.get_vocab_size(with_added_tokens=True) == len(tokens),
            f"tokenizer.json has {tok.get_vocab_size(with_added_tokens=True)} tokens, the GGUF {len(tokens)}")
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        content = tokenizer_config.get(name)
        if content is not None:
            require(tok.encode(content, add_special_tokens=True).ids == [tokens.index(content)],
                    f"{name} {content!r} does not encode to its single id")

    results = []
    for text in TOKENIZER_STRINGS:
        enc = tok.encode(text, add_special_tokens=True)
        expected = ref.encode(text)
        decoded = tok.decode(enc.ids, skip_special_tokens=False)
        require(enc.ids == expected,
                f"tokenizer.json encodes {text!r} as {enc.ids}, the reference BPE as {expected}")
        require(decoded == text, f"decode(encode({text!r})) = {decoded!r}")
        results.append({"text": text, "ids": enc.ids, "tokens": enc.tokens, "decoded": decoded, "round_trip": True})
        print(f"  tokenizer ok: {text!r} -> {len(enc.ids)} ids {enc.ids[:12]}{' ...' if len(enc.ids) > 12 else ''}")
    return results


# --- (b) tensors ---------------------------------------------------------------------
def dequant_reference(t) -> np.ndarray:
    """Dequantize one GGUF tensor with the block formats written out here (not gguf.quants)."""
    name = t.tensor_type.name
    raw = np.asarray(t.data)
    if name == "F32":
        return raw.astype(np.float32)
    rows = raw.shape[0]
    if name == "Q8_0":  # 34-byte blocks: float16 scale d, 32 x int8 q;  x = d * q
        blocks = raw.reshape(rows, -1, 34)
        d = blocks[:, :, 0:2].copy().view(np.float16).astype(np.float32)
        q = blocks[:, :, 2:].copy().view(np.int8).astype(np.float32)
        return (d * q).reshape(rows, -1)
    if name == "Q4_1":  # 20-byte blocks: float16 d, float16 m, 16 bytes of nibbles;  x = d * q + m
        blocks = raw.reshape(rows, -1, 20)
        d = blocks[:, :, 0:2].copy().view(np.float16).astype(np.float32)
        m = blocks[:, :, 2:4].copy().view(np.float16).astype(np.float32)
        qs = blocks[:, :, 4:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).astype(np.float32)  # low nibbles: 0..15, high: 16..31
        return (d * q + m).reshape(rows, -1)
    raise CheckFailed(f"no reference dequantizer for {name}")


def unpermute_by_index(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF row h*d + half*d/2 + i  <-  GGUF row h*d + 2*i + half (llama.cpp stores rotary pairs adjacent)."""
    rows = w.shape[0]
    d = rows // n_head
    out = np.empty_like(w)
    for h in range(n_head):
        for half in range(2):
            for i in range(d // 2):
                out[h * d + half * (d // 2) + i] = w[h * d + 2 * i + half]
    return out


def check_tensors(g: gguf.GGUFReader, weights: dict[str, np.ndarray], cfg: dict) -> list[str]:
    tensors = {t.name: t for t in g.tensors}
    last = cfg["num_hidden_layers"] - 1
    cases = [
        ("token_embd.weight", "model.embed_tokens.weight", None),
        ("output_norm.weight", "model.norm.weight", None),
        ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight", cfg["num_attention_heads"]),
        ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight", cfg["num_key_value_heads"]),
        ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight", None),
        (f"blk.{last}.attn_q.weight", f"model.layers.{last}.self_attn.q_proj.weight", cfg["num_attention_heads"]),
        (f"blk.{last}.ffn_down.weight", f"model.layers.{last}.mlp.down_proj.weight", None),
        (f"blk.{last}.attn_norm.weight", f"model.layers.{last}.input_layernorm.weight", None),
    ]
    lines = []
    for gname, hname, heads in cases:
        t = tensors[gname]
        ref = dequant_reference(t)
        if heads is not None:
            ref = unpermute_by_index(ref, heads)
        got = weights[hname]
        require(ref.shape == got.shape, f"{hname}: shape {got.shape}, reference {ref.shape}")
        diff = float(np.max(np.abs(ref - got)))
        require(diff <= 1e-6 * max(1.0, float(np.max(np.abs(ref)))), f"{hname} differs from {gname} by {diff}")
        lines.append(f"{gname} ({t.tensor_type.name}) == {hname}: max |diff| {diff:.1e}")
        print(f"  tensor ok: {lines[-1]}")
    return lines


# --- (c) forward pass ----------------------------------------------------------------
def rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


class Llama:
    """Plain numpy llama decoder. rope="half": HF (rotate_half, pairs i and i + d/2);
    rope="interleaved": llama.cpp's LLAMA_ROPE_TYPE_NORM (pairs 2i and 2i + 1)."""

    def __init__(self, cfg: dict, weights: dict[str, np.ndarray], rope: str = "half", dtype=np.float64):
        self.cfg = cfg
        self.dtype = dtype
        self.rope = rope
        self.n_head = cfg["num_attention_heads"]
        self.n_kv = cfg["num_key_value_heads"]
        self.hd = cfg.get("head_dim") or cfg["hidden_size"] // self.n_head
        self.eps = cfg["rms_norm_eps"]
        self.w = {k: v.astype(dtype, copy=False) for k, v in weights.items()}
        self.lm_head = self.w["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else self.w["lm_head.weight"]
        self.inv_freq = 1.0 / (cfg["rope_theta"] ** (np.arange(0, self.hd, 2, dtype=np.float64) / self.hd))

    def rms_norm(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        var = np.mean(x * x, axis=-1, keepdims=True)
        return x / np.sqrt(var + self.eps) * w

    def apply_rope(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        freqs = positions[:, None].astype(np.float64) * self.inv_freq[None, :]  # (T, d/2)
        cos, sin = np.cos(freqs).astype(self.dtype), np.sin(freqs).astype(self.dtype)
        if self.rope == "half":
            cos2 = np.concatenate([cos, cos], axis=-1)[:, None, :]
            sin2 = np.concatenate([sin, sin], axis=-1)[:, None, :]
            return x * cos2 + rotate_half(x) * sin2
        even, odd = x[..., 0::2], x[..., 1::2]
        c, s = cos[:, None, :], sin[:, None, :]
        out = np.empty_like(x)
        out[..., 0::2] = even * c - odd * s
        out[..., 1::2] = even * s + odd * c
        return out

    def forward(self, ids: list[int], cache: list | None) -> tuple[np.ndarray, list]:
        """Logits (T, vocab) for the new tokens ids; cache holds each layer's (K, V) so far."""
        w = self.w
        past = 0 if not cache else cache[0][0].shape[0]
        positions = np.arange(past, past + len(ids))
        x = w["model.embed_tokens.weight"][np.asarray(ids)]
        new_cache = []
        group = self.n_head // self.n_kv
        T = len(ids)
        for layer in range(self.cfg["num_hidden_layers"]):
            p = f"model.layers.{layer}."
            h = self.rms_norm(x, w[p + "input_layernorm.weight"])
            q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(T, self.n_head, self.hd)
            k = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(T, self.n_kv, self.hd)
            v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(T, self.n_kv, self.hd)
            q, k = self.apply_rope(q, positions), self.apply_rope(k, positions)
            if cache:
                k = np.concatenate([cache[layer][0], k], axis=0)
                v = np.concatenate([cache[layer][1], v], axis=0)
            new_cache.append((k, v))
            S = k.shape[0]
            qg = q.reshape(T, self.n_kv, group, self.hd)  # query head n uses kv head n // group
            scores = np.einsum("tkgd,skd->kgts", qg, k) / math.sqrt(self.hd)
            causal = np.arange(S)[None, :] > positions[:, None]  # (T, S): key after query
            scores = np.where(causal[None, None], -np.inf, scores)
            scores = scores - scores.max(axis=-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(axis=-1, keepdims=True)
            attn = np.einsum("kgts,skd->tkgd", probs, v).reshape(T, self.n_head * self.hd)
            x = x + attn @ w[p + "self_attn.o_proj.weight"].T
            h = self.rms_norm(x, w[p + "post_attention_layernorm.weight"])
            gate = h @ w[p + "mlp.gate_proj.weight"].T
            up = h @ w[p + "mlp.up_proj.weight"].T
            act = gate / (1.0 + np.exp(-gate)) * up  # SiLU(gate) * up
            x = x + act @ w[p + "mlp.down_proj.weight"].T
        x = self.rms_norm(x, w["model.norm.weight"])
        return x @ self.lm_head.T, new_cache

    def greedy(self, prompt_ids: list[int], max_new: int, stop_ids: set[int]) -> dict:
        logits, cache = self.forward(prompt_ids, None)
        out, margins, step_logits = [], [], []
        for _ in range(max_new):
            last = logits[-1]
            step_logits.append(last)
            top2 = np.argsort(last)[-2:]
            nxt = int(top2[1])
            margins.append(float(last[top2[1]] - last[top2[0]]))
            out.append(nxt)
            if nxt in stop_ids or len(out) == max_new:
                break
            logits, cache = self.forward([nxt], cache)
        return {"ids": out, "margins": margins, "step_logits": np.stack(step_logits)}

    def perplexity(self, ids: list[int]) -> float:
        logits, _ = self.forward(ids, None)
        logits = logits[:-1].astype(np.float64)
        logz = np.log(np.exp(logits - logits.max(axis=-1, keepdims=True)).sum(axis=-1)) + logits.max(axis=-1)
        nll = logz - logits[np.arange(len(ids) - 1), ids[1:]]
        return float(np.exp(nll.mean()))


def render_chat(template: str, user: str) -> str:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=[{"role": "user", "content": user}], add_generation_prompt=True)


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert step (HF -> GGUF layout): reshape(h, 2, d/2, in).swapaxes(1, 2)."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--gguf", type=Path, required=True, help="the GGUF the directory was converted from")
    ap.add_argument("--output", type=Path, help="default MODEL_DIR/reference_generations.json")
    ap.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    args = ap.parse_args(argv)
    out_path = args.output or args.model_dir / "reference_generations.json"
    t0 = time.monotonic()
    try:
        report = run_checks(args.model_dir, args.gguf, args.max_new_tokens)
    except CheckFailed as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    tmp = out_path.with_name(out_path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, ensure_ascii=False, indent=2)
        f.write("\n")
    os.replace(tmp, out_path)
    print(f"all checks passed ({time.monotonic() - t0:.1f}s); wrote {out_path}")
    return 0


def run_checks(model_dir: Path, gguf_path: Path, max_new: int) -> dict:
    cfg = json.loads((model_dir / "config.json").read_text())
    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    gen_cfg = json.loads((model_dir / "generation_config.json").read_text())
    conversion = json.loads((model_dir / "conversion.json").read_text())
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    weights = load_file(str(model_dir / "model.safetensors"))
    g = gguf.GGUFReader(gguf_path)
    require(cfg["model_type"] == "llama", f"model_type {cfg['model_type']!r}")
    require(all(w.dtype == np.float32 for w in weights.values()), "model.safetensors is not all float32")
    require(("lm_head.weight" in weights) != cfg["tie_word_embeddings"], "lm_head.weight vs tie_word_embeddings mismatch")

    print("(a) tokenizer.json vs an independent byte-level BPE over the GGUF vocab + merges")
    tokenizer_checks = check_tokenizer(tok, g, tok_cfg)

    print("(b) tensors re-dequantized from the GGUF (Q4_1/Q8_0/F32 written out here), q/k un-permuted by index")
    tensor_checks = check_tensors(g, weights, cfg)

    eos = gen_cfg.get("eos_token_id")
    stop_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    template = tok_cfg.get("chat_template")
    require(bool(template), "tokenizer_config.json has no chat_template")

    print(f"(c) numpy llama forward (float64, HF rotate_half) over model.safetensors, greedy {max_new} tokens")
    model = Llama(cfg, weights, rope="half")
    generations = []
    for user, keywords in PROMPTS:
        prompt = render_chat(template, user)
        prompt_ids = tok.encode(prompt, add_special_tokens=True).ids
        t = time.monotonic()
        res = model.greedy(prompt_ids, max_new, stop_ids)
        text = tok.decode(res["ids"], skip_special_tokens=True)
        print(f"  {user!r} -> {text!r}  ({len(prompt_ids)} prompt ids, {time.monotonic() - t:.1f}s)")
        print(f"      greedy ids {res['ids']}, min top-1/top-2 logit margin {min(res['margins']):.3f}")
        require(any(k.lower() in text.lower() for k in keywords),
                f"greedy continuation of {user!r} is {text!r}; expected it to mention one of {keywords}")
        generations.append({
            "messages": [{"role": "user", "content": user}],
            "prompt": prompt,
            "prompt_ids": prompt_ids,
            "greedy_ids": res["ids"],
            "greedy_text": text,
            "greedy_text_with_special": tok.decode(res["ids"], skip_special_tokens=False),
            "expected_any_of": keywords,
            "top1_top2_logit_margins": [round(m, 4) for m in res["margins"]],
            "_res": res,
        })

    # KV cache vs recomputing the whole sequence at once (first prompt): position len(prompt) - 1 + i
    # predicts greedy token i in both.
    first = generations[0]
    full_logits, _ = model.forward(first["prompt_ids"] + first["greedy_ids"][:-1], None)
    cache_diff = float(np.max(np.abs(full_logits[len(first["prompt_ids"]) - 1:] - first["_res"]["step_logits"])))
    require(cache_diff < 1e-8, f"KV-cached decoding disagrees with full recomputation by {cache_diff}")
    print("  KV-cached decoding == full recomputation (first prompt)")

    english_ids = tok.encode(ENGLISH_TEXT, add_special_tokens=False).ids
    ppl = model.perplexity(english_ids)
    print(f"  perplexity of a {len(english_ids)}-token English passage: {ppl:.2f}")
    require(ppl < MAX_PPL, f"perplexity {ppl:.2f} on plain English is too high (limit {MAX_PPL})")

    # float32 (what mistral.rs would use on CPU) vs the float64 reference.
    model32 = Llama(cfg, weights, rope="half", dtype=np.float32)
    f32_same = []
    for gen in generations:
        r32 = model32.greedy(gen["prompt_ids"], max_new, stop_ids)
        f32_same.append(r32["ids"] == gen["greedy_ids"])
    print(f"  float32 forward gives the same greedy ids: {f32_same}")
    del model32

    print("(d) llama.cpp convention: raw GGUF attn_q/attn_k with rotary on adjacent pairs")
    tensors = {t.name: t for t in g.tensors}
    raw_qk = {}
    for layer in range(cfg["num_hidden_layers"]):
        for gname, hname in (("attn_q", "q_proj"), ("attn_k", "k_proj")):
            t = tensors[f"blk.{layer}.{gname}.weight"]
            raw_qk[f"model.layers.{layer}.self_attn.{hname}.weight"] = np.asarray(
                gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
    ggml_model = Llama(cfg, {**weights, **raw_qk}, rope="interleaved")
    convention_diffs = []
    for gen in generations:
        ids = gen["prompt_ids"] + gen["greedy_ids"]
        a, _ = model.forward(ids, None)
        b, _ = ggml_model.forward(ids, None)
        convention_diffs.append(float(np.max(np.abs(a - b))))
        require(np.array_equal(np.argmax(a, axis=-1), np.argmax(b, axis=-1)), "conventions disagree on argmax")
    print(f"  max |logit difference| vs HF convention over prompt + generation: {max(convention_diffs):.2e}")
    require(max(convention_diffs) < MAX_CONVENTION_LOGIT_DIFF,
            f"llama.cpp-convention logits differ by {max(convention_diffs)}: the q/k un-permutation is wrong")
    del ggml_model

    print("(e) controls (HF convention, deliberately wrong q/k layouts)")
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    wrong_direction = {}
    for name, w in raw_qk.items():
        heads = n_head if name.endswith("q_proj.weight") else n_kv
        wrong_direction[name] = llama_cpp_permute(w, heads)  # "un-permuting" with the forward permutation
    controls = {}
    for label, qk in (("no un-permute (raw GGUF q/k)", raw_qk), ("wrong direction (llama.cpp's permute again)", wrong_direction)):
        bad = Llama(cfg, {**weights, **qk}, rope="half")
        bad_ppl = bad.perplexity(english_ids)
        outs = []
        for gen in generations:
            r = bad.greedy(gen["prompt_ids"], max_new, stop_ids)
            outs.append({"greedy_ids": r["ids"], "greedy_text": tok.decode(r["ids"], skip_special_tokens=False)})
        differs = [o["greedy_ids"] != gen["greedy_ids"] for o, gen in zip(outs, generations)]
        print(f"  {label}: perplexity {bad_ppl:.2f} (correct {ppl:.2f}); greedy differs {differs}")
        for o in outs:
            print(f"      -> {o['greedy_text']!r} {o['greedy_ids']}")
        require(bad_ppl > CONTROL_PPL_FACTOR * ppl,
                f"control '{label}' perplexity {bad_ppl:.2f} is not clearly worse than {ppl:.2f}")
        require(any(differs), f"control '{label}' produced the same greedy tokens for every prompt")
        controls[label] = {"perplexity": round(bad_ppl, 3), "generations": outs}
        del bad

    for gen in generations:
        gen.pop("_res")
    return {
        "about": "Greedy reference generations of the converted model, from scripts/check_converted_llm.py "
                 "(numpy float64 llama forward over model.safetensors). Prompts are the chat template "
                 "rendered with add_generation_prompt=true and encoded with tokenizer.json, no special "
                 "tokens added. Steps with a small top1_top2_logit_margin may legitimately flip in "
                 "lower precision.",
        "source_gguf": conversion["source"]["file"],
        "source_gguf_sha256": conversion["source"]["sha256"],
        "model_safetensors_sha256": conversion["files"]["model.safetensors"],
        "decoding": {
            "strategy": "greedy",
            "max_new_tokens": max_new,
            "stop_token_ids": sorted(stop_ids),
            "compute_dtype": "float64",
            "float32_same_greedy_ids": f32_same,
        },
        "generations": generations,
        "tokenizer_checks": tokenizer_checks,
        "checks": {
            "tensors": tensor_checks,
            "kv_cache_matches_full_recompute": True,
            "english_perplexity": {"text": ENGLISH_TEXT, "token_count": len(english_ids), "perplexity": round(ppl, 3)},
            "llama_cpp_convention_max_logit_diff": max(convention_diffs),
            "controls": controls,
        },
    }


if __name__ == "__main__":
    sys.exit(main())
