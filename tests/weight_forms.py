"""Hand-built graphs holding one linear layer y = x @ W in every form exporters write.

Each builder returns (model, names): names are the stored tensors discovery must find. All
"equivalent" forms compute exactly y = X @ W (X [batch, 8, 16], W [16, 24] from `weight(…, 0)`), so
pruning any of them with the same calibration data must give the same canonical weight as the
plain MatMul. Nodes are named `/layers.N/...` so the default selection picks them.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphs import IR_VERSION, OPSET, make_model, weight

K, N, SEQ = 16, 24, 8
BATCH = "batch"
X_INFO = helper.make_tensor_value_info("X", TensorProto.FLOAT, [BATCH, SEQ, K])
Y_INFO = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [BATCH, SEQ, N])
W = weight((K, N), 0)
MS = "com.microsoft"


def _model(nodes, inits, inputs=(X_INFO,), outputs=(Y_INFO,), contrib: bool = False) -> onnx.ModelProto:
    if not contrib:
        return make_model(nodes, list(inputs), list(outputs), inits)
    graph = helper.make_graph(nodes, "test", list(inputs), list(outputs),
                              [numpy_helper.from_array(a, k) for k, a in inits.items()])
    return helper.make_model(graph, ir_version=IR_VERSION,
                             opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)])


def _const(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"{name}/Constant", value=numpy_helper.from_array(array))


def plain():
    return _model([helper.make_node("MatMul", ["X", "W"], ["Y"], name="/layers.0/fc/MatMul")], {"W": W}), ["W"]


def constant_node():
    """paddle2onnx / tf2onnx: the weight is a Constant node's value."""
    nodes = [_const("W", W), helper.make_node("MatMul", ["X", "W"], ["Y"], name="/layers.0/fc/MatMul")]
    return _model(nodes, {}), ["W"]


def reshape_identity_chain():
    """A flat initializer reshaped by a Constant shape, then an Identity."""
    nodes = [_const("shape", np.array([K, N], np.int64)),
             helper.make_node("Reshape", ["W_flat", "shape"], ["W2"], name="/layers.0/fc/Reshape"),
             helper.make_node("Identity", ["W2"], ["W3"], name="/layers.0/fc/Identity"),
             helper.make_node("MatMul", ["X", "W3"], ["Y"], name="/layers.0/fc/MatMul")]
    return _model(nodes, {"W_flat": W.reshape(-1)}), ["W_flat"]


def transpose_unsqueeze_squeeze_chain():
    nodes = [helper.make_node("Transpose", ["W_t"], ["a"], name="/layers.0/fc/Transpose", perm=[1, 0]),
             _const("axes", np.array([0], np.int64)),
             helper.make_node("Unsqueeze", ["a", "axes"], ["b"], name="/layers.0/fc/Unsqueeze"),
             helper.make_node("Squeeze", ["b", "axes"], ["c"], name="/layers.0/fc/Squeeze"),
             helper.make_node("MatMul", ["X", "c"], ["Y"], name="/layers.0/fc/MatMul")]
    return _model(nodes, {"W_t": np.ascontiguousarray(W.T)}), ["W_t"]


def _flat_in(nodes):
    """X [batch, 8, 16] → X2 [tokens, 16] → (the nodes) → Y2 [tokens, 24] → Y [batch, 8, 24]."""
    return [_const("flat_shape", np.array([-1, K], np.int64)),
            helper.make_node("Reshape", ["X", "flat_shape"], ["X2"], name="/layers.0/in/Reshape"), *nodes,
            _const("out_shape", np.array([-1, SEQ, N], np.int64)),
            helper.make_node("Reshape", ["Y2", "out_shape"], ["Y"], name="/layers.0/out/Reshape")]


def gemm_trans_a():
    """Gemm reading the activation transposed (transA=1): Y2 = (X2ᵀ)ᵀ · W."""
    nodes = _flat_in([helper.make_node("Transpose", ["X2"], ["X2t"], name="/layers.0/in/Transpose", perm=[1, 0]),
                      helper.make_node("Gemm", ["X2t", "W"], ["Y2"], name="/layers.0/fc/Gemm", transA=1)])
    return _model(nodes, {"W": W}), ["W"]


def gemm_weight_a():
    """The weight as Gemm's A: Y2ᵀ = Wᵀ · X2ᵀ (transB=1), transposed back."""
    nodes = _flat_in([helper.make_node("Gemm", ["W_t", "X2"], ["Y2t"], name="/layers.0/fc/Gemm", transB=1),
                      helper.make_node("Transpose", ["Y2t"], ["Y2"], name="/layers.0/out/Transpose", perm=[1, 0])])
    return _model(nodes, {"W_t": np.ascontiguousarray(W.T)}), ["W_t"]


def left_matmul():
    """Y = (Wᵀ @ Xᵀ)ᵀ: the weight on the left of MatMul."""
    nodes = [helper.make_node("Transpose", ["X"], ["Xt"], name="/layers.0/in/Transpose", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["W_t", "Xt"], ["Yt"], name="/layers.0/fc/MatMul"),
             helper.make_node("Transpose", ["Yt"], ["Y"], name="/layers.0/out/Transpose", perm=[0, 2, 1])]
    return _model(nodes, {"W_t": np.ascontiguousarray(W.T)}), ["W_t"]


def einsum_kn():
    nodes = [helper.make_node("Einsum", ["X", "W"], ["Y"], name="/layers.0/fc/Einsum", equation="bsk,kn->bsn")]
    return _model(nodes, {"W": W}), ["W"]


def einsum_nk_left():
    """The weight first, stored [N, K], with an ellipsis on the activation."""
    nodes = [helper.make_node("Einsum", ["W_t", "X"], ["Y"], name="/layers.0/fc/Einsum", equation="nk,...k->...n")]
    return _model(nodes, {"W_t": np.ascontiguousarray(W.T)}), ["W_t"]


def fused_matmul():
    """onnxruntime's FusedMatMul (transformers optimizer output) with transB=1."""
    nodes = [helper.make_node("FusedMatMul", ["X", "W_t"], ["Y"], name="/layers.0/fc/FusedMatMul", domain=MS,
                              transB=1, alpha=1.0)]
    return _model(nodes, {"W_t": np.ascontiguousarray(W.T)}, contrib=True), ["W_t"]


EQUIVALENT = [plain, constant_node, reshape_identity_chain, transpose_unsqueeze_squeeze_chain, gemm_trans_a,
              gemm_weight_a, left_matmul, einsum_kn, einsum_nk_left, fused_matmul]


# ----------------------------------------------------------------------------- quantized forms

SCALE = (np.abs(W).max(axis=0) / 127).astype(np.float32)  # per output channel (axis 1 of [K, N])
ZERO = np.arange(N, dtype=np.int8) - 12  # non-zero zero points: a pruned weight is its zero point
CODES = np.clip(np.rint(W / SCALE) + ZERO, -128, 127).astype(np.int8)


def qdq_per_channel():
    """onnxruntime quantize_static's int8 QDQ weight: codes, per-channel scale and zero point."""
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "scale", "zp"], ["Wd"], name="/layers.0/fc/DQ", axis=1),
             helper.make_node("MatMul", ["X", "Wd"], ["Y"], name="/layers.0/fc/MatMul")]
    return _model(nodes, {"Wq": CODES, "scale": SCALE, "zp": ZERO}), ["Wq"]


def qdq_per_tensor():
    scale = np.array(np.abs(W).max() / 127, np.float32)
    codes = np.clip(np.rint(W / scale), -127, 127).astype(np.int8)
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "scale"], ["Wd"], name="/layers.0/fc/DQ"),
             helper.make_node("MatMul", ["X", "Wd"], ["Y"], name="/layers.0/fc/MatMul")]
    return _model(nodes, {"Wq": codes, "scale": scale}), ["Wq"]


def cast_mul_int8():
    """int8 weights dequantized by Cast → Sub(zero point) → Mul(scale)."""
    nodes = [helper.make_node("Cast", ["Wq"], ["Wf"], name="/layers.0/fc/Cast", to=TensorProto.FLOAT),
             helper.make_node("Sub", ["Wf", "zpf"], ["Wc"], name="/layers.0/fc/Sub"),
             helper.make_node("Mul", ["Wc", "scale"], ["Wd"], name="/layers.0/fc/Mul"),
             helper.make_node("MatMul", ["X", "Wd"], ["Y"], name="/layers.0/fc/MatMul")]
    return _model(nodes, {"Wq": CODES, "zpf": ZERO.astype(np.float32), "scale": SCALE}), ["Wq"]


def matmul_integer():
    """MatMulInteger on uint8 activations and int8 weights with zero points, rescaled after."""
    xq = helper.make_tensor_value_info("Xq", TensorProto.UINT8, [BATCH, SEQ, K])
    nodes = [helper.make_node("MatMulInteger", ["Xq", "Wq", "xzp", "zp"], ["acc"], name="/layers.0/fc/MatMulInteger"),
             helper.make_node("Cast", ["acc"], ["accf"], name="/layers.0/fc/Cast", to=TensorProto.FLOAT),
             helper.make_node("Mul", ["accf", "scale"], ["Y"], name="/layers.0/fc/Mul")]
    return _model(nodes, {"Wq": CODES, "zp": ZERO, "xzp": np.array(128, np.uint8), "scale": SCALE},
                  inputs=[xq]), ["Wq"]


NBITS_BLOCK = 16


def nbits_codes(weight_kn: np.ndarray):
    """Asymmetric 4-bit blockwise codes of W [K, N] as MatMulNBits stores them: codes [N, blocks,
    block], scales and zero points [N, blocks], W ≈ (code − zero point) · scale."""
    w = weight_kn.T.reshape(N, -1, NBITS_BLOCK).astype(np.float64)
    low, high = np.minimum(w.min(-1), 0), np.maximum(w.max(-1), 0)
    scale = (high - low) / 15
    zero = np.clip(np.rint(-low / scale), 0, 15).astype(np.uint8)
    codes = np.clip(np.rint(w / scale[..., None]) + zero[..., None], 0, 15).astype(np.uint8)
    return codes, scale.astype(np.float32), zero


def _pack4(codes: np.ndarray) -> np.ndarray:
    """Two 4-bit codes per byte along the last axis, low nibble first."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def matmul_nbits(act_order: bool = False):
    """A 4-bit MatMulNBits weight with zero points next to a plain MatMul; with `act_order`, a
    g_idx input too (GPTQ's act-order), which is refused with its reason."""
    codes, scale, zero = nbits_codes(W)
    blocks = codes.shape[1]
    zero_packed = _pack4(np.pad(zero, [(0, 0), (0, blocks % 2)]))
    inits = {"Bq": _pack4(codes), "scales": scale.reshape(-1), "zp": zero_packed.reshape(-1), "W": W}
    inputs = ["X", "Bq", "scales", "zp"]
    if act_order:
        inits["g_idx"] = np.arange(K, dtype=np.int32) // NBITS_BLOCK
        inputs.append("g_idx")
    hidden = helper.make_tensor_value_info("H", TensorProto.FLOAT, [BATCH, SEQ, N])
    nodes = [helper.make_node("MatMulNBits", inputs, ["H"], name="/layers.0/fc/MatMulNBits",
                              domain=MS, K=K, N=N, bits=4, block_size=NBITS_BLOCK),
             helper.make_node("MatMul", ["X", "W"], ["Y"], name="/layers.1/fc/MatMul")]
    return _model(nodes, inits, outputs=[Y_INFO, hidden], contrib=True), ["W"] if act_order else ["Bq", "W"]


def matmul_nbits_act_order():
    return matmul_nbits(act_order=True)


# ------------------------------------------------------------------------------ other ops

HIDDEN = 16  # R's K: at least TINY_K, so the default selection picks it


def recurrent(op: str, gates: int, **attributes):
    """LSTM (4 gates) / GRU (3): W [1, G·H, 16] from the sequence, R [1, G·H, H] from the hidden states."""
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["time", BATCH, K])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["time", 1, BATCH, HIDDEN])
    inits = {"Wr": weight((1, gates * HIDDEN, K), 1) * 0.3, "Rr": weight((1, gates * HIDDEN, HIDDEN), 2) * 0.3,
             "Br": weight((1, 2 * gates * HIDDEN), 3) * 0.1}
    nodes = [helper.make_node(op, ["X", "Wr", "Rr", "Br"], ["Y"], name=f"/layers.0/rnn/{op}", hidden_size=HIDDEN,
                              **attributes)]
    return _model(nodes, inits, inputs=[x], outputs=[y]), ["Wr", "Rr"]


def lstm():
    return recurrent("LSTM", 4)


def gru():
    return recurrent("GRU", 3, linear_before_reset=1)  # torch's export: R multiplies the hidden state


def fused_attention():
    """onnxruntime's fused Attention: one packed QKV weight [hidden, 3·hidden] and its bias."""
    hidden = helper.make_tensor_value_info("X", TensorProto.FLOAT, [BATCH, SEQ, K])
    out = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [BATCH, SEQ, K])
    inits = {"qkv": weight((K, 3 * K), 4) * 0.3, "qkv_bias": weight((3 * K,), 5) * 0.1}
    nodes = [helper.make_node("Attention", ["X", "qkv", "qkv_bias"], ["Y"], name="/layers.0/attn/Attention",
                              domain=MS, num_heads=2)]
    return _model(nodes, inits, inputs=[hidden], outputs=[out], contrib=True), ["qkv"]


def if_branches():
    """A merged-decoder-like If: both branches read the outer weight W; the then-branch also has a
    Constant-node weight of its own; a main-graph MatMul follows."""
    cond = helper.make_tensor_value_info("use_branch", TensorProto.BOOL, [1])
    branch_out = helper.make_tensor_value_info("b_out", TensorProto.FLOAT, None)
    then_branch = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["t0"], name="/layers.0/then/MatMul"),
                                     _const("W_inner", weight((N, N), 6)),
                                     helper.make_node("MatMul", ["t0", "W_inner"], ["b_out"],
                                                      name="/layers.0/then/inner/MatMul")],
                                    "then", [], [branch_out])
    else_out = helper.make_tensor_value_info("e_out", TensorProto.FLOAT, None)
    else_branch = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["e_out"], name="/layers.0/else/MatMul")],
                                    "else", [], [else_out])
    nodes = [helper.make_node("If", ["use_branch"], ["h"], name="/layers.0/If", then_branch=then_branch,
                              else_branch=else_branch),
             helper.make_node("MatMul", ["h", "W2"], ["Y"], name="/layers.1/fc/MatMul")]
    return _model(nodes, {"W": W, "W2": weight((N, N), 7)}, inputs=[X_INFO, cond]), ["W", "W_inner", "W2"]


OTHER = [qdq_per_channel, qdq_per_tensor, cast_mul_int8, matmul_integer, matmul_nbits, lstm, gru,
         fused_attention, if_branches]


def feeds(model: onnx.ModelProto, samples: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Calibration/eval inputs, first axis = samples (the stacked .npz convention)."""
    rng = np.random.default_rng(seed)
    out = {}
    for value in model.graph.input:
        tensor = value.type.tensor_type
        # the first axis is the batch, one sample each; other symbolic axes get 2
        shape = [d.dim_value if d.HasField("dim_value") else 2 for d in tensor.shape.dim][1:]
        if tensor.elem_type == TensorProto.BOOL:
            out[value.name] = np.ones((samples, *shape), bool)
        elif tensor.elem_type == TensorProto.UINT8:
            out[value.name] = rng.integers(0, 256, size=(samples, *shape), dtype=np.uint8)
        else:
            out[value.name] = rng.standard_normal((samples, *shape)).astype(np.float32)
    return out
