"""Emitters: compressed storage (bitmask + in-graph decoder) and TensorRT 2:4 eligibility.

Decoded weights are checked three independent ways: onnxruntime with the decoded tensor as a
graph output (constant folding on and off), onnx's reference evaluator, and a numpy decoder
written here from the format description; all must give the original bytes.
"""

from __future__ import annotations

import os
import time

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import ARCHS, feeds_for, initializers, prune
from graphs import BATCH, Dense, chain_model, conv_model, make_model, save
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxprune.errors import UserError
from onnxprune.exporters.compressed import compress_weights
from onnxprune.exporters.tensorrt import eligibility_markdown, tensorrt_eligibility
from onnxprune.model_io import load_model, save_model
from onnxprune.targets import discover_targets, select_targets

CPU = ["CPUExecutionProvider"]
LEVELS = [ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL]
ONNX_TYPE = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
             np.dtype(np.float64): TensorProto.DOUBLE, np.dtype(ml_dtypes.bfloat16): TensorProto.BFLOAT16}


# ------------------------------------------------------------------------------ helpers


def sparse_tensor(shape, sparsity: float, dtype, seed: int = 0, specials: bool = True) -> np.ndarray:
    """Exactly round(n * sparsity) +0.0 entries; the others non-zero bit patterns, including (with
    `specials`) -0.0, NaN with a payload, infinities and subnormals where the tensor is large enough."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    flat = rng.standard_normal(n).astype(dtype)
    flat[flat.view(f"u{flat.itemsize}") == 0] = 1  # no accidental zeros
    zeros = rng.permutation(n)[: round(n * sparsity)]
    keep = np.setdiff1d(np.arange(n), zeros)
    if not specials:
        flat[zeros] = 0
        return flat.reshape(shape)
    values = [-0.0, np.inf, -np.inf, np.finfo(np.float16).smallest_subnormal]
    for index, special in zip(keep, values):
        flat[index] = special
    if len(keep) > len(values):  # a quiet NaN with a payload, set through the bits
        bits = flat.view(f"u{flat.itemsize}")
        bits[keep[len(values)]] = {2: 0x7E01, 4: 0x7FC00123, 8: 0x7FF8000000000123}[flat.itemsize]
    flat[zeros] = 0
    return flat.reshape(shape)


def weight_model(weight: np.ndarray) -> onnx.ModelProto:
    """Y = Identity(W) exposes the (decoded) weight; a dummy input X keeps the runtime happy."""
    dtype = ONNX_TYPE[weight.dtype]
    nodes = [helper.make_node("Identity", ["W"], ["Y"], name="expose"),
             helper.make_node("Identity", ["X"], ["Z"], name="dummy")]
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1])]
    outputs = [helper.make_tensor_value_info("Y", dtype, list(weight.shape)),
               helper.make_tensor_value_info("Z", TensorProto.FLOAT, [1])]
    return make_model(nodes, inputs, outputs, {"W": weight}, "weight")


def linear_chain(weights: dict[str, np.ndarray], width: int = 32) -> onnx.ModelProto:
    """X[batch, width] multiplied by every matrix and added to every vector, in order."""
    nodes, current = [], "X"
    for i, (name, array) in enumerate(weights.items()):
        out = "Y" if i == len(weights) - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul" if array.ndim == 2 else "Add", [current, name], [out]))
        current = out
    return make_model(nodes, [helper.make_tensor_value_info("X", TensorProto.FLOAT, [BATCH, width])],
                      [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [BATCH, width])], weights)


def numpy_decode(inits: dict[str, np.ndarray], name: str, shape) -> np.ndarray:
    """The format, decoded independently of the ONNX subgraph."""
    n = int(np.prod(shape))
    bits = np.unpackbits(inits[f"{name}.bitmask"])[:n].astype(bool)
    nonzeros = inits[f"{name}.nonzeros"]
    flat = np.zeros(n, dtype=nonzeros.dtype)
    flat[bits] = nonzeros[1:]
    assert nonzeros[:1].tobytes() == bytes(nonzeros.itemsize)  # the leading +0.0
    return flat.reshape(shape)


def compress_file(src, dst, targets: bool = False, **options) -> dict:
    model = load_model(src)
    chosen = select_targets(discover_targets(model)) if targets else None
    report = compress_weights(model, chosen, **options)
    save_model(model, dst)
    onnx.checker.check_model(onnx.load(str(dst)), full_check=True)
    return report


def session(path, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    return ort.InferenceSession(str(path), options, providers=CPU)


def load_seconds(path, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        session(path)
        best = min(best, time.perf_counter() - start)
    return best


def assert_same_outputs(a, b) -> None:
    sa, sb = session(a), session(b)
    feeds = feeds_for(sa)
    for x, y in zip(sa.run(None, feeds), sb.run(None, feeds), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(x, y), "compressed model's outputs differ from the dense model's"


# --------------------------------------------------------------------- compressed: round trip


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", [(64, 48), (7, 13), (3, 5, 7), (1, 9), (16, 3, 3, 3)])
@pytest.mark.parametrize("sparsity", [0.0, 0.05, 0.5, 0.75, 0.99, 1.0])
def test_bitmask_round_trip_is_bit_identical(tmp_path, dtype, shape, sparsity):
    weight = sparse_tensor(shape, sparsity, dtype)
    zeros = round(weight.size * sparsity)
    src = save(weight_model(weight), tmp_path / "dense.onnx")
    report = compress_file(src, tmp_path / "packed.onnx", min_sparsity=0.0)
    encoded = {t["name"]: t for t in report["tensors"]}
    stored = initializers(tmp_path / "packed.onnx")
    if encoded:
        assert set(encoded) == {"W"} and "W" not in stored
        assert encoded["W"]["encoded_bytes"] < encoded["W"]["dense_bytes"] == weight.nbytes
        assert numpy_decode(stored, "W", shape).tobytes() == weight.tobytes()
        (reference,) = ReferenceEvaluator(str(tmp_path / "packed.onnx")).run(["Y"], {"X": np.zeros(1, np.float32)})
        assert reference.tobytes() == weight.tobytes()
    else:  # too small, or too few zeros, to shrink: left as it was
        assert stored["W"].tobytes() == weight.tobytes()
        assert [s["name"] for s in report["skipped"]] == (["W"] if zeros else [])  # all-non-zero: not listed
    mask, values = -(-weight.size // 8), (weight.size - zeros + 1) * weight.itemsize
    size = mask + values + 8 * weight.ndim + 8 * (weight.size % 8 > 0)  # + shape and slice end
    assert bool(encoded) == (zeros > 0 and size < weight.nbytes)
    for level in LEVELS:  # folded at session start, and executed as ordinary nodes
        (decoded,) = session(tmp_path / "packed.onnx", level).run(["Y"], {"X": np.zeros(1, np.float32)})
        assert decoded.dtype == weight.dtype and decoded.shape == weight.shape
        assert decoded.tobytes() == weight.tobytes()


@pytest.mark.parametrize("dtype", [np.float64, ml_dtypes.bfloat16], ids=["fp64", "bf16"])
def test_bitmask_other_float_types(tmp_path, dtype):
    weight = sparse_tensor((33, 20), 0.6, dtype)
    src = save(weight_model(weight), tmp_path / "dense.onnx")
    report = compress_file(src, tmp_path / "packed.onnx")
    assert [t["name"] for t in report["tensors"]] == ["W"]
    assert numpy_decode(initializers(tmp_path / "packed.onnx"), "W", weight.shape).tobytes() == weight.tobytes()
    if dtype is np.float64:  # onnxruntime's Python binding cannot hand back bfloat16 arrays
        (decoded,) = session(tmp_path / "packed.onnx").run(["Y"], {"X": np.zeros(1, np.float32)})
        assert decoded.tobytes() == weight.tobytes()


def test_candidates_and_thresholds(tmp_path):
    """Without targets: every float initializer of rank >= 2 with at least min_sparsity zeros."""
    inits = {"sparse": sparse_tensor((32, 32), 0.5, np.float32, 1, False),
             "dense": np.random.default_rng(0).standard_normal((32, 32)).astype(np.float32),
             "light": sparse_tensor((32, 32), 0.1, np.float32, 2, False),
             "vector": sparse_tensor((32,), 0.9, np.float32, 3, False)}
    src = save(linear_chain(inits), tmp_path / "dense.onnx")
    report = compress_file(src, tmp_path / "packed.onnx")
    assert [t["name"] for t in report["tensors"]] == ["sparse"]
    assert [s["name"] for s in report["skipped"]] == ["light"] and "min_sparsity" in report["skipped"][0]["reason"]
    assert_same_outputs(src, tmp_path / "packed.onnx")
    stored = initializers(tmp_path / "packed.onnx")
    for name in ("dense", "light", "vector"):  # untouched, bit for bit
        assert stored[name].tobytes() == inits[name].tobytes()
    assert compress_file(src, tmp_path / "all.onnx", min_sparsity=0.05)["totals"]["tensors"] == 2


def test_compressing_twice_reuses_the_shared_table(tmp_path):
    weights = {"a": sparse_tensor((32, 32), 0.5, np.float32, 1, False),
               "b": sparse_tensor((32, 32), 0.5, np.float32, 2, False)}
    src = save(linear_chain(weights), tmp_path / "dense.onnx")
    model = load_model(src)
    targets = discover_targets(model)
    assert compress_weights(model, targets[:1])["totals"]["tensors"] == 1
    assert compress_weights(model, discover_targets(model))["totals"]["tensors"] == 1  # only b is left
    save_model(model, tmp_path / "packed.onnx")
    stored = initializers(tmp_path / "packed.onnx")
    assert sum(name.startswith("onnxprune.bitmask.table") for name in stored) == 1
    assert_same_outputs(src, tmp_path / "packed.onnx")


def test_old_opset_is_refused(tmp_path):
    model = weight_model(sparse_tensor((8, 8), 0.5, np.float32))
    model.opset_import[0].version = 12
    with pytest.raises(UserError, match="opset >= 13"):
        compress_weights(load_model(save(model, tmp_path / "old.onnx")))


# ------------------------------------------------------------- compressed: whole pruned models


def test_file_at_half_sparsity_is_at_most_60_percent(tmp_path):
    """A model whose weights dominate the file: MatMul, Gemm(transB), Transpose+MatMul, fp16 Cast+MatMul."""
    layers = [Dense("MatMul", 256, 256), Dense("Gemm", 256, 256, trans_b=True, bias=True),
              Dense("TransposeMatMul", 256, 256), Dense("CastMatMul", 256, 256)]
    dense = save(chain_model(layers), tmp_path / "dense.onnx")
    pruned, packed = tmp_path / "pruned.onnx", tmp_path / "packed.onnx"
    prune(dense, pruned, "--method", "magnitude", "--sparsity", "0.5")
    report = compress_file(pruned, packed, targets=True)
    assert report["totals"]["tensors"] == 4
    ratio = os.path.getsize(packed) / os.path.getsize(pruned)
    assert ratio <= 0.60, f"compressed file is {ratio:.1%} of the pruned dense file"
    assert_same_outputs(pruned, packed)
    assert load_seconds(packed) < load_seconds(pruned) + 2.0


@pytest.mark.parametrize("pattern", [["--sparsity", "0.5"], ["--pattern", "2:4"]], ids=["50%", "2:4"])
@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_hf_model_compresses_exactly(tmp_path, hf_model, arch, pattern):
    pruned, packed = tmp_path / "pruned.onnx", tmp_path / "packed.onnx"
    prune(hf_model(arch).onnx_path, pruned, "--method", "magnitude", *pattern)
    report = compress_file(pruned, packed, targets=True)
    assert report["totals"]["tensors"] == hf_model(arch).selected
    assert report["totals"]["ratio"] <= 0.60  # the pruned weights; embeddings and the graph stay as they were
    assert os.path.getsize(packed) < os.path.getsize(pruned)
    assert_same_outputs(pruned, packed)
    before, after = initializers(pruned), initializers(packed)
    encoded = {t["name"] for t in report["tensors"]}
    for name in before.keys() - encoded:  # everything else bit for bit
        assert after[name].dtype == before[name].dtype and after[name].tobytes() == before[name].tobytes(), name
    for name in encoded:
        assert numpy_decode(after, name, before[name].shape).tobytes() == before[name].tobytes(), name


# ----------------------------------------------------------------------------- TensorRT


def rows_for(path, **options) -> list[dict]:
    model = load_model(path)
    return tensorrt_eligibility(model, select_targets(discover_targets(model)), **options)


def test_tensorrt_two_four_model_is_eligible(tmp_path, hf_model):
    pruned = tmp_path / "bert-2of4.onnx"
    prune(hf_model("bert").onnx_path, pruned, "--method", "magnitude", "--pattern", "2:4")
    rows = rows_for(pruned)
    assert len(rows) == hf_model("bert").selected
    for row in rows:
        assert row["k"] % 4 == 0 and row["two_four_valid"] and row["eligible"] and not row["reasons"], row
        assert not row["likely_fast"] and any("likely slow" in n for n in row["notes"])  # 48/64 wide
        assert row["op"] in ("MatMul", "Gemm") and not row["quantized"]
    table = eligibility_markdown(rows)
    assert f"{len(rows)} of {len(rows)} layers eligible" in table and table.count("\n| `") == len(rows)


def test_tensorrt_dense_model_is_not_eligible(hf_model):
    rows = rows_for(hf_model("llama").onnx_path)
    assert rows and not any(r["eligible"] or r["two_four_valid"] for r in rows)
    assert all(any("not 2:4" in reason for reason in r["reasons"]) for r in rows)


def test_tensorrt_conv_with_three_input_channels(tmp_path):
    dense = save(conv_model(3), tmp_path / "conv.onnx")
    pruned = tmp_path / "conv-2of4.onnx"
    prune(dense, pruned, "--method", "magnitude", "--pattern", "2:4", "--skip-incompatible")
    first, second = rows_for(pruned)
    assert first["op"] == "Conv" and first["shape"] == [16, 3, 3, 3] and not first["eligible"]
    assert any("K" in reason and "multiple of 4" in reason for reason in first["reasons"]), first["reasons"]
    assert second["shape"] == [16, 16, 3, 3] and second["eligible"] and second["two_four_valid"]
    assert second["k"] == 16 * 9 and second["out"] == 16


def single_conv(weight: np.ndarray, group: int = 1) -> onnx.ModelProto:
    out, channels = weight.shape[0], weight.shape[1] * group
    nodes = [helper.make_node("Conv", ["X", "W"], ["Y"], name="/layers.0/conv/Conv", group=group, pads=[1, 1, 1, 1])]
    return make_model(nodes, [helper.make_tensor_value_info("X", TensorProto.FLOAT, [BATCH, channels, 8, 8])],
                      [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [BATCH, out, 8, 8])], {"W": weight})


def test_tensorrt_grouped_conv_and_alignment(tmp_path):
    weight = sparse_tensor((512, 32, 3, 3), 0.0, np.float32, specials=False)
    weight[:, 0::4] = weight[:, 1::4] = 0  # 2 zeros in every 4 input channels at each kernel tap
    (row,) = rows_for(save(single_conv(weight, group=2), tmp_path / "group.onnx"))
    assert row["two_four_valid"] and not row["eligible"] and "group" in row["reasons"][0]
    (row,) = rows_for(save(single_conv(weight), tmp_path / "conv.onnx"))
    assert row["eligible"] and row["likely_fast"] and row["k"] == 288 and not row["notes"]


@pytest.mark.parametrize("zero_point", [0, 3])
@pytest.mark.parametrize("float_weights", [False, True], ids=["int8", "QDQ-float"])
def test_tensorrt_quantized_weights(tmp_path, zero_point, float_weights):
    """int8 W -> DequantizeLinear -> MatMul, or float W -> QuantizeLinear -> DequantizeLinear -> MatMul."""
    weight = np.random.default_rng(0).integers(1, 100, size=(256, 256)).astype(np.int8)
    weight.reshape(64, 4, 256)[:, :2] = 0  # 2:4 along K (stored [K, N])
    scale = np.array(0.01, np.float32)
    quant = {"scale": scale, "zp": np.array(zero_point, np.int8)}
    if float_weights:
        quant["W"] = weight.astype(np.float32) * scale
        nodes = [helper.make_node("QuantizeLinear", ["W", "scale", "zp"], ["Wq"], name="/layers.0/fc/Quantize")]
    else:
        quant["W"] = weight
        nodes = []
    nodes += [helper.make_node("DequantizeLinear", ["Wq" if float_weights else "W", "scale", "zp"], ["Wd"],
                               name="/layers.0/fc/Dequantize"),
              helper.make_node("MatMul", ["X", "Wd"], ["Y"], name="/layers.0/fc/MatMul")]
    model = make_model(nodes, [helper.make_tensor_value_info("X", TensorProto.FLOAT, [BATCH, 256])],
                       [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [BATCH, 256])], quant)
    path = save(model, tmp_path / "qdq.onnx")
    assert rows_for(path, include_quantized=False) == []  # not float targets
    (row,) = rows_for(path)
    assert row["quantized"] and row["op"] == "MatMul" and row["k"] == 256
    assert row["two_four_valid"] == (float_weights or zero_point == 0)  # codes 0 are not zeros when zp = 3
    assert row["dtype"] == ("FLOAT" if float_weights else "INT8")
    assert row["eligible"] == (zero_point == 0), row["reasons"]
    assert "(Q/DQ)" in eligibility_markdown([row])
