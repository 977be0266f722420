"""Recurrent weights' statistics against ground truth: a numpy LSTM (checked against onnxruntime's)
records every hidden state R multiplies and every input W multiplies; calibration's Σx² and XᵀX
must be theirs, for one-step calls from a given state (streaming models such as silero VAD), longer
sequences, reverse and bidirectional layers, sequence_lens and batch-first layouts."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import cli
from graphs import make_model, save, weight
from onnxprune.calibration import calibrate
from onnxprune.model_io import load_model
from onnxprune.statistics import previous_states, sequence_rows
from onnxprune.targets import discover_targets

H, I, B = 16, 20, 2  # K of W and R at least 16: selected by default
NEEDS = frozenset({"sq_sum", "gram", "sum"})


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def reference_lstm(x, w, r, b, h0, c0, lengths, direction):
    """ONNX LSTM (gates i, o, f, c) step by step: Y [T, D, B, H] and, per direction, the hidden
    states R multiplied and the inputs W multiplied, one row per step that ran."""
    steps, batch, _ = x.shape
    directions = w.shape[0]
    y = np.zeros((steps, directions, batch, H))
    states, inputs = [[] for _ in range(directions)], [[] for _ in range(directions)]
    for d in range(directions):
        backwards = direction == "reverse" or (direction == "bidirectional" and d == 1)
        for s in range(batch):
            h, c = h0[d, s].astype(np.float64), c0[d, s].astype(np.float64)
            order = range(lengths[s])
            for t in reversed(order) if backwards else order:
                states[d].append(h)
                inputs[d].append(x[t, s])
                i, o, f, g = np.split(x[t, s] @ w[d].T + h @ r[d].T + b[d, :4 * H] + b[d, 4 * H:], 4)
                c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
                h = _sigmoid(o) * np.tanh(c)
                y[t, d, s] = h
    return y, [np.array(m) for m in states], [np.array(m) for m in inputs]


CASES = {  # name: (direction, steps, initial_h as, sequence_lens, layout)
    "one step from a given state": ("forward", 1, "input", None, 0),
    "forward": ("forward", 5, "input", None, 0),
    "forward from a zero state": ("forward", 5, None, None, 0),
    "initial_h an initializer": ("forward", 3, "initializer", None, 0),
    "reverse": ("reverse", 5, "input", None, 0),
    "bidirectional": ("bidirectional", 4, "input", None, 0),
    "sequence_lens": ("forward", 5, "input", [5, 3], 0),
    "reverse with sequence_lens": ("reverse", 5, "input", [2, 5], 0),
}


def _lstm_model(direction, steps, initial, lengths, layout):
    d = 2 if direction == "bidirectional" else 1
    inits = {"W": weight((d, 4 * H, I), 1) * 0.3, "R": weight((d, 4 * H, H), 2) * 0.3,
             "Bias": weight((d, 8 * H), 3) * 0.1}
    batch_major = (lambda *s: [s[1], s[0], *s[2:]]) if layout else (lambda *s: list(s))
    state_shape = [B, d, H] if layout else [d, B, H]
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, batch_major(steps, B, I)),
              helper.make_tensor_value_info("C0", TensorProto.FLOAT, state_shape)]
    if initial == "input":
        inputs.append(helper.make_tensor_value_info("H0", TensorProto.FLOAT, state_shape))
    elif initial == "initializer":
        inits["H0"] = np.random.default_rng(4).standard_normal(state_shape).astype(np.float32)
    if lengths is not None:
        inputs.append(helper.make_tensor_value_info("lens", TensorProto.INT32, [B]))
    node = helper.make_node("LSTM", ["X", "W", "R", "Bias", "lens" if lengths else "", "H0" if initial else "", "C0"],
                            ["Y"], name="/layers.0/rnn/LSTM", hidden_size=H, direction=direction, layout=layout)
    y_shape = [B, steps, d, H] if layout else [steps, d, B, H]
    out = helper.make_tensor_value_info("Y", TensorProto.FLOAT, y_shape)
    return make_model([node], inputs, [out], inits), inits


@pytest.mark.parametrize("case", CASES)
def test_recurrent_statistics_are_those_of_the_true_states(tmp_path, case):
    direction, steps, initial, lengths, layout = CASES[case]
    model, inits = _lstm_model(direction, steps, initial, lengths, layout)
    path = save(model, tmp_path / "lstm.onnx")
    session = ort.InferenceSession(str(path))
    names = {i.name for i in session.get_inputs()}
    ir_model = load_model(path)
    targets = discover_targets(ir_model)
    assert {t.name for t in targets} == {"W", "R"}
    rng = np.random.default_rng(0)
    d = inits["W"].shape[0]
    samples, states, inputs = [], [[] for _ in range(d)], [[] for _ in range(d)]
    for _ in range(2):
        x = rng.standard_normal((steps, B, I)).astype(np.float32)
        h0 = inits.get("H0", rng.standard_normal((B, d, H) if layout else (d, B, H)).astype(np.float32))
        c0 = rng.standard_normal(h0.shape).astype(np.float32)
        to_time_major = (lambda a: a.swapaxes(0, 1)) if layout else (lambda a: a)
        feed = {"X": to_time_major(x).copy(), "C0": c0, "H0": h0,
                "lens": np.array(lengths or [steps] * B, np.int32)}
        feed = {k: v for k, v in feed.items() if k in names}
        y, seen_states, seen_inputs = reference_lstm(
            x, inits["W"], inits["R"], inits["Bias"], to_time_major(h0) if initial else np.zeros((d, B, H)),
            to_time_major(c0), lengths or [steps] * B, direction)
        (ort_y,) = session.run(None, feed)
        np.testing.assert_allclose(ort_y.transpose(1, 2, 0, 3) if layout else ort_y, y, atol=1e-5)  # the reference is right
        for j in range(d):
            states[j].append(seen_states[j])
            inputs[j].append(seen_inputs[j])
        samples.append(feed)
    stats = calibrate(ir_model, [targets], samples, NEEDS)
    truth = [np.concatenate(s) for s in states]
    gram = np.stack([t.T @ t for t in truth])
    np.testing.assert_allclose(np.reshape(stats["R"]["gram"], gram.shape), gram, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.reshape(stats["R"]["sq_sum"], (d, H)), np.stack([(t ** 2).sum(0) for t in truth]),
                               rtol=1e-4, atol=1e-5)
    # A zero state (no initial_h) adds nothing to XᵀX and is not counted; every other state is.
    counted = [t[np.any(np.stack(truth) != 0, axis=(0, 2))] for t in truth]
    assert stats["R"]["tokens"] == len(counted[0])
    assert stats["R"].get("groups", 1) == d  # R[d] sees direction d's states
    x_rows = np.concatenate(inputs[0])  # both directions read the same steps of X
    np.testing.assert_allclose(stats["W"]["gram"], x_rows.T @ x_rows, rtol=1e-4, atol=1e-4)
    assert stats["W"]["tokens"] == len(x_rows)


def test_batch_first_hidden_states():
    """layout=1 (Y [B, T, D, H], initial_h [B, D, H]), which onnxruntime's CPU LSTM does not run:
    the rows from the reference's states in that layout."""
    rng = np.random.default_rng(1)
    w, r, b = (rng.standard_normal(s) * 0.3 for s in ((2, 4 * H, I), (2, 4 * H, H), (2, 8 * H)))
    x, h0, c0 = rng.standard_normal((3, B, I)), rng.standard_normal((2, B, H)), rng.standard_normal((2, B, H))
    y, states, _ = reference_lstm(x, w, r, b, h0, c0, [3, 2], "bidirectional")
    rows = previous_states(y.transpose(2, 0, 1, 3), h0.transpose(1, 0, 2), np.array([3, 2]), (False, True), True)
    for direction in range(2):
        np.testing.assert_allclose(rows[direction].T @ rows[direction], states[direction].T @ states[direction])
    sequence = sequence_rows(x.swapaxes(0, 1), np.array([3, 2]), True)[0]
    np.testing.assert_allclose(sequence.T @ sequence, np.einsum("tbi,tbj->ij", x, x) - np.outer(x[2, 1], x[2, 1]))


def test_one_step_calls_from_a_zero_state_leave_r_dense_with_the_reason(tmp_path):
    """Streaming calls that do not carry the state: R only ever multiplies zero."""
    model, _ = _lstm_model("forward", 1, None, None, 0)
    source = save(model, tmp_path / "lstm.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", X=rng.standard_normal((4, B, I)).astype(np.float32),  # 4 samples of [1, ...]
             C0=rng.standard_normal((4, B, H)).astype(np.float32))
    out = tmp_path / "out.onnx"
    cli("apply", source, "-m", "wanda", "-s", "0.5", "--calib", tmp_path / "calib.npz", "-o", out,
        "--report", tmp_path / "out.json", "--include", ".").ok()
    report = json.loads((tmp_path / "out.json").read_text())
    assert [t["name"] for t in report["targets"]] == ["W"]
    (skipped,) = report["skipped"]
    assert skipped["name"] == "R" and "zero state" in skipped["reason"]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "mama"])
def test_bidirectional_r_is_pruned_per_direction(tmp_path, method):
    model, inits = _lstm_model("bidirectional", 4, "input", None, 0)
    source = save(model, tmp_path / "lstm.onnx")
    rng = np.random.default_rng(0)
    feeds = [{"X": rng.standard_normal((4, B, I)), "C0": rng.standard_normal((2, B, H)),
              "H0": rng.standard_normal((2, B, H))} for _ in range(8)]
    (tmp_path / "calib").mkdir()
    for index, feed in enumerate(feeds):  # one feed dict per sample
        np.savez(tmp_path / "calib" / f"{index}.npz", **{k: v.astype(np.float32) for k, v in feed.items()})
    out = tmp_path / "out.onnx"
    cli("apply", source, "-m", method, "-s", "0.5", "--calib", tmp_path / "calib", "-o", out,
        "--report", tmp_path / "out.json", "--include", ".").ok()
    report = json.loads((tmp_path / "out.json").read_text())
    assert {t["name"] for t in report["targets"]} == {"W", "R"} and not report["skipped"]
    r = numpy_helper.to_array(next(i for i in onnx.load(str(out)).graph.initializer if i.name == "R"))
    np.testing.assert_allclose((r == 0).mean(axis=(1, 2)), [0.5, 0.5], atol=0.01)  # each direction at 50%
    feed = {k: v.astype(np.float32) for k, v in feeds[0].items()}
    dense, pruned = (ort.InferenceSession(str(p)).run(None, feed)[0] for p in (source, out))
    assert np.isfinite(pruned).all() and not np.allclose(dense, pruned)


def _gru(linear_before_reset: int) -> onnx.ModelProto:
    inits = {"W": weight((1, 3 * H, I), 1) * 0.3, "R": weight((1, 3 * H, H), 2) * 0.3}
    node = helper.make_node("GRU", ["X", "W", "R", "", "", "H0"], ["Y"], name="/layers.0/rnn/GRU", hidden_size=H,
                            linear_before_reset=linear_before_reset)
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, B, I]),
              helper.make_tensor_value_info("H0", TensorProto.FLOAT, [1, B, H])]
    return make_model([node], inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 1, B, H])], inits)


def test_r_is_left_out_of_the_default_selection_with_the_reason(tmp_path):
    model, _ = _lstm_model("forward", 3, "input", None, 0)
    source = save(model, tmp_path / "lstm.onnx")
    cli("apply", source, "-m", "magnitude", "-s", "0.5", "-o", tmp_path / "out.onnx", "--report", tmp_path / "out.json").ok()
    report = json.loads((tmp_path / "out.json").read_text())
    assert [t["name"] for t in report["targets"]] == ["W"]
    (left,) = [u for u in report["untouched"] if u["name"] == "R"]
    assert "feeds back through the hidden state" in left["reason"] and "--include" in left["reason"]


def test_gru_r_is_calibrated_where_it_multiplies_the_state(tmp_path):
    """linear_before_reset=1 (torch's export): R multiplies h; with 0, its candidate third multiplies
    r ⊙ h, which no graph value holds, so calibration refuses R rather than rank it by h."""
    rng = np.random.default_rng(0)
    samples = [{"X": rng.standard_normal((1, B, I)).astype(np.float32),
                "H0": rng.standard_normal((1, B, H)).astype(np.float32)} for _ in range(2)]
    ir_model = load_model(save(_gru(1), tmp_path / "gru1.onnx"))
    stats = calibrate(ir_model, [discover_targets(ir_model)], samples, NEEDS)
    h0 = np.concatenate([s["H0"][0] for s in samples])
    np.testing.assert_allclose(stats["R"]["gram"], h0.T @ h0, rtol=1e-4, atol=1e-6)
    (r,) = [t for t in discover_targets(load_model(save(_gru(0), tmp_path / "gru0.onnx"))) if t.name == "R"]
    assert "r ⊙ h" in r.calibration_reason


def test_recurrent_state_read_inside_an_if_branch(tmp_path):
    """silero's form: the LSTM and the Unsqueeze making its initial_h sit inside an If branch; the
    state R multiplies is fetched through the If, only on the samples that take that branch."""
    inits = {"W": weight((1, 4 * H, I), 1) * 0.3, "R": weight((1, 4 * H, H), 2) * 0.3}
    axes = helper.make_node("Constant", [], ["axes"], value=numpy_helper.from_array(np.array([0], np.int64)))
    then_branch = helper.make_graph(
        [axes, helper.make_node("Unsqueeze", ["state", "axes"], ["h0"]),
         helper.make_node("LSTM", ["X", "W", "R", "", "", "h0"], ["y_then"], name="/layers.0/rnn/LSTM", hidden_size=H)],
        "then", [], [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, [1, 1, B, H])])
    else_branch = helper.make_graph(
        [helper.make_node("LSTM", ["X", "W", "R"], ["y_else"], name="/layers.0/rnn_1/LSTM", hidden_size=H)],
        "else", [], [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, [1, 1, B, H])])
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, B, I]),
              helper.make_tensor_value_info("state", TensorProto.FLOAT, [B, H]),
              helper.make_tensor_value_info("carried", TensorProto.BOOL, [])]
    model = make_model([helper.make_node("If", ["carried"], ["Y"], name="/If", then_branch=then_branch,
                                         else_branch=else_branch)],
                       inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 1, B, H])], inits)
    ir_model = load_model(save(model, tmp_path / "if_lstm.onnx"))
    rng = np.random.default_rng(0)
    samples = [{"X": rng.standard_normal((1, B, I)).astype(np.float32),
                "state": rng.standard_normal((B, H)).astype(np.float32), "carried": np.array(flag)}
               for flag in (True, False, True)]
    stats = calibrate(ir_model, [discover_targets(ir_model)], samples, NEEDS)
    carried = np.concatenate([s["state"] for s in samples if s["carried"]])
    np.testing.assert_allclose(stats["R"]["gram"], carried.T @ carried, rtol=1e-4, atol=1e-6)
    assert stats["R"]["tokens"] == len(carried)  # the else branch's one step starts from zero
    x = np.concatenate([s["X"][0] for s in samples])
    assert stats["W"]["tokens"] == len(x)
