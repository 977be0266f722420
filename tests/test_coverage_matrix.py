"""Coverage matrix: every weight form exporters write is found, pruned by every method (or refused
per layer with a reason), and the result runs in onnxruntime with the dense model's output shapes."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import weight_forms as forms
from conftest import cli
from graphs import save
from onnxprune.calibration import calibrate
from onnxprune.model_io import load_model
from onnxprune.targets import discover, discover_targets

CALIBRATED = ["wanda", "sparsegpt", "mama"]
SAMPLES = 8


def _prepare(tmp_path, build):
    model, names = build()
    source = save(model, tmp_path / "model.onnx")
    calib = tmp_path / "calib.npz"
    np.savez(calib, **forms.feeds(model, SAMPLES))
    return model, names, source, calib


def _apply(source, calib, out, method, *extra):
    args = ["apply", source, "-m", method, "-s", "0.5", "-o", out, "--report", out.with_suffix(".json"), *extra]
    if method in CALIBRATED:
        args += ["--calib", calib, "--nsamples", SAMPLES]
    return cli(*args)


def _run(path, model):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    sample = {k: v[:1] for k, v in forms.feeds(model, 1, seed=1).items()}
    return session.run(None, sample)


def _canonical(path) -> dict[str, np.ndarray]:
    return {t.name: t.read() for t in discover_targets(load_model(path))}


@pytest.mark.parametrize("build", forms.EQUIVALENT + forms.OTHER, ids=lambda b: b.__name__)
def test_found_pruned_and_runs(tmp_path, build):
    model, names, source, calib = _prepare(tmp_path, build)
    found = {t.name for t in discover(load_model(source)).targets}
    assert set(names) <= found, f"not found: {set(names) - found}"
    dense = _run(source, model)
    for method in ["magnitude", *CALIBRATED]:
        out = tmp_path / f"{method}.onnx"
        result = _apply(source, calib, out, method)
        if result.code == 2:  # refused as a whole: only when no layer can take the method, with its reason
            assert method in CALIBRATED and "calibration" in result.err, result.err
            continue
        result.ok()
        report = json.loads(out.with_suffix(".json").read_text())
        pruned = {t["name"] for t in report["targets"]}
        refused = {s["name"]: s["reason"] for s in report["skipped"]}
        assert set(names) <= pruned | set(refused), (method, report["skipped"])
        assert all(refused.values())
        if method == "magnitude":
            assert set(names) <= pruned
        for record in report["targets"]:
            assert record["sparsity"] == pytest.approx(0.5, abs=0.02), record
        outputs = _run(out, model)
        assert [o.shape for o in outputs] == [d.shape for d in dense]
        assert all(np.isfinite(o).all() for o in outputs)
        # no tensor is stored twice, and nothing was left behind
        saved = onnx.load(str(out))
        stored = [i.name for i in saved.graph.initializer]
        assert len(stored) == len(set(stored))


@pytest.mark.parametrize("build", forms.EQUIVALENT[1:], ids=lambda b: b.__name__)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_equivalent_forms_prune_alike(tmp_path, build, method):
    """Every form of y = x @ W gets the canonical weight the plain MatMul gets: the same layout
    and, for calibrated methods, the same activation statistics."""
    _, _, reference, calib = _prepare(tmp_path / "plain", forms.plain)
    _, (name,), source, _ = _prepare(tmp_path / build.__name__, build)
    _apply(reference, calib, tmp_path / "ref.onnx", method).ok()
    _apply(source, calib, tmp_path / "form.onnx", method).ok()
    expected = _canonical(tmp_path / "ref.onnx")["W"]
    actual = _canonical(tmp_path / "form.onnx")[name]
    assert ((expected == 0) == (actual == 0)).mean() > 0.99
    np.testing.assert_allclose(actual, expected, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("build, zero", [(forms.qdq_per_channel, forms.ZERO[None, :]),
                                         (forms.qdq_per_tensor, np.zeros(())),
                                         (forms.cast_mul_int8, forms.ZERO[None, :])],
                         ids=["per-channel", "per-tensor", "cast-mul"])
def test_quantized_weights_pruned_in_the_quantized_domain(tmp_path, build, zero):
    model, _, source, calib = _prepare(tmp_path, build)
    before = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for method in ["magnitude", "sparsegpt"]:
        _apply(source, calib, tmp_path / f"{method}.onnx", method).ok()
        after = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / f"{method}.onnx")).graph.initializer}
        codes = after["Wq"]
        assert codes.dtype == np.int8 and codes.shape == before["Wq"].shape
        pruned = codes == np.broadcast_to(zero, codes.shape).astype(np.int8)
        assert pruned.mean() == pytest.approx(0.5, abs=0.02)  # a pruned weight is its zero point
        for key in set(before) - {"Wq"}:  # scales and zero points untouched
            np.testing.assert_array_equal(after[key], before[key])
        if method == "magnitude":  # kept codes are the stored codes, exactly
            np.testing.assert_array_equal(codes[~pruned], before["Wq"][~pruned])


def test_constant_weight_becomes_one_initializer(tmp_path):
    _, _, source, calib = _prepare(tmp_path, forms.constant_node)
    _apply(source, calib, tmp_path / "out.onnx", "magnitude").ok()
    saved = onnx.load(str(tmp_path / "out.onnx"))
    assert [i.name for i in saved.graph.initializer] == ["W"]
    assert not [n for n in saved.graph.node if n.op_type == "Constant"]


def test_subgraph_weights_pruned_data_free_and_refused_per_layer_when_calibrated(tmp_path):
    _, _, source, calib = _prepare(tmp_path, forms.if_branches)
    _apply(source, calib, tmp_path / "mag.onnx", "magnitude").ok()
    saved = onnx.load(str(tmp_path / "mag.onnx"))
    then_branch = next(a.g for a in saved.graph.node[0].attribute if a.name == "then_branch")
    assert [i.name for i in then_branch.initializer] == ["W_inner"]  # written back where it lived
    assert (numpy_helper.to_array(then_branch.initializer[0]) == 0).mean() == pytest.approx(0.5)
    _apply(source, calib, tmp_path / "wanda.onnx", "wanda").ok()
    report = json.loads((tmp_path / "wanda.json").read_text())
    assert [t["name"] for t in report["targets"]] == ["W2"]
    reasons = {s["name"]: s["reason"] for s in report["skipped"]}
    assert set(reasons) == {"W", "W_inner"} and all("subgraph" in r for r in reasons.values())


def test_recurrent_statistics_come_from_the_sequence_and_the_hidden_states(tmp_path):
    model, _ = forms.lstm()
    ir_model = load_model(save(model, tmp_path / "lstm.onnx"))
    targets = {t.name: t for t in discover_targets(ir_model)}
    x = np.random.default_rng(0).standard_normal((5, 2, forms.K)).astype(np.float32)
    stats = calibrate(ir_model, [list(targets.values())], [{"X": x}], frozenset({"sq_sum", "gram"}))
    np.testing.assert_allclose(stats["Wr"]["sq_sum"], (x.reshape(-1, forms.K) ** 2).sum(0), rtol=1e-5)
    (y,) = ort.InferenceSession(str(tmp_path / "lstm.onnx")).run(None, {"X": x})
    previous = y[:-1].reshape(-1, forms.HIDDEN)
    np.testing.assert_allclose(stats["Rr"]["sq_sum"], (previous ** 2).sum(0), rtol=1e-4)
    assert stats["Rr"]["tokens"] == previous.shape[0]


def test_unsupported_forms_are_listed_with_the_reason(tmp_path):
    _, _, source, calib = _prepare(tmp_path, forms.matmul_nbits_beside_matmul)
    _apply(source, calib, tmp_path / "out.onnx", "magnitude").ok()
    report = json.loads((tmp_path / "out.json").read_text())
    (untouched,) = [u for u in report["untouched"] if u["name"] == "Bq"]
    assert untouched["op"] == "com.microsoft.MatMulNBits" and "4-bit" in untouched["reason"]
    assert any("4-bit" in note for note in report["notes"])
    inspected = cli("inspect", source, "--json").ok()
    assert [u["name"] for u in json.loads(inspected.out)["unsupported"]] == ["Bq"]
