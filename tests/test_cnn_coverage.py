"""Convolutions of every form through calibration and the calibrated methods: grouped and
depthwise, 1-D / 2-D / 3-D, strides, dilations, explicit and SAME_* padding, ConvTranspose."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from onnxprune.calibration import calibrate
from onnxprune.statistics import activation_rows
from onnxprune.targets import discover_targets
from conftest import assert_runs_like, prune
from graphs import BATCH, make_model, save, weight


@dataclass(frozen=True)
class ConvSpec:
    """One Conv / ConvTranspose node: X[N, c_in, *spatial] → Y[N, c_out, ...]."""

    op: str = "Conv"
    c_in: int = 8
    c_out: int = 16
    kernel: tuple[int, ...] = (3, 3)
    spatial: tuple[int, ...] = (9, 9)
    group: int = 1
    attrs: dict = field(default_factory=dict, hash=False)

    def weight_shape(self) -> tuple[int, ...]:
        if self.op == "ConvTranspose":
            return (self.c_in, self.c_out // self.group, *self.kernel)
        return (self.c_out, self.c_in // self.group, *self.kernel)


SPECS = {
    "conv2d": ConvSpec(attrs={"pads": [1, 1, 1, 1]}),
    "grouped": ConvSpec(c_in=8, c_out=12, group=4, attrs={"pads": [1, 0, 1, 2]}),
    "depthwise": ConvSpec(c_in=8, c_out=8, group=8, attrs={"pads": [1, 1, 1, 1], "strides": [2, 2]}),
    "depthwise_multiplier": ConvSpec(c_in=4, c_out=8, group=4, kernel=(5, 5), attrs={"auto_pad": "SAME_UPPER"}),
    "conv1d": ConvSpec(c_in=6, c_out=10, kernel=(5,), spatial=(40,), attrs={"pads": [2, 1], "strides": [3]}),
    "conv1d_dilated": ConvSpec(c_in=6, c_out=8, kernel=(3,), spatial=(30,), attrs={"dilations": [4]}),
    "conv3d": ConvSpec(c_in=4, c_out=6, kernel=(2, 3, 3), spatial=(5, 7, 6), attrs={"pads": [0, 1, 1, 1, 1, 0]}),
    "same_upper": ConvSpec(kernel=(4, 3), spatial=(10, 7), attrs={"auto_pad": "SAME_UPPER", "strides": [3, 2]}),
    "same_lower": ConvSpec(kernel=(4, 4), spatial=(10, 9), attrs={"auto_pad": "SAME_LOWER", "strides": [2, 2]}),
    "valid_strided": ConvSpec(kernel=(3, 2), attrs={"auto_pad": "VALID", "strides": [2, 3]}),
    "conv_transpose": ConvSpec("ConvTranspose", c_in=8, c_out=6, attrs={"strides": [2, 2], "pads": [1, 0, 0, 1]}),
    "conv_transpose_grouped": ConvSpec("ConvTranspose", c_in=8, c_out=12, group=2, kernel=(3, 2), spatial=(5, 6),
                                       attrs={"strides": [2, 3], "output_padding": [1, 0], "dilations": [2, 1]}),
    "conv_transpose_1d_same": ConvSpec("ConvTranspose", c_in=4, c_out=4, kernel=(4,), spatial=(7,),
                                       attrs={"strides": [2], "auto_pad": "SAME_UPPER"}),
    "conv_transpose_output_shape": ConvSpec("ConvTranspose", c_in=4, c_out=8, kernel=(3, 3), spatial=(4, 5),
                                            attrs={"strides": [2, 2], "output_shape": [9, 10]}),
}


def single_conv_model(spec: ConvSpec, seed: int = 0) -> onnx.ModelProto:
    inits = {"conv.weight": weight(spec.weight_shape(), seed), "conv.bias": weight((spec.c_out,), seed + 1)}
    node = helper.make_node(spec.op, ["X", "conv.weight", "conv.bias"], ["Y"], name=f"/conv/{spec.op}",
                            group=spec.group, **spec.attrs)
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [BATCH, spec.c_in, *spec.spatial])]
    return make_model([node], inputs, [_output("Y", 2 + len(spec.spatial))], inits, spec.op)


def _output(name: str, rank: int):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"{name}_d{i}" for i in range(rank)])


@pytest.mark.parametrize("name", SPECS)
def test_rows_times_canonical_weight_is_the_onnxruntime_output(name):
    """The rows calibration computes are exactly what the canonical weight multiplies: per group,
    rows @ W_groupᵀ + b equals onnxruntime's output at every position."""
    spec = SPECS[name]
    model = single_conv_model(spec)
    x = np.random.default_rng(0).standard_normal((2, spec.c_in, *spec.spatial)).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]
    (target,) = discover_targets(ir.serde.deserialize_model(model))
    rows = activation_rows([x], target.consumers[0])
    canonical, bias = target.read(), target.read_bias()
    groups, tokens, k = rows.shape
    assert (groups, k) == (spec.group, target.layout.in_features)
    per_group = spec.c_out // spec.group
    computed = np.concatenate([rows[j] @ canonical[j * per_group:(j + 1) * per_group].T for j in range(groups)], 1)
    expected = np.moveaxis(y, 1, -1).reshape(-1, spec.c_out) - bias
    assert tokens == len(expected)
    np.testing.assert_allclose(computed, expected, rtol=1e-4, atol=1e-4)


def _chain(specs: list[ConvSpec], seed: int = 0) -> onnx.ModelProto:
    """The convolutions one after the other (Relu between), named as blocks."""
    nodes, inits, current = [], {}, "X"
    for i, spec in enumerate(specs):
        w, b = f"layers.{i}.weight", f"layers.{i}.bias"
        inits[w], inits[b] = weight(spec.weight_shape(), seed + i), weight((spec.c_out,), seed + 100 + i)
        nodes.append(helper.make_node(spec.op, [current, w, b], [f"c{i}"], name=f"/layers.{i}/{spec.op}",
                                      group=spec.group, **spec.attrs))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"/layers.{i}/Relu"))
        current = f"r{i}"
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [BATCH, specs[0].c_in, *specs[0].spatial])]
    return make_model(nodes, inputs, [_output(current, 2 + len(specs[0].spatial))], inits, "chain")


def test_grouped_statistics_equal_torch_unfold_per_group():
    """Σx² and the Hessian of a grouped conv, per group, equal a direct computation with
    torch.nn.functional.unfold on the same input."""
    spec = ConvSpec(c_in=8, c_out=8, group=2, attrs={"pads": [1, 1, 1, 1], "strides": [2, 1], "dilations": [1, 2]})
    model = ir.serde.deserialize_model(single_conv_model(spec))
    rng = np.random.default_rng(1)
    samples = [{"X": rng.standard_normal((1, 8, 9, 9)).astype(np.float32)} for _ in range(3)]
    targets = discover_targets(model)
    stats = calibrate(model, [targets], samples, frozenset({"sq_sum", "gram", "sum"}))["conv.weight"]
    assert stats["groups"] == 2 and stats["gram"].shape == (2, 36, 36) and stats["sq_sum"].shape == (2, 36)
    for j in range(2):
        patches = []
        for sample in samples:
            x = torch.from_numpy(sample["X"][:, 4 * j:4 * (j + 1)])
            unfolded = torch.nn.functional.unfold(x, (3, 3), dilation=(1, 2), padding=1, stride=(2, 1))  # [1, C·9, L]
            # unfold orders columns (C, kh, kw); the canonical weight orders K as (kh, kw, C).
            patches.append(unfolded[0].reshape(4, 9, -1).permute(2, 1, 0).reshape(-1, 36).double())
        rows = torch.cat(patches)
        np.testing.assert_allclose(stats["sq_sum"][j], rows.square().sum(0).numpy(), rtol=1e-5)
        np.testing.assert_allclose(stats["sum"][j], rows.sum(0).numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats["gram"][j], (rows.T @ rows).numpy(), rtol=1e-4, atol=1e-3)
    assert stats["tokens"] == 3 * 5 * 7  # positions: (9 + 2 - 3) // 2 + 1 rows, 9 + 2 - (2·2 + 1) + 1 columns


def test_two_convs_on_one_input_with_different_kernels_get_their_own_statistics():
    nodes = [helper.make_node("Conv", ["X", "a.weight"], ["A"], name="/layers.0/a/Conv", pads=[0, 0, 0, 0]),
             helper.make_node("Conv", ["X", "b.weight"], ["B"], name="/layers.0/b/Conv", pads=[1, 1, 1, 1])]
    inits = {"a.weight": weight((16, 16, 1, 1), 0), "b.weight": weight((16, 16, 3, 3), 1)}
    proto = make_model(nodes, [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 16, 6, 6])],
                       [_output(n, 4) for n in "AB"], inits)
    model = ir.serde.deserialize_model(proto)
    samples = [{"X": np.random.default_rng(0).standard_normal((1, 16, 6, 6)).astype(np.float32)}]
    stats = calibrate(model, [discover_targets(model)], samples, frozenset({"sq_sum"}))
    assert stats["a.weight"]["sq_sum"].shape == (16,) and stats["b.weight"]["sq_sum"].shape == (144,)


CNN_CHAIN = [
    ConvSpec(c_in=16, c_out=32, kernel=(3, 3), spatial=(12, 12), attrs={"pads": [1, 1, 1, 1]}),
    ConvSpec(c_in=32, c_out=32, kernel=(3, 3), group=32, attrs={"pads": [1, 1, 1, 1], "strides": [2, 2]}),
    ConvSpec(c_in=32, c_out=32, kernel=(3, 3), group=2, attrs={"auto_pad": "SAME_LOWER"}),
    ConvSpec(c_in=32, c_out=16, kernel=(2, 2), group=2, attrs={"auto_pad": "SAME_UPPER"}),
    ConvSpec(c_in=16, c_out=16, kernel=(3, 3), attrs={"dilations": [2, 2], "pads": [2, 2, 2, 2]}),
    ConvSpec("ConvTranspose", c_in=16, c_out=16, kernel=(4, 4), attrs={"strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ConvSpec(c_in=16, c_out=16, kernel=(1, 1)),
]
AUDIO_CHAIN = [
    ConvSpec(c_in=16, c_out=32, kernel=(5,), spatial=(64,), attrs={"pads": [2, 2], "strides": [2]}),
    ConvSpec(c_in=32, c_out=32, kernel=(3,), group=4, attrs={"dilations": [2], "pads": [2, 2]}),
    ConvSpec("ConvTranspose", c_in=32, c_out=16, kernel=(4,), group=2, attrs={"strides": [2], "auto_pad": "SAME_UPPER"}),
]
VOLUME_CHAIN = [
    ConvSpec(c_in=16, c_out=16, kernel=(3, 3, 3), spatial=(6, 8, 8), attrs={"pads": [1] * 6}),
    ConvSpec(c_in=16, c_out=16, kernel=(1, 3, 3), group=4, attrs={"strides": [1, 2, 2], "pads": [0, 1, 1, 0, 1, 1]}),
]


@pytest.fixture(scope="module", params=["cnn", "audio", "volume"])
def conv_chain(request, tmp_path_factory):
    specs = {"cnn": CNN_CHAIN, "audio": AUDIO_CHAIN, "volume": VOLUME_CHAIN}[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    source = save(_chain(specs), folder / "model.onnx")
    rng = np.random.default_rng(0)
    np.savez(folder / "calib.npz", X=rng.standard_normal((4, specs[0].c_in, *specs[0].spatial)).astype(np.float32))
    return source, folder / "calib.npz", specs


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "mama"])
@pytest.mark.parametrize("pattern", [["--sparsity", "0.5"], ["--pattern", "2:4"]], ids=["50%", "2:4"])
def test_every_calibrated_method_prunes_every_conv_form(conv_chain, tmp_path, method, pattern):
    source, calib, specs = conv_chain
    out, report_path = tmp_path / "pruned.onnx", tmp_path / "report.json"
    prune(source, out, "--method", method, *pattern, "--calib", str(calib), "--include", "weight",
          report=report_path).ok()
    report = json.loads(report_path.read_text())
    pruned = {t["name"]: t for t in report["targets"]}
    # N:M runs along each group's input channels: a depthwise conv (C/g = 1) cannot hold 2:4.
    cannot_hold = {f"layers.{i}.weight" for i, spec in enumerate(specs)
                   if pattern[0] == "--pattern" and (spec.c_in // spec.group) % 4}
    assert {s["name"] for s in report["skipped"]} == cannot_hold
    assert all("input channels=1 is not divisible by M=4" in s["reason"] for s in report["skipped"])
    assert set(pruned) == {f"layers.{i}.weight" for i in range(len(specs))} - cannot_hold
    for target in pruned.values():
        k = int(np.prod(target["shape"][1:])) if "Transpose" not in target["node"] else None
        assert target["sparsity"] == pytest.approx(0.5, abs=0.02 + (1 / k if k else 0.0))  # ⌊K·s⌋ of a tiny K
        assert target["nm_valid"] in (None, True)
    assert_runs_like(out, source)


def test_grouped_conv_n_m_runs_along_each_groups_input_channels(tmp_path):
    spec = ConvSpec(c_in=16, c_out=8, group=2, attrs={"pads": [1, 1, 1, 1]})  # C/g = 8
    source = save(single_conv_model(spec), tmp_path / "model.onnx")
    np.savez(tmp_path / "calib.npz", X=np.random.default_rng(0).standard_normal((2, 16, 9, 9)).astype(np.float32))
    out = tmp_path / "pruned.onnx"
    prune(source, out, "--method", "sparsegpt", "--pattern", "2:4", "--calib", str(tmp_path / "calib.npz"),
          "--include", "conv").ok()
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}["conv.weight"]
    zeros = (stored.reshape(8, 2, 4, 3, 3) == 0).sum(axis=2)  # groups of 4 consecutive input channels
    assert (zeros == 2).all()


def test_a_layer_calibration_cannot_handle_is_left_dense_with_the_reason(tmp_path):
    """Conv on an input of the wrong rank for its kernel (onnxruntime accepts a 1-D kernel on
    [N, C, L]; the attribute here claims 2-D): that layer is refused, the others pruned."""
    inits = {"layers.0.weight": weight((16, 16, 3), 0), "layers.1.weight": weight((16, 16), 1)}
    nodes = [helper.make_node("Conv", ["X", "layers.0.weight"], ["c"], name="/layers.0/Conv", pads=[1, 1]),
             helper.make_node("MatMul", ["X3", "layers.1.weight"], ["m"], name="/layers.1/MatMul")]
    proto = make_model(nodes, [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 16, 8]),
                               helper.make_tensor_value_info("X3", TensorProto.FLOAT, [1, 4, 16])],
                       [_output("c", 3), _output("m", 3)], inits)
    source = save(proto, tmp_path / "model.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", X=rng.standard_normal((2, 16, 8)).astype(np.float32),
             X3=rng.standard_normal((2, 4, 16)).astype(np.float32))
    model = ir.serde.deserialize_model(proto)
    conv_node = next(n for n in model.graph if n.op_type == "Conv")
    conv_node.attributes["kernel_shape"] = ir.AttrInt64s("kernel_shape", [3, 3])  # what calibration reads
    ir.save(model, str(tmp_path / "odd.onnx"))
    report_path = tmp_path / "report.json"
    prune(tmp_path / "odd.onnx", tmp_path / "pruned.onnx", "--method", "wanda", "--sparsity", "0.5",
          "--calib", str(tmp_path / "calib.npz"), report=report_path).ok()
    report = json.loads(report_path.read_text())
    assert [t["name"] for t in report["targets"]] == ["layers.1.weight"]
    (skipped,) = report["skipped"]
    assert skipped["name"] == "layers.0.weight" and "not calibrated" in skipped["reason"]
