#!/usr/bin/env python3
"""Check our all-MiniLM-L6-v2 ONNX export against independent references.

  (a) a plain numpy BERT forward pass written straight from model.safetensors
      (float64, each sentence alone, unpadded): the reference;
  (b) our model.onnx in onnxruntime, the sentences batched and padded as
      tokenizer.json pads them (so the attention mask is exercised):
      max |a - b| over the pooled, normalised embeddings must be < 1e-4;
  (c) the third-party int8 export (all-MiniLM-L6-v2-int8/model.onnx), made by
      someone else with other tools: cosine with (a) must be > 0.97 per sentence;
  (d) semantic sanity: a paraphrase pair is closer than an unrelated pair.

Pooling is sentence-transformers' mean over attention_mask, then L2 normalisation.
Writes MODEL_DIR/reference_embeddings.json (the sentences, their token ids and
the numpy embeddings) for the Rust tests. Exits non-zero with a message on any
failure.

Usage: check_embedding.py MODEL_DIR [--int8-dir DIR] [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from safetensors.numpy import load_file
from tokenizers import Tokenizer

MAX_ABS_DIFF = 1e-4
MIN_INT8_COSINE = 0.97
# Sentence-transformers' max_seq_length for this model (sentence_bert_config.json).
MAX_TOKENS = 256

SENTENCES = [
    "A man is playing a guitar.",
    "Someone is strumming a guitar.",
    "The stock market fell sharply on Monday.",
    "How do I create an index on a PostgreSQL table?",
    "CREATE INDEX constructs an index on the specified column(s) of the specified relation.",
    "Vacuuming reclaims storage occupied by dead tuples.",
    "Café au lait, naïve résumé: Unicode & punctuation (v1.2.3)!",
    "ok",
]
# (i, j) pairs: each paraphrase pair must be closer than each unrelated pair.
PARAPHRASE_PAIRS = [(0, 1), (3, 4)]
UNRELATED_PAIRS = [(0, 2), (3, 2), (1, 5)]


class CheckFailed(Exception):
    pass


_erf = np.vectorize(math.erf, otypes=[np.float64])


def numpy_bert(weights: dict[str, np.ndarray], config: dict, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """BERT encoder forward for one batch in float64; returns [batch, seq, hidden]."""
    w = {k: v.astype(np.float64) for k, v in weights.items() if v.dtype != np.int64}
    pre = "bert." if "bert.embeddings.word_embeddings.weight" in w else ""
    hidden = config["hidden_size"]
    n_heads = config["num_attention_heads"]
    d = hidden // n_heads
    eps = config["layer_norm_eps"]
    batch, seq = ids.shape

    def layer_norm(x, name):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * w[name + ".weight"] + w[name + ".bias"]

    def dense(x, name):
        return x @ w[name + ".weight"].T + w[name + ".bias"]

    x = (
        w[pre + "embeddings.word_embeddings.weight"][ids]
        + w[pre + "embeddings.position_embeddings.weight"][np.arange(seq)][None, :, :]
        + w[pre + "embeddings.token_type_embeddings.weight"][np.zeros_like(ids)]
    )
    x = layer_norm(x, pre + "embeddings.LayerNorm")
    key_bias = np.where(mask[:, None, None, :] > 0, 0.0, -1e9)  # [b, 1, 1, s]

    for i in range(config["num_hidden_layers"]):
        p = f"{pre}encoder.layer.{i}"

        def split(t):
            return t.reshape(batch, seq, n_heads, d).transpose(0, 2, 1, 3)

        q = split(dense(x, p + ".attention.self.query"))
        k = split(dense(x, p + ".attention.self.key"))
        v = split(dense(x, p + ".attention.self.value"))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d) + key_bias
        scores = scores - scores.max(-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, seq, hidden)
        x = layer_norm(dense(context, p + ".attention.output.dense") + x, p + ".attention.output.LayerNorm")
        h = dense(x, p + ".intermediate.dense")
        h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))
        x = layer_norm(dense(h, p + ".output.dense") + x, p + ".output.LayerNorm")
    return x


def pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean over attended tokens, then L2 normalisation (float64)."""
    m = mask[:, :, None].astype(np.float64)
    summed = (hidden.astype(np.float64) * m).sum(1)
    mean = summed / np.clip(m.sum(1), 1e-9, None)
    return mean / np.clip(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12, None)


def run_onnx(path: Path, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    wanted = {i.name for i in session.get_inputs()}
    if not wanted <= feeds.keys():
        raise CheckFailed(f"{path}: unexpected inputs {sorted(wanted)}")
    feeds = {k: v for k, v in feeds.items() if k in wanted}
    outputs = {o.name: o for o in session.get_outputs()}
    if "last_hidden_state" not in outputs:
        raise CheckFailed(f"{path}: no last_hidden_state output (has {sorted(outputs)})")
    (hidden,) = session.run(["last_hidden_state"], feeds)
    if hidden.dtype != np.float32 or hidden.shape[:2] != ids.shape:
        raise CheckFailed(f"{path}: last_hidden_state is {hidden.dtype} {hidden.shape}, inputs {ids.shape}")
    return pool(hidden, mask)


def check(model_dir: Path, int8_dir: Path | None, output: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    weights = load_file(str(model_dir / "model.safetensors"))
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.enable_truncation(MAX_TOKENS)

    # (a) reference: one sentence at a time, no padding at all.
    tokenizer.no_padding()
    singles = tokenizer.encode_batch(SENTENCES)
    reference = []
    for enc in singles:
        ids = np.array([enc.ids], dtype=np.int64)
        mask = np.array([enc.attention_mask], dtype=np.int64)
        reference.append(pool(numpy_bert(weights, config, ids, mask), mask)[0])
    reference = np.stack(reference)

    # (b) our export, batched with tokenizer.json's own padding (fixed length).
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.enable_truncation(MAX_TOKENS)
    if tokenizer.padding is None:
        tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    batch = tokenizer.encode_batch(SENTENCES)
    for enc, single in zip(batch, singles):
        if enc.ids[: len(single.ids)] != single.ids:
            raise CheckFailed("padded and unpadded tokenisation disagree")
    ids = np.array([e.ids for e in batch], dtype=np.int64)
    mask = np.array([e.attention_mask for e in batch], dtype=np.int64)
    ours = run_onnx(model_dir / "model.onnx", ids, mask)
    per_sentence_diff = np.abs(ours - reference).max(axis=1)
    max_diff = float(per_sentence_diff.max())
    cos_ours = (ours * reference).sum(1)
    print(f"(b) model.onnx vs numpy reference: batch {ids.shape}, max abs diff {max_diff:.3e} (limit {MAX_ABS_DIFF:.0e})")
    for s, dd, c in zip(SENTENCES, per_sentence_diff, cos_ours):
        print(f"      diff {dd:.3e}  cosine {c:.9f}  {s!r}")
    if not max_diff < MAX_ABS_DIFF:
        raise CheckFailed(f"model.onnx differs from the numpy reference by {max_diff:.3e} >= {MAX_ABS_DIFF}")

    # (c) the third-party int8 export.
    int8_cosines = None
    if int8_dir is not None:
        int8 = run_onnx(int8_dir / "model.onnx", ids, mask)
        int8_cosines = (int8 * reference).sum(1)
        print(f"(c) int8 model.onnx vs numpy reference: min cosine {int8_cosines.min():.5f} (limit > {MIN_INT8_COSINE})")
        for s, c in zip(SENTENCES, int8_cosines):
            print(f"      cosine {c:.5f}  {s!r}")
        if not (int8_cosines > MIN_INT8_COSINE).all():
            bad = [SENTENCES[i] for i in np.flatnonzero(int8_cosines <= MIN_INT8_COSINE)]
            raise CheckFailed(f"int8 model disagrees with the reference (cosine <= {MIN_INT8_COSINE}) on {bad}")
    else:
        print("(c) skipped: no int8 model given")

    # (d) semantic sanity on the reference embeddings.
    cos = reference @ reference.T
    para = [(i, j, float(cos[i, j])) for i, j in PARAPHRASE_PAIRS]
    unrel = [(i, j, float(cos[i, j])) for i, j in UNRELATED_PAIRS]
    for kind, pairs in (("paraphrase", para), ("unrelated", unrel)):
        for i, j, c in pairs:
            print(f"(d) {kind:10s} cosine {c:.4f}: {SENTENCES[i]!r} ~ {SENTENCES[j]!r}")
    if not min(c for *_, c in para) > max(c for *_, c in unrel):
        raise CheckFailed("a paraphrase pair is not closer than every unrelated pair")

    doc = {
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "about": (
            "Reference sentence embeddings from a float64 numpy BERT forward pass over model.safetensors "
            "(scripts/check_embedding.py): tokenizer.json, token_type_ids all 0, mean pooling over "
            "attention_mask, L2-normalised. A runtime that reproduces these within max_abs_diff is correct."
        ),
        "pooling": "mean",
        "normalized": True,
        "dim": int(reference.shape[1]),
        "max_abs_diff": MAX_ABS_DIFF,
        "measured": {
            "onnx_vs_numpy_max_abs_diff": max_diff,
            "int8_vs_numpy_min_cosine": None if int8_cosines is None else float(int8_cosines.min()),
        },
        "sentences": [
            {
                "text": s,
                "input_ids": enc.ids,
                "embedding_first8": [float(v) for v in emb[:8]],
                "embedding": [float(v) for v in emb],
            }
            for s, enc, emb in zip(SENTENCES, singles, reference)
        ],
    }
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, output)
    print(f"wrote {output}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, help="directory with model.safetensors, tokenizer.json, model.onnx")
    parser.add_argument("--int8-dir", type=Path, help="directory of the third-party int8 model.onnx")
    parser.add_argument("--output", type=Path, help="default MODEL_DIR/reference_embeddings.json")
    args = parser.parse_args()
    try:
        check(args.model_dir, args.int8_dir, args.output or args.model_dir / "reference_embeddings.json")
    except (CheckFailed, OSError) as e:
        print(f"check_embedding: FAILED: {e}", file=sys.stderr)
        return 1
    print("check_embedding: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
