#!/usr/bin/env python3
"""Export the all-MiniLM-L6-v2 BERT encoder from model.safetensors to ONNX.

Builds the graph node by node with onnx.helper (opset 17, numpy only, no torch),
so the model the appliance runs is made here from the published weights rather
than taken from a third-party export.

Graph contract (what src/embed relies on):
  inputs   input_ids, attention_mask, token_type_ids: int64 [batch, sequence]
  output   last_hidden_state: float32 [batch, sequence, hidden]
Pooling (mean over the attention mask) and L2 normalisation are left to the
caller, as with the usual sentence-transformers ONNX exports.

Encoder: absolute position embeddings (ids 0..sequence-1), post-LayerNorm BERT
layers, exact erf GELU, additive attention mask (masked keys get -1e9, so
their softmax weight underflows to exactly 0).

Usage: export_minilm_onnx.py MODEL_DIR [-o MODEL_DIR/model.onnx]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
# IR version 8 is the one that goes with opset 17; it keeps the file loadable
# by any runtime that supports the opset, not only the newest.
IR_VERSION = 8
MASK_NEGATIVE = -1e9

SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Parse a safetensors file: u64 LE header length, JSON header, raw data."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        data = f.read()
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        array = np.frombuffer(data[start:end], dtype=np.dtype(dtype).newbyteorder("<"))
        tensors[name] = array.reshape(info["shape"]).astype(dtype)
    return tensors


class GraphBuilder:
    """Collects nodes and initializers; names are made unique by a counter."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, **attrs) -> str:
        out = self._name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"node_{out}", **attrs))
        return out

    def linear(self, x: str, weight: np.ndarray, bias: np.ndarray, prefix: str) -> str:
        # PyTorch stores Linear weights as [out, in]; MatMul wants [in, out].
        w = self.const(f"{prefix}.weight_t", np.ascontiguousarray(weight.T.astype(np.float32)))
        b = self.const(f"{prefix}.bias", bias.astype(np.float32))
        return self.op("Add", [self.op("MatMul", [x, w]), b], hint=prefix.replace(".", "_"))

    def layer_norm(self, x: str, weight: np.ndarray, bias: np.ndarray, prefix: str, eps: float) -> str:
        g = self.const(f"{prefix}.weight", weight.astype(np.float32))
        b = self.const(f"{prefix}.bias", bias.astype(np.float32))
        return self.op("LayerNormalization", [x, g, b], hint=prefix.replace(".", "_"), axis=-1, epsilon=eps)


def build_model(weights: dict[str, np.ndarray], config: dict) -> onnx.ModelProto:
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    layers = config["num_hidden_layers"]
    eps = float(config["layer_norm_eps"])
    head_dim = hidden // heads
    if head_dim * heads != hidden:
        raise ValueError(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError("only absolute position embeddings are supported")
    if config.get("hidden_act") != "gelu":
        raise ValueError(f"hidden_act {config.get('hidden_act')!r}: only exact (erf) gelu is supported")

    # Checkpoints saved from BertModel have bare names; from a task head, a "bert." prefix.
    prefix = "bert." if "bert.embeddings.word_embeddings.weight" in weights else ""

    def w(name: str) -> np.ndarray:
        try:
            return weights[prefix + name]
        except KeyError:
            raise KeyError(f"model.safetensors has no tensor {prefix + name}") from None

    g = GraphBuilder()

    # Embeddings: word + position(0..seq-1) + token type, then LayerNorm.
    word = g.op("Gather", [g.const("embeddings.word_embeddings.weight", w("embeddings.word_embeddings.weight")), "input_ids"], axis=0)
    seq_len = g.op(
        "Gather",
        [g.op("Shape", ["input_ids"]), g.const("const.index_1", np.array(1, dtype=np.int64))],
        hint="seq_len",
        axis=0,
    )
    position_ids = g.op(
        "Range",
        [g.const("const.zero_i64", np.array(0, dtype=np.int64)), seq_len, g.const("const.one_i64", np.array(1, dtype=np.int64))],
        hint="position_ids",
    )
    position = g.op(
        "Gather",
        [g.const("embeddings.position_embeddings.weight", w("embeddings.position_embeddings.weight")), position_ids],
        axis=0,
    )
    token_type = g.op(
        "Gather",
        [g.const("embeddings.token_type_embeddings.weight", w("embeddings.token_type_embeddings.weight")), "token_type_ids"],
        axis=0,
    )
    x = g.op("Add", [g.op("Add", [word, position]), token_type], hint="embeddings_sum")
    x = g.layer_norm(x, w("embeddings.LayerNorm.weight"), w("embeddings.LayerNorm.bias"), "embeddings.LayerNorm", eps)

    # Additive mask [batch, 1, 1, seq]: 0 where attended, MASK_NEGATIVE where padded.
    mask_f = g.op("Cast", ["attention_mask"], hint="mask_f", to=TensorProto.FLOAT)
    one_f = g.const("const.one_f", np.array(1.0, dtype=np.float32))
    inverted = g.op("Sub", [one_f, mask_f], hint="mask_inverted")
    mask_bias = g.op("Mul", [inverted, g.const("const.mask_negative", np.array(MASK_NEGATIVE, dtype=np.float32))], hint="mask_bias")
    mask_bias = g.op("Unsqueeze", [mask_bias, g.const("const.axes_1_2", np.array([1, 2], dtype=np.int64))], hint="mask_bias4d")

    split_heads_shape = g.const("const.split_heads_shape", np.array([0, 0, heads, head_dim], dtype=np.int64))
    merge_heads_shape = g.const("const.merge_heads_shape", np.array([0, 0, hidden], dtype=np.int64))
    scale = g.const("const.attention_scale", np.array(1.0 / math.sqrt(head_dim), dtype=np.float32))
    sqrt2 = g.const("const.sqrt2", np.array(math.sqrt(2.0), dtype=np.float32))
    half = g.const("const.half", np.array(0.5, dtype=np.float32))

    for i in range(layers):
        p = f"encoder.layer.{i}"

        def heads_of(name: str, perm: list[int]) -> str:
            y = g.linear(x, w(f"{p}.attention.self.{name}.weight"), w(f"{p}.attention.self.{name}.bias"), f"{p}.attention.self.{name}")
            return g.op("Transpose", [g.op("Reshape", [y, split_heads_shape])], hint=f"l{i}_{name}_heads", perm=perm)

        q = heads_of("query", [0, 2, 1, 3])  # [b, h, s, d]
        k_t = heads_of("key", [0, 2, 3, 1])  # [b, h, d, s]
        v = heads_of("value", [0, 2, 1, 3])  # [b, h, s, d]
        scores = g.op("Mul", [g.op("MatMul", [q, k_t]), scale], hint=f"l{i}_scores")
        scores = g.op("Add", [scores, mask_bias], hint=f"l{i}_masked_scores")
        probs = g.op("Softmax", [scores], hint=f"l{i}_probs", axis=-1)
        context = g.op("Transpose", [g.op("MatMul", [probs, v])], hint=f"l{i}_context", perm=[0, 2, 1, 3])
        context = g.op("Reshape", [context, merge_heads_shape], hint=f"l{i}_context_merged")

        attn = g.linear(context, w(f"{p}.attention.output.dense.weight"), w(f"{p}.attention.output.dense.bias"), f"{p}.attention.output.dense")
        x = g.layer_norm(
            g.op("Add", [attn, x]),
            w(f"{p}.attention.output.LayerNorm.weight"),
            w(f"{p}.attention.output.LayerNorm.bias"),
            f"{p}.attention.output.LayerNorm",
            eps,
        )

        inter = g.linear(x, w(f"{p}.intermediate.dense.weight"), w(f"{p}.intermediate.dense.bias"), f"{p}.intermediate.dense")
        # gelu(x) = 0.5 * x * (1 + erf(x / sqrt(2)))
        erf = g.op("Erf", [g.op("Div", [inter, sqrt2])], hint=f"l{i}_erf")
        gelu = g.op("Mul", [g.op("Mul", [inter, half]), g.op("Add", [erf, one_f])], hint=f"l{i}_gelu")
        out = g.linear(gelu, w(f"{p}.output.dense.weight"), w(f"{p}.output.dense.bias"), f"{p}.output.dense")
        x = g.layer_norm(
            g.op("Add", [out, x]),
            w(f"{p}.output.LayerNorm.weight"),
            w(f"{p}.output.LayerNorm.bias"),
            f"{p}.output.LayerNorm",
            eps,
        )

    g.nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="node_last_hidden_state"))

    def int_input(name: str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"])

    graph = helper.make_graph(
        g.nodes,
        "minilm_encoder",
        [int_input("input_ids"), int_input("attention_mask"), int_input("token_type_ids")],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", hidden])],
        initializer=g.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="domainrag-export-minilm",
        producer_version="1",
        doc_string="BERT encoder exported from model.safetensors by scripts/export_minilm_onnx.py",
    )
    model.ir_version = IR_VERSION
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, help="directory with model.safetensors and config.json")
    parser.add_argument("-o", "--output", type=Path, help="output path (default MODEL_DIR/model.onnx)")
    args = parser.parse_args()

    output = args.output or args.model_dir / "model.onnx"
    config = json.loads((args.model_dir / "config.json").read_text())
    weights = read_safetensors(args.model_dir / "model.safetensors")
    model = build_model(weights, config)

    # Write beside the target and rename, so a failed export never leaves a half file.
    tmp = output.with_name(output.name + ".tmp")
    onnx.save_model(model, str(tmp))
    try:
        onnx.checker.check_model(str(tmp), full_check=True)
    except Exception:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, output)
    print(
        f"exported {output} ({output.stat().st_size} bytes, opset {OPSET}, {len(model.graph.node)} nodes, "
        f"{config['num_hidden_layers']} layers, hidden {config['hidden_size']}); onnx.checker ok"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
