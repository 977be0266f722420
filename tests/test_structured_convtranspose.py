"""Structured pruning through ConvTranspose (the upsampling heads of segmentation and text-detection
models such as PP-OCR det): its weight is [C_in, C_out/group, *kernel], so it is a producer on
weight axis 1 and a consumer on weight axis 0; grouped and depthwise ones pass the channel through,
losing whole groups as grouped Conv does.

The central check is the one of test_structured: once the producer rows and consumer columns of
some channels are zeroed, pruning at that sparsity removes exactly them and the smaller model's
outputs equal the zeroed dense model's, here with stride 2, asymmetric pads and output_padding.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphs import save
from onnxprune.calibration import calibrate
from onnxprune.model_io import load_model
from onnxprune.structured import METHOD_NEEDS, StructuredPlan
from test_structured import assert_zeroed_channels_removed_exactly, prune_file, run
from test_structured_concat import Net as ConvNet

UPSAMPLE = {"strides": [2, 2], "pads": [1, 0, 0, 1], "output_padding": [1, 0]}


class Net(ConvNet):
    """test_structured_concat's CNN builder (Conv + SiLU layers) with ConvTranspose, BN and Relu."""

    def array(self, *shape, scale: float = 0.3) -> np.ndarray:
        return (self.rng.standard_normal(shape) * scale).astype(np.float32)

    def conv_t(self, name: str, x: str, out: int, k: int = 3, group: int = 1, bias: bool = True, **attrs) -> str:
        """ConvTranspose: weight [C_in, C_out/group, k, k]."""
        self.inits[f"{name}.weight"] = self.array(self.channels[x], out // group, k, k)
        inputs = [x, f"{name}.weight"]
        if bias:
            self.inits[f"{name}.bias"] = self.array(out, scale=0.1)
            inputs.append(f"{name}.bias")
        return self.node("ConvTranspose", inputs, f"{name}.convT", out, group=group, **attrs)

    def bn(self, name: str, x: str) -> str:
        c = self.channels[x]
        for key, values in (("scale", 1 + self.array(c, scale=0.1)), ("shift", self.array(c, scale=0.1)),
                            ("mean", self.array(c, scale=0.1)), ("var", 1 + np.abs(self.array(c, scale=0.1)))):
            self.inits[f"{name}.{key}"] = values
        return self.node("BatchNormalization", [x, *(f"{name}.{k}" for k in ("scale", "shift", "mean", "var"))],
                         f"{name}.bn", c)

    def relu(self, x: str) -> str:
        return self.node("Relu", [x], f"{x}.relu", self.channels[x])

    def model(self, y: str, opset: int = 17, dims=("batch", None, None, None)) -> onnx.ModelProto:
        return super().model(y, opset, dims)  # upsampled: the output's sizes are not the input's


def upsampling_head() -> onnx.ModelProto:
    """PP-OCR det's head in small: conv → SiLU → ConvTranspose (stride 2, pads, output_padding)
    → BN → Relu → ConvTranspose (stride 2) → Relu → 1x1 conv → Y."""
    net = Net()
    a = net.conv("layers.0", "X", 8, k=3)
    b = net.relu(net.bn("layers.1", net.conv_t("layers.1", a, 8, **UPSAMPLE)))
    c = net.relu(net.conv_t("layers.2", b, 6, k=2, bias=False, strides=[2, 2]))
    return net.model(net.conv("layers.3", c, 2, k=1))


def test_conv_transpose_is_producer_and_consumer(tmp_path):
    source = save(upsampling_head(), tmp_path / "model.onnx")
    report = assert_zeroed_channels_removed_exactly(tmp_path, source, 0.5, ("conv",), feeds_batch=5)
    pairs = {(g.producers[0], g.consumers[0]): (g.units_before, g.units_after) for g in report.pruned}
    assert pairs == {("/layers.0.conv/Conv", "/layers.1.convT/ConvTranspose"): (8, 4),
                     ("/layers.1.convT/ConvTranspose", "/layers.2.convT/ConvTranspose"): (8, 4),
                     ("/layers.2.convT/ConvTranspose", "/layers.3.conv/Conv"): (6, 3)}, pairs
    shapes = {t.name: tuple(t.dims) for t in onnx.load(str(tmp_path / "pruned.onnx")).graph.initializer}
    assert shapes["layers.1.weight"] == (4, 4, 3, 3) and shapes["layers.1.bias"] == (4,)  # [C_in, C_out, k, k]
    assert shapes["layers.2.weight"] == (4, 3, 2, 2) and shapes["layers.3.weight"] == (2, 3, 1, 1)


def grouped_model(group: int, out: int) -> onnx.ModelProto:
    """conv (3→8) → SiLU → grouped ConvTranspose (8→out, stride 2) → Relu → 1x1 conv → Y."""
    net = Net(seed=1)
    a = net.conv("layers.0", "X", 8, k=3)
    b = net.relu(net.conv_t("layers.1", a, out, group=group, **UPSAMPLE))
    return net.model(net.conv("layers.2", b, 2, k=1))


@pytest.mark.parametrize("group,out", [(4, 12), (8, 8)], ids=["grouped", "depthwise"])
def test_grouped_conv_transpose_loses_whole_groups(tmp_path, group, out):
    source = save(grouped_model(group, out), tmp_path / "model.onnx")
    report = assert_zeroed_channels_removed_exactly(tmp_path, source, 0.5, ("conv",), feeds_batch=5)
    (record,) = [g for g in report.pruned if g.producers == ["/layers.0.conv/Conv"]]
    assert record.consumers == ["/layers.2.conv/Conv"] and (record.units_before, record.units_after) == (group, group // 2)
    pruned = onnx.load(str(tmp_path / "pruned.onnx"))
    node = next(n for n in pruned.graph.node if n.op_type == "ConvTranspose")
    assert helper.get_attribute_value(next(a for a in node.attribute if a.name == "group")) == group // 2
    shapes = {t.name: tuple(t.dims) for t in pruned.graph.initializer}
    # half the groups: their input channels (weight axis 0) and outputs (bias); axis 1 stays one group's
    assert shapes["layers.1.weight"] == (4, out // group, 3, 3) and shapes["layers.1.bias"] == (out // 2,)
    assert shapes["layers.2.weight"] == (2, out // 2, 1, 1)


def test_grouped_conv_transpose_of_concatenated_channels_is_refused(tmp_path):
    net = Net()
    a, b = net.conv("layers.0", "X", 4, k=3), net.conv("layers.1", "X", 4, k=3)
    joined = net.node("Concat", [a, b], "layers.2.cat", 8, axis=1)
    y = net.conv("layers.3", net.relu(net.conv_t("layers.3", joined, 8, group=2, **UPSAMPLE)), 2, k=1)
    plan = StructuredPlan(load_model(save(net.model(y), tmp_path / "model.onnx")), ("conv",))
    reasons = {g.producers[0].target.node_name: g.reason for g in plan.groups}
    assert "grouped convolution of channels joined by Concat" in reasons["/layers.0.conv/Conv"], reasons


# ---------------------------------------------------------------------- calibrated scores


def consumer_model(bias="input", dead=()) -> onnx.ModelProto:
    """conv (3→8) → SiLU → Relu → ConvTranspose consumer (8→4, stride 2, pads, output_padding) → Y, its
    bias as input B ("input"), as an Add of a constant of shape `bias` after it (paddle2onnx's
    (1, C, 1, 1), or a (W,) one that is no bias), or none ("none"). Channels `dead` never pass the
    Relu (bias -100), but get the largest ConvTranspose weights."""
    net = Net(seed=2)
    a = net.relu(net.conv("layers.0", "X", 8, k=3))  # SiLU then Relu: exact zeros
    net.inits["layers.0.bias"] = np.where(np.isin(np.arange(8), dead), -100.0, 3.0).astype(np.float32)
    y = net.conv_t("layers.1", a, 4, bias=bias == "input", **UPSAMPLE)
    net.inits["layers.1.weight"][list(dead)] *= 10
    if isinstance(bias, tuple):
        net.inits["layers.1.add"] = net.array(*bias)
        y = net.node("Add", [y, "layers.1.add"], "layers.1.biased", 4)
    return net.model(y)


def samples(count: int = 6, seed: int = 3, width: int = 6) -> list[dict[str, np.ndarray]]:
    """Inputs [2, 3, 7, width]: the ConvTranspose output is [2, C, 15, 2·width]."""
    rng = np.random.default_rng(seed)
    return [{"X": (rng.standard_normal((2, 3, 7, width)) + 0.5).astype(np.float32)} for _ in range(count)]


def calibrated(source, width: int = 6):
    model = load_model(source)
    return calibrate(model, [StructuredPlan(model).consumers()], samples(width=width), METHOD_NEEDS["mama"])


def test_wanda_removes_the_channels_a_conv_transpose_never_sees(tmp_path):
    source = save(consumer_model(dead=(1, 5)), tmp_path / "model.onnx")
    stats = calibrated(source)
    assert np.shape(stats["layers.1.weight"]["sq_sum"]) == (3 * 3 * 8,)  # (kh, kw, C_in) columns
    wanda = prune_file(source, tmp_path / "wanda.onnx", 0.25, "wanda", stats=stats).pruned[0]
    l1 = prune_file(source, tmp_path / "l1.onnx", 0.25, "l1").pruned[0]
    assert wanda.consumers == ["/layers.1.convT/ConvTranspose"] and wanda.removed == [1, 5]
    assert not {1, 5} & set(l1.removed)  # by weight norm they are the largest
    dense = [run(source, s)[0] for s in samples()]
    assert all(np.allclose(d, run(tmp_path / "wanda.onnx", s)[0], atol=1e-5) for d, s in zip(dense, samples()))


@pytest.mark.parametrize("bias", ["input", (1, 4, 1, 1), "none"], ids=["bias", "bias-add", "added-bias"])
def test_mama_moves_the_mean_through_a_strided_conv_transpose(tmp_path, bias):
    """A stride-2 ConvTranspose gives each output pixel a different subset of kernel taps, so the
    removed channels' contribution is not one constant per channel even for a constant input; the
    move adds its mean over every output pixel and sample (the calibration rows are the output
    pixels), the least-squares constant: E‖e − ē‖² = E‖e‖² − ‖ē‖², ē the per-channel mean of e."""
    source = save(consumer_model(bias), tmp_path / "model.onnx")
    stats = calibrated(source)
    wanda = prune_file(source, tmp_path / "wanda.onnx", 0.5, "wanda", stats=stats)
    mama = prune_file(source, tmp_path / "mama.onnx", 0.5, "mama", stats=stats, add_bias=bias == "none")
    assert mama.pruned[0].removed == wanda.pruned[0].removed and mama.pruned[0].bias_moved is True
    errors = np.concatenate([run(source, s)[0] - run(tmp_path / "wanda.onnx", s)[0] for s in samples()])
    mean = errors.mean(axis=(0, 2, 3))
    error_wanda = float(np.mean(errors ** 2))
    error_mama = float(np.mean(np.concatenate([run(source, s)[0] - run(tmp_path / "mama.onnx", s)[0]
                                               for s in samples()]) ** 2))
    assert np.mean(mean ** 2) > 0.05 * error_wanda  # the removed channels have non-zero means
    assert np.isclose(error_mama, error_wanda - np.mean(mean ** 2), rtol=1e-4), (error_mama, error_wanda)


def test_an_added_constant_that_varies_along_the_width_is_no_bias(tmp_path):
    """Y is [2, 4, 15, 4]: a (4,) constant has the bias' size but adds along the width."""
    source = save(consumer_model((4,)), tmp_path / "model.onnx")
    mama = prune_file(source, tmp_path / "mama.onnx", 0.5, "mama", stats=calibrated(source, width=2))
    assert mama.pruned[0].bias_moved is False
    before, after = ({t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
                     for path in (source, tmp_path / "mama.onnx"))
    np.testing.assert_array_equal(after["layers.1.add"], before["layers.1.add"])


# ---------------------------------------------------------------------------- real model


def test_ppocr_det_upsampling_head_is_pruned_exactly(tmp_path):
    """PP-OCRv4 det as rapidocr ships it (paddle2onnx: Constant-node weights, bias as a separate Add)."""
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    source = None if spec is None or spec.origin is None else \
        Path(spec.origin).parent / "models" / "ch_PP-OCRv4_det_infer.onnx"
    if source is None or not source.is_file():
        pytest.skip("rapidocr_onnxruntime is not installed")
    report = assert_zeroed_channels_removed_exactly(tmp_path, source, 0.3, ("conv",), feeds_batch=32)  # 32 x 32
    assert not report.refused, [(g.producers, g.reason) for g in report.refused]
    pruned = {(p, c) for g in report.pruned for p in g.producers for c in g.consumers}
    assert {("p2o.Conv.61", "p2o.ConvTranspose.0"), ("p2o.ConvTranspose.0", "p2o.ConvTranspose.2")} <= pruned
