"""Structured pruning of detector-style CNNs: channels through Resize between scales, Concat of
channels (the concat output keeps the other inputs' channels; its consumers lose the matching
columns at that input's offset) and Split of channels (each piece keeps its share, the split sizes
are rewritten), as in YOLOv8's C2f, CSP/ELAN and DenseNet blocks.

The central check is the one of test_structured: once the producer rows and consumer columns of
some channels are zeroed, pruning at that sparsity removes exactly them and the smaller model's
outputs equal the zeroed dense model's.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphs import make_model, save
from test_structured import assert_zeroed_channels_removed_exactly


class Net:
    """A hand-built CNN on X [batch, 3, h, w] (symbolic spatial sizes), layers named `/layers.N/...`."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {}
        self.channels = {"X": 3}

    def node(self, op: str, inputs: list[str], name: str, channels: int, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [name], name=f"/{name}/{op}", **attrs))
        self.channels[name] = channels
        return name

    def conv(self, name: str, x: str, out: int, k: int = 1, stride: int = 1) -> str:
        """Conv (+bias) and SiLU, as YOLOv8 writes them."""
        weight = self.rng.standard_normal((out, self.channels[x], k, k)) * 0.3
        self.inits[f"{name}.weight"] = weight.astype(np.float32)
        self.inits[f"{name}.bias"] = self.rng.standard_normal(out).astype(np.float32) * 0.1
        conv = self.node("Conv", [x, f"{name}.weight", f"{name}.bias"], f"{name}.conv", out,
                         pads=[k // 2] * 4, strides=[stride, stride])
        gate = self.node("Sigmoid", [conv], f"{name}.sigmoid", out)
        return self.node("Mul", [conv, gate], f"{name}.act", out)

    def model(self, y: str, opset: int = 17, dims=("batch", None, "h", "w")) -> onnx.ModelProto:
        inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 3, "h", "w"])]
        outputs = [helper.make_tensor_value_info(y, TensorProto.FLOAT, list(dims))]
        return make_model(self.nodes, inputs, outputs, self.inits, "cnn", opset)


def upsample_model() -> onnx.ModelProto:
    """Two stride-2 convs, nearest upsampling back to the first scale and a residual join: the
    shapes only resolve for even sizes, and the channel passes through Resize."""
    net = Net()
    a = net.conv("layers.0", "X", 8, k=3, stride=2)
    b = net.conv("layers.1", a, 8, k=3, stride=2)
    net.inits["up.scales"] = np.array([1, 1, 2, 2], dtype=np.float32)
    up = net.node("Resize", [b, "", "up.scales"], "layers.2.up", 8, mode="nearest")
    join = net.node("Add", [up, a], "layers.2.add", 8)
    return net.model(net.conv("layers.3", join, 4))


def test_channels_pass_through_resize_between_scales(tmp_path):
    source = save(upsample_model(), tmp_path / "upsample.onnx")
    # feeds give every symbolic dimension of a float input feeds_batch: 16 x 16 images (two stride-2 convs)
    report = assert_zeroed_channels_removed_exactly(tmp_path, source, 0.5, ("conv",), feeds_batch=16)
    joined = next(g for g in report.pruned if "/layers.0.conv/Conv" in g.producers)
    assert joined.producers == ["/layers.0.conv/Conv", "/layers.1.conv/Conv"] and joined.units_after == 4


def concat_model() -> onnx.ModelProto:
    """Two convs concatenated along the channel axis with the model input between them, then a
    conv over all of it, and a pooled head whose Reshape shape constant holds the concatenated
    channel count (19)."""
    net = Net()
    stem = net.conv("layers.0", "X", 8, k=3)
    a = net.conv("layers.1", stem, 8, k=3)
    b = net.conv("layers.2", stem, 8)
    joined = net.node("Concat", [a, "X", b], "layers.3.concat", 19, axis=1)
    c = net.conv("layers.4", joined, 4, k=3)
    net.inits["layers.5.shape"] = np.array([0, 19, -1], np.int64)
    flat = net.node("Reshape", [joined, "layers.5.shape"], "layers.5.flat", 19)
    pooled = net.node("ReduceMean", [flat], "layers.5.pool", 19, axes=[2], keepdims=0)
    net.inits["layers.6.weight"] = np.random.default_rng(1).standard_normal((19, 4)).astype(np.float32)
    head = net.node("MatMul", [pooled, "layers.6.weight"], "layers.6.fc", 4)
    net.inits["layers.7.shape"] = np.array([0, 4, 1, 1], np.int64)
    head = net.node("Reshape", [head, "layers.7.shape"], "layers.7.head", 4)
    return net.model(net.node("Add", [c, head], "Y", 4))


def weight_shapes(path) -> dict[str, tuple[int, ...]]:
    return {t.name: tuple(t.dims) for t in onnx.load(str(path)).graph.initializer}


def test_concat_of_channels_prunes_each_input_at_its_offset(tmp_path):
    source = save(concat_model(), tmp_path / "concat.onnx")
    report = assert_zeroed_channels_removed_exactly(tmp_path, source, 0.5, ("conv",), feeds_batch=6)
    by_producer = {g.producers[0]: g for g in report.groups}
    a, b = by_producer["/layers.1.conv/Conv"], by_producer["/layers.2.conv/Conv"]
    assert a.reason is None and b.reason is None and (a.units_after, b.units_after) == (4, 4)
    assert "/layers.4.conv/Conv" in a.consumers and "/layers.6.fc/MatMul" in b.consumers
    assert "reaches the model output Y" in by_producer["/layers.4.conv/Conv"].reason
    shapes = weight_shapes(tmp_path / "pruned.onnx")
    assert shapes["layers.1.weight"][0] == 4 and shapes["layers.2.weight"][0] == 4
    assert shapes["layers.4.weight"][1] == 4 + 3 + 4 and shapes["layers.6.weight"][0] == 11  # X's 3 channels stay
    pruned = onnx.load(str(tmp_path / "pruned.onnx"))
    flat = next(n for n in pruned.graph.node if n.name == "/layers.5.flat/Reshape")
    shape = next(t for t in pruned.graph.initializer if t.name == flat.input[1])
    assert list(onnx.numpy_helper.to_array(shape)) == [0, 11, -1]


SPLIT_FORMS = {"input": 17, "num_outputs": 18, "attribute": 11}  # how the split sizes are given, by opset


def c2f_model(form: str) -> onnx.ModelProto:
    """YOLOv8's C2f block: cv1 -> Split into halves -> a bottleneck with a shortcut on the second
    half, one without on its output -> Concat of all four pieces -> cv2. The shortcut couples the
    bottleneck's output with the second half; the bottleneck without one is a group of its own
    whose channels sit at the end of the Concat."""
    net = Net()
    stem = net.conv("layers.0", "X", 8, k=3)
    cv1 = net.conv("layers.1.cv1", stem, 12)
    halves = ["layers.1.half0", "layers.1.half1"]
    inputs, attrs = [cv1], {}
    if form == "input":
        net.inits["layers.1.sizes"] = np.array([6, 6], np.int64)
        inputs.append("layers.1.sizes")
    elif form == "num_outputs":
        attrs["num_outputs"] = 2
    else:
        attrs["split"] = [6, 6]
    net.nodes.append(helper.make_node("Split", inputs, halves, name="/layers.1/Split", axis=1, **attrs))
    net.channels.update(dict.fromkeys(halves, 6))
    inner = net.conv("layers.1.m0.cv1", halves[1], 6, k=3)
    m0 = net.node("Add", [halves[1], net.conv("layers.1.m0.cv2", inner, 6, k=3)], "layers.1.m0.add", 6)
    m1 = net.conv("layers.1.m1.cv2", net.conv("layers.1.m1.cv1", m0, 6, k=3), 6, k=3)
    joined = net.node("Concat", [*halves, m0, m1], "layers.1.concat", 24, axis=1)
    return net.model(net.conv("layers.2", net.conv("layers.1.cv2", joined, 8), 4), SPLIT_FORMS[form])


@pytest.mark.parametrize("form", sorted(SPLIT_FORMS))
def test_c2f_split_and_concat_prune_every_piece(tmp_path, form):
    source = save(c2f_model(form), tmp_path / "c2f.onnx")
    report = assert_zeroed_channels_removed_exactly(tmp_path, source, 0.5, ("conv",), feeds_batch=6)
    by_producer = {g.producers[0]: g for g in report.groups}
    cv1 = by_producer["/layers.1.cv1.conv/Conv"]
    # the shortcut joins the second half, the bottleneck's output and its last conv into cv1's group
    assert cv1.producers == ["/layers.1.cv1.conv/Conv", "/layers.1.m0.cv2.conv/Conv"] and cv1.units_after == 6
    assert sorted(cv1.consumers) == [f"/layers.1.{conv}.conv/Conv" for conv in ("cv2", "m0.cv1", "m1.cv1")]
    assert by_producer["/layers.1.m1.cv2.conv/Conv"].units_after == 3
    pruned = onnx.load(str(tmp_path / "pruned.onnx"))
    shapes = weight_shapes(tmp_path / "pruned.onnx")
    kept = {"half0": 6 - sum(u < 6 for u in cv1.removed), "half1": 6 - sum(u >= 6 for u in cv1.removed)}
    assert shapes["layers.1.cv1.weight"][0] == 6
    assert shapes["layers.1.cv2.weight"][1] == kept["half0"] + 2 * kept["half1"] + 3  # the second half twice
    split = next(n for n in pruned.graph.node if n.op_type == "Split")
    if form == "attribute":
        sizes = list(next(a for a in split.attribute if a.name == "split").ints)
    else:
        sizes = list(onnx.numpy_helper.to_array(next(t for t in pruned.graph.initializer if t.name == split.input[1])))
        assert all(a.name != "num_outputs" for a in split.attribute)
    assert sizes == [kept["half0"], kept["half1"]]


def split_consumers_model() -> onnx.ModelProto:
    """A conv split 4 + 8 along the channel axis, each piece read by its own conv; their sum feeds
    the last conv."""
    net = Net()
    a = net.conv("layers.0", net.conv("layers.stem", "X", 8, k=3), 12, k=3)
    net.inits["layers.1.sizes"] = np.array([4, 8], np.int64)
    pieces = ["layers.1.piece0", "layers.1.piece1"]
    net.nodes.append(helper.make_node("Split", [a, "layers.1.sizes"], pieces, name="/layers.1/Split", axis=1))
    net.channels.update(zip(pieces, (4, 8)))
    total = net.node("Add", [net.conv("layers.2", pieces[0], 6, k=3), net.conv("layers.3", pieces[1], 6)],
                     "layers.4.add", 6)
    return net.model(net.conv("layers.5", total, 4))


def test_split_pieces_feeding_different_consumers(tmp_path):
    source = save(split_consumers_model(), tmp_path / "split.onnx")
    report = assert_zeroed_channels_removed_exactly(tmp_path, source, 0.5, ("conv",), feeds_batch=6)
    split = next(g for g in report.pruned if g.producers == ["/layers.0.conv/Conv"])
    assert sorted(split.consumers) == ["/layers.2.conv/Conv", "/layers.3.conv/Conv"] and split.units_after == 6
    shapes = weight_shapes(tmp_path / "pruned.onnx")
    kept = 4 - sum(u < 4 for u in split.removed)
    assert (shapes["layers.2.weight"][1], shapes["layers.3.weight"][1]) == (kept, 6 - kept)
    pruned = onnx.load(str(tmp_path / "pruned.onnx"))
    sizes = next(t for t in pruned.graph.initializer if t.name == "layers.1.sizes")
    assert list(onnx.numpy_helper.to_array(sizes)) == [kept, 6 - kept]


def shuffle_model() -> onnx.ModelProto:
    """ShuffleNet's channel shuffle after a Concat: Reshape [b, 2, 8, hw], Transpose, Reshape back.
    Each concatenated half is spread over both shuffled groups: refused."""
    net = Net()
    stem = net.conv("layers.0", "X", 8, k=3)
    joined = net.node("Concat", [net.conv("layers.1", stem, 8, k=3), net.conv("layers.2", stem, 8)],
                      "layers.3.concat", 16, axis=1)
    net.inits["layers.3.groups"] = np.array([0, 2, 8, -1], np.int64)
    net.inits["layers.3.back"] = np.array([0, 16, -1], np.int64)
    grouped = net.node("Reshape", [joined, "layers.3.groups"], "layers.3.grouped", 2)
    swapped = net.node("Transpose", [grouped], "layers.3.swapped", 8, perm=[0, 2, 1, 3])
    shuffled = net.node("Reshape", [swapped, "layers.3.back"], "layers.3.shuffled", 16)
    pooled = net.node("ReduceMean", [shuffled], "layers.4.pool", 16, axes=[2], keepdims=0)
    net.inits["layers.5.weight"] = np.random.default_rng(1).standard_normal((16, 4)).astype(np.float32)
    return net.model(net.node("MatMul", [pooled, "layers.5.weight"], "Y", 4), dims=("batch", 4))


def test_channel_shuffle_after_concat_is_refused_with_its_reason(tmp_path):
    source = save(shuffle_model(), tmp_path / "shuffle.onnx")
    report = assert_zeroed_channels_removed_exactly(tmp_path, source, 0.5, ("conv",), feeds_batch=6)
    reasons = {g.producers[0]: g.reason for g in report.groups}
    for conv in ("/layers.1.conv/Conv", "/layers.2.conv/Conv"):
        assert "/layers.3.grouped/Reshape splits channels that a Split or Concat handed out" in reasons[conv]
    assert reasons["/layers.0.conv/Conv"] is None  # the rest of the model is still pruned


def paddle_bias_model() -> onnx.ModelProto:
    """paddle2onnx's bias: a Constant [C] reshaped to [1, C, 1, 1] and added after a bias-less Conv."""
    net = Net()
    stem = net.conv("layers.0", "X", 8, k=3)
    net.inits["layers.1.weight"] = net.rng.standard_normal((12, 8, 3, 3)).astype(np.float32)
    conv = net.node("Conv", [stem, "layers.1.weight"], "layers.1.conv", 12, pads=[1] * 4)
    bias = onnx.numpy_helper.from_array(net.rng.standard_normal(12).astype(np.float32), "layers.1.offset")
    net.nodes.append(helper.make_node("Constant", [], ["layers.1.offset"], name="/layers.1/Constant", value=bias))
    net.inits["layers.1.shape"] = np.array([1, 12, 1, 1], np.int64)
    broadcast = net.node("Reshape", ["layers.1.offset", "layers.1.shape"], "layers.1.broadcast", 12)
    biased = net.node("Add", [conv, broadcast], "layers.1.add", 12)
    return net.model(net.conv("layers.2", net.node("Relu", [biased], "layers.1.relu", 12), 4))


def test_a_reshaped_constant_bias_is_sliced_with_its_channels(tmp_path):
    source = save(paddle_bias_model(), tmp_path / "paddle.onnx")
    report = assert_zeroed_channels_removed_exactly(tmp_path, source, 0.5, ("conv",), feeds_batch=6)
    assert next(g for g in report.groups if g.producers == ["/layers.1.conv/Conv"]).units_after == 6
    pruned = onnx.load(str(tmp_path / "pruned.onnx"))
    reshape = next(n for n in pruned.graph.node if n.name == "/layers.1.broadcast/Reshape")
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in pruned.graph.initializer}
    assert arrays[reshape.input[0]].shape == (6,) and list(arrays[reshape.input[1]]) == [1, 6, 1, 1]
    assert not any(n.op_type == "Constant" for n in pruned.graph.node)  # the unsliced bias is gone

@pytest.mark.slow
def test_yolov8n_every_default_conv_group_is_pruned_exactly(tmp_path):
    """YOLOv8n as the nudenet wheel ships it: C2f, SPPF and the FPN's upsampled concats."""
    spec = importlib.util.find_spec("nudenet")
    source = None if spec is None or spec.origin is None else Path(spec.origin).parent / "320n.onnx"
    if source is None or not source.is_file():
        pytest.skip("nudenet is not installed")
    report = assert_zeroed_channels_removed_exactly(tmp_path, source, 0.3, ("conv",), feeds_batch=64)  # 64 x 64
    assert not report.refused, [(g.producers, g.reason) for g in report.refused]
    assert {"/model.2/cv1/conv/Conv", "/model.9/cv1/conv/Conv"} <= {p for g in report.pruned for p in g.producers}
