"""Weights the exporter assembled from pieces: torch's LSTM export stores W and R in torch's gate
order (i, f, g, o) and feeds the LSTM Concat(Slice(C)...) in ONNX's order (i, o, f, c). Such a block
permutation is one chain step; the pruned weight is written back into C in its own layout."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import cli
from graphs import make_model, save, weight
from onnxprune.model_io import load_model
from onnxprune.targets import discover

H, I, T = 16, 16, 6
TORCH_TO_ONNX = [(0, H), (3 * H, 4 * H), (H, 2 * H), (2 * H, 3 * H)]  # i, o, f, c from i, f, g, o
X_INFO = helper.make_tensor_value_info("X", TensorProto.FLOAT, [T, 1, I])
Y_INFO = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [T, 1, 1, H])
STORED = {"C_W": weight((4 * H, I), 1) * 0.3, "C_R": weight((4 * H, H), 2) * 0.3}


def _const(name, array):
    return helper.make_node("Constant", [], [name], name=f"{name}/Constant", value=numpy_helper.from_array(array))


def _assembled(name: str, ranges) -> list[onnx.NodeProto]:
    """Unsqueeze(Concat(Slice(name, begin, end, axis 0) for each range)) -> `name`_op."""
    nodes, parts = [_const(f"{name}/axes", np.array([0], np.int64))], []
    for j, (begin, end) in enumerate(ranges):
        nodes += [_const(f"{name}/s{j}", np.array([begin], np.int64)), _const(f"{name}/e{j}", np.array([end], np.int64)),
                  helper.make_node("Slice", [name, f"{name}/s{j}", f"{name}/e{j}", f"{name}/axes"], [f"{name}/p{j}"],
                                   name=f"/layers.0/rnn/{name}/Slice_{j}")]
        parts.append(f"{name}/p{j}")
    return nodes + [helper.make_node("Concat", parts, [f"{name}/cat"], name=f"/layers.0/rnn/{name}/Concat", axis=0),
                    helper.make_node("Unsqueeze", [f"{name}/cat", f"{name}/axes"], [f"{name}_op"],
                                     name=f"/layers.0/rnn/{name}/Unsqueeze")]


def _permuted(stored: np.ndarray) -> np.ndarray:
    return np.concatenate([stored[b:e] for b, e in TORCH_TO_ONNX])[None]


def assembled_lstm(w_ranges=TORCH_TO_ONNX) -> onnx.ModelProto:
    """W and R stored as Constant nodes in torch's gate order, assembled as torch exports them."""
    nodes = [_const(name, array) for name, array in STORED.items()]
    nodes += _assembled("C_W", w_ranges) + _assembled("C_R", TORCH_TO_ONNX)
    nodes.append(helper.make_node("LSTM", ["X", "C_W_op", "C_R_op"], ["Y"], name="/layers.0/rnn/LSTM", hidden_size=H))
    return make_model(nodes, [X_INFO], [Y_INFO], {})


def direct_lstm(w: np.ndarray, r: np.ndarray) -> onnx.ModelProto:
    node = helper.make_node("LSTM", ["X", "W", "R"], ["Y"], name="/layers.0/rnn/LSTM", hidden_size=H)
    return make_model([node], [X_INFO], [Y_INFO], {"W": w, "R": r})


def _stored(path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer} | {
        n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node if n.op_type == "Constant"}


def _apply(source, calib, out, method):
    args = ["apply", source, "-m", method, "-s", "0.5", "-o", out, "--report", out.with_suffix(".json"),
            "--include", "."]  # R too (the default selection leaves a recurrent R alone)
    return cli(*args, *(["--calib", calib] if method != "magnitude" else [])).ok()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "mama"])
def test_assembled_lstm_weights_pruned_like_direct_ones(tmp_path, method):
    assembled = save(assembled_lstm(), tmp_path / "assembled.onnx")
    direct = save(direct_lstm(_permuted(STORED["C_W"]), _permuted(STORED["C_R"])), tmp_path / "direct.onnx")
    found = {t.name: t.via for t in discover(load_model(assembled)).targets}
    assert found == {"C_W": ("Slice+Concat", "Unsqueeze"), "C_R": ("Slice+Concat", "Unsqueeze")}
    rng = np.random.default_rng(0)
    calib = tmp_path / "calib"  # one feed dict per sample (the input's first axis is time)
    calib.mkdir()
    for i in range(8):
        np.savez(calib / f"{i}.npz", X=rng.standard_normal((T, 1, I)).astype(np.float32))
    _apply(assembled, calib, tmp_path / "a.onnx", method)
    _apply(direct, calib, tmp_path / "d.onnx", method)
    pruned, reference = _stored(tmp_path / "a.onnx"), _stored(tmp_path / "d.onnx")
    # written back into the stored tensors, in torch's order: permuted, they are the direct weights
    assert not {"W", "R"} & set(pruned) and pruned["C_W"].shape == STORED["C_W"].shape
    for stored, fed in (("C_W", "W"), ("C_R", "R")):
        assert (reference[fed] == 0).mean() == pytest.approx(0.5, abs=0.02)
        np.testing.assert_allclose(_permuted(pruned[stored]), reference[fed], rtol=1e-4, atol=1e-5)
    x = {"X": rng.standard_normal((T, 1, I)).astype(np.float32)}
    (ya,), (yd,) = (ort.InferenceSession(str(tmp_path / p)).run(None, x) for p in ("a.onnx", "d.onnx"))
    np.testing.assert_allclose(ya, yd, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("ranges, extra_rows", [
    ([(0, H), (0, H), (2 * H, 3 * H), (3 * H, 4 * H)], 0),  # overlapping (rows H..2H never read)
    (TORCH_TO_ONNX, H),  # partial: the stored tensor has H more rows than the Slices read
], ids=["overlapping", "partial"])
def test_other_assemblies_are_left_alone(tmp_path, ranges, extra_rows):
    model = assembled_lstm(ranges)
    (node,) = [n for n in model.graph.node if n.output[0] == "C_W"]
    node.attribute[0].t.CopyFrom(numpy_helper.from_array(
        np.concatenate([STORED["C_W"], weight((extra_rows, I), 9)]), "C_W"))
    source = save(model, tmp_path / "model.onnx")
    assert {t.name for t in discover(load_model(source)).targets} == {"C_R"}
    _apply(source, None, tmp_path / "out.onnx", "magnitude")
    stored = _stored(tmp_path / "out.onnx")
    np.testing.assert_array_equal(stored["C_W"], _stored(source)["C_W"])
    assert (stored["C_R"] == 0).mean() == pytest.approx(0.5, abs=0.02)
    assert [t["name"] for t in json.loads((tmp_path / "out.json").read_text())["targets"]] == ["C_R"]
