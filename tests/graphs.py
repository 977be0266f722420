"""Hand-built ONNX graphs (onnx.helper) for the tests.

Nodes are named like exported transformers (`/layers.N/...`), so the default selection sees
repeated blocks and picks every layer; all weights have K >= 16 and no exact zeros.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 10  # what every onnxruntime of the last years reads
BATCH = "batch"


def weight(shape, seed: int, dtype=np.float32) -> np.ndarray:
    """Random weights without exact zeros or ties (|w| >= 0.05)."""
    rng = np.random.default_rng(seed)
    values = rng.uniform(0.05, 1.0, size=shape) * rng.choice([-1.0, 1.0], size=shape)
    return values.astype(dtype)


def make_model(nodes, inputs, outputs, initializers, name: str = "test", opset: int = OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs,
                              [numpy_helper.from_array(array, key) for key, array in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model


def save(model: onnx.ModelProto, path: Path, external: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=0)
    else:
        onnx.save_model(model, str(path))
    return path


@dataclass(frozen=True)
class Dense:
    """One linear layer of `chain_model`: `op` is MatMul, Gemm, Transpose+MatMul or Cast+MatMul."""

    op: str
    k: int
    n: int
    trans_b: bool = False
    bias: bool = False


def chain_model(layers: list[Dense], seed: int = 0) -> onnx.ModelProto:
    """X[batch, K0] → layer 0 → Relu → layer 1 → … → Y, weights named `layers.I.weight`.

    Stored shapes: MatMul [K, N]; Gemm [N, K] with transB=1 else [K, N]; "TransposeMatMul"
    stores [N, K] and feeds MatMul through Transpose(perm=[1, 0]); "CastMatMul" stores an fp16
    [K, N] and feeds MatMul through Cast(to=FLOAT).
    """
    nodes, inits = [], {}
    current = "X"
    for i, layer in enumerate(layers):
        prefix, name, out = f"/layers.{i}/fc", f"layers.{i}.weight", f"h{i}"
        if layer.op == "MatMul":
            inits[name] = weight((layer.k, layer.n), seed + i)
            nodes.append(helper.make_node("MatMul", [current, name], [out], name=f"{prefix}/MatMul"))
        elif layer.op == "Gemm":
            shape = (layer.n, layer.k) if layer.trans_b else (layer.k, layer.n)
            inits[name] = weight(shape, seed + i)
            inputs = [current, name]
            if layer.bias:
                inits[f"layers.{i}.bias"] = weight((layer.n,), seed + 100 + i)
                inputs.append(f"layers.{i}.bias")
            nodes.append(helper.make_node("Gemm", inputs, [out], name=f"{prefix}/Gemm", transB=int(layer.trans_b)))
        elif layer.op == "TransposeMatMul":
            inits[name] = weight((layer.n, layer.k), seed + i)
            nodes += [helper.make_node("Transpose", [name], [f"{name}.T"], name=f"{prefix}/Transpose", perm=[1, 0]),
                      helper.make_node("MatMul", [current, f"{name}.T"], [out], name=f"{prefix}/MatMul")]
        elif layer.op == "CastMatMul":
            inits[name] = weight((layer.k, layer.n), seed + i, np.float16)
            nodes += [helper.make_node("Cast", [name], [f"{name}.f32"], name=f"{prefix}/Cast", to=TensorProto.FLOAT),
                      helper.make_node("MatMul", [current, f"{name}.f32"], [out], name=f"{prefix}/MatMul")]
        else:
            raise ValueError(layer.op)
        current = out
        if i < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"], name=f"/layers.{i}/act/Relu"))
            current = f"r{i}"
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [BATCH, layers[0].k])]
    outputs = [helper.make_tensor_value_info(current, TensorProto.FLOAT, [BATCH, layers[-1].n])]
    return make_model(nodes, inputs, outputs, inits, "chain")


def gemm_model(trans_b: bool) -> onnx.ModelProto:
    return chain_model([Dense("Gemm", 32, 48, trans_b, bias=True), Dense("Gemm", 48, 24, trans_b)])


def transpose_matmul_model() -> onnx.ModelProto:
    return chain_model([Dense("TransposeMatMul", 32, 48), Dense("MatMul", 48, 32)])


def cast_fp16_model() -> onnx.ModelProto:
    return chain_model([Dense("CastMatMul", 32, 48), Dense("MatMul", 48, 32)])


def mixed_model() -> onnx.ModelProto:
    """Every linear orientation in one graph, for the unstructured passes."""
    return chain_model([Dense("MatMul", 32, 48), Dense("Gemm", 48, 64, trans_b=True, bias=True),
                        Dense("TransposeMatMul", 64, 40), Dense("Gemm", 40, 32)])


def conv_model(in_channels: int, seed: int = 0) -> onnx.ModelProto:
    """X[batch, C, 8, 8] → Conv W0[16, C, 3, 3] (+bias) → Relu → Conv W1[16, 16, 3, 3] → Y."""
    inits = {"layers.0.conv.weight": weight((16, in_channels, 3, 3), seed),
             "layers.0.conv.bias": weight((16,), seed + 1),
             "layers.1.conv.weight": weight((16, 16, 3, 3), seed + 2)}
    nodes = [
        helper.make_node("Conv", ["X", "layers.0.conv.weight", "layers.0.conv.bias"], ["c0"],
                         name="/layers.0/conv/Conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"], name="/layers.0/act/Relu"),
        helper.make_node("Conv", ["r0", "layers.1.conv.weight"], ["Y"], name="/layers.1/conv/Conv", pads=[1, 1, 1, 1]),
    ]
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [BATCH, in_channels, 8, 8])]
    outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [BATCH, 16, 8, 8])]
    return make_model(nodes, inputs, outputs, inits, "conv")


SHARED = "layers.shared.weight"  # used by two MatMuls
TIED = "embed.weight"  # used by a Gather (embedding) and, transposed, by the LM-head MatMul


def shared_weights_model(vocab: int = 128, hidden: int = 32) -> onnx.ModelProto:
    """ids → Gather(E) → h → MatMul(W) → MatMul(W) → + h → MatMul(Eᵀ) → logits."""
    inits = {TIED: weight((vocab, hidden), 0), SHARED: weight((hidden, hidden), 1)}
    nodes = [
        helper.make_node("Gather", [TIED, "ids"], ["h"], name="/embed/Gather"),
        helper.make_node("MatMul", ["h", SHARED], ["a"], name="/layers.0/proj/MatMul"),
        helper.make_node("MatMul", ["a", SHARED], ["b"], name="/layers.1/proj/MatMul"),
        helper.make_node("Add", ["h", "b"], ["r"], name="/layers.1/residual/Add"),
        helper.make_node("Transpose", [TIED], ["embed.T"], name="/lm_head/Transpose", perm=[1, 0]),
        helper.make_node("MatMul", ["r", "embed.T"], ["logits"], name="/lm_head/MatMul"),
    ]
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, [BATCH, "seq"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [BATCH, "seq", vocab])]
    return make_model(nodes, inputs, outputs, inits, "shared")


def no_weights_model() -> onnx.ModelProto:
    """Add and Relu only: nothing to prune."""
    nodes = [helper.make_node("Add", ["X", "X"], ["s"], name="add"), helper.make_node("Relu", ["s"], ["Y"], name="relu")]
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [BATCH, 32])]
    outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [BATCH, 32])]
    return make_model(nodes, inputs, outputs, {}, "no_weights")
