"""Hand-built graphs: every weight orientation, Conv, Transpose, Cast, shared weights, external data."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import (assert_bit_identical, assert_nm, assert_runs_like, assert_user_error, cli, group_zero_counts,
                      initializers, prune, sha256, snapshot)
from graphs import SHARED, TIED, cast_fp16_model, chain_model, conv_model, gemm_model, save, shared_weights_model, \
    transpose_matmul_model, Dense


def prune_2_4(tmp_path, model: onnx.ModelProto, *options):
    """Save `model`, prune it 2:4 by magnitude; returns (input path, output path, report dict)."""
    source = save(model, tmp_path / "in" / "model.onnx")
    out, report = tmp_path / "out" / "model.onnx", tmp_path / "out" / "report.json"
    prune(source, out, "--pattern", "2:4", *options, report=report)
    return source, out, json.loads(report.read_text())


def assert_not_nm(stored: np.ndarray, axis: int) -> None:
    """Random weights pruned along the other axis are not 2:4 along this one (the orientation matters)."""
    assert not (group_zero_counts(stored, axis, 4) >= 2).all()


@pytest.mark.parametrize("trans_b, k_axis", [(True, 1), (False, 0)], ids=["transB=1 stores [N,K]", "transB=0 stores [K,N]"])
def test_gemm_groups_run_along_k(tmp_path, trans_b, k_axis):
    source, out, report = prune_2_4(tmp_path, gemm_model(trans_b))
    weights = initializers(out)
    assert [t["name"] for t in report["targets"]] == ["layers.0.weight", "layers.1.weight"]
    for name in ("layers.0.weight", "layers.1.weight"):
        assert_nm(weights[name], k_axis, 2, 4)
        assert_not_nm(weights[name], 1 - k_axis)
    assert_bit_identical(initializers(source), weights, ["layers.0.bias"])
    assert_runs_like(out, source)


def test_conv_groups_run_along_input_channels(tmp_path):
    source, out, report = prune_2_4(tmp_path, conv_model(in_channels=8))
    weights = initializers(out)
    assert len(report["targets"]) == 2
    for name, channels in (("layers.0.conv.weight", 8), ("layers.1.conv.weight", 16)):
        stored = weights[name]
        assert stored.shape == (16, channels, 3, 3)
        # every (o, kh, kw) holds exactly 2 zeros in each run of 4 consecutive input channels
        for o in range(16):
            for kh in range(3):
                for kw in range(3):
                    pixel = stored[o, :, kh, kw].reshape(-1, 4)
                    assert ((pixel == 0).sum(axis=1) == 2).all(), (name, o, kh, kw)
        assert_nm(stored, 1, 2, 4)
        assert_not_nm(stored.reshape(16, -1), 1)  # not along the flattened [O, C*kh*kw] order
    assert_bit_identical(initializers(source), weights, ["layers.0.conv.bias"])
    assert_runs_like(out, source)


def test_conv_with_three_input_channels_fails_naming_the_layer_when_strict(tmp_path):
    source = save(conv_model(in_channels=3), tmp_path / "model.onnx")
    before = snapshot(tmp_path)
    result = cli("apply", source, "-o", tmp_path / "out.onnx", "--pattern", "2:4", "--strict")
    line = assert_user_error(result)
    assert "/layers.0/conv/Conv" in line and "input channels=3" in line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("flags", [(), ("--skip-incompatible",)], ids=["default", "deprecated-flag"])
def test_conv_with_three_input_channels_left_dense_and_listed(tmp_path, flags):
    source, out, report = prune_2_4(tmp_path, conv_model(in_channels=3), *flags)
    assert any("cannot hold 2:4" in note and "--strict" in note for note in report["notes"])
    assert [t["name"] for t in report["targets"]] == ["layers.1.conv.weight"]
    assert [s["name"] for s in report["skipped"]] == ["layers.0.conv.weight"]
    assert report["skipped"][0]["node"] == "/layers.0/conv/Conv"
    assert "input channels=3" in report["skipped"][0]["reason"]
    before, after = initializers(source), initializers(out)
    assert_bit_identical(before, after, ["layers.0.conv.weight", "layers.0.conv.bias"])
    assert_nm(after["layers.1.conv.weight"], 1, 2, 4)
    assert_runs_like(out, source)


@pytest.mark.parametrize("build, dtype, shape, k_axis", [
    (transpose_matmul_model, np.float32, (48, 32), 1),  # stored [N, K]: K is axis 1 behind Transpose(perm=[1,0])
    (cast_fp16_model, np.float16, (32, 48), 0),  # fp16 [K, N] read through Cast(to=FLOAT): stays fp16
], ids=["transpose", "cast-fp16"])
def test_weight_through_transpose_or_cast(tmp_path, build, dtype, shape, k_axis):
    source, out, report = prune_2_4(tmp_path, build())
    before, after = initializers(source), initializers(out)
    assert [t["name"] for t in report["targets"]] == ["layers.0.weight", "layers.1.weight"]
    first = after["layers.0.weight"]
    assert first.dtype == dtype and first.shape == shape
    assert_nm(first, k_axis, 2, 4)
    assert_not_nm(first, 1 - k_axis)
    kept = first != 0  # kept weights hold their exact stored values (no lossy dtype round trip)
    assert (first[kept] == before["layers.0.weight"][kept]).all()
    assert_nm(after["layers.1.weight"], 0, 2, 4)
    assert_runs_like(out, source)


def test_shared_weight_pruned_once_and_tied_embedding_left_alone(tmp_path):
    source, out, report = prune_2_4(tmp_path, shared_weights_model())
    assert [t["name"] for t in report["targets"]] == [SHARED]
    model = onnx.load(str(out))
    assert [t.name for t in model.graph.initializer].count(SHARED) == 1
    users = [n.name for n in model.graph.node if SHARED in n.input]
    assert users == ["/layers.0/proj/MatMul", "/layers.1/proj/MatMul"]
    before, after = initializers(source), initializers(out)
    assert_nm(after[SHARED], 0, 2, 4)
    assert_bit_identical(before, after, [TIED])

    # both consumers compute with the same pruned weight: rerun the graph in numpy
    import onnxruntime as ort

    ids = np.arange(16, dtype=np.int64).reshape(2, 8)
    logits = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    h = after[TIED][ids]
    expected = (h + h @ after[SHARED] @ after[SHARED]) @ after[TIED].T
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_tied_embedding_is_refused_even_when_included(tmp_path):
    source, out, report = prune_2_4(tmp_path, shared_weights_model(), "--include", ".*")
    assert [t["name"] for t in report["targets"]] == [SHARED]
    assert_bit_identical(initializers(source), initializers(out), [TIED])


def test_inspect_names_why_the_tied_embedding_is_not_pruned(tmp_path):
    source = save(shared_weights_model(), tmp_path / "model.onnx")
    info = json.loads(cli("inspect", source, "--json").ok().out)
    rows = {row["name"]: row for row in info["targets"]}
    assert set(rows) == {SHARED, TIED}
    assert rows[TIED]["selected"] is False
    assert "Gather" in rows[TIED]["note"]
    assert rows[SHARED]["selected"] is True


EXTERNAL = [Dense("MatMul", 32, 48), Dense("Gemm", 48, 32, trans_b=True, bias=True)]


def test_external_data_in_and_out(tmp_path):
    source = save(chain_model(EXTERNAL), tmp_path / "in" / "model.onnx", external=True)
    data = source.with_name("model.onnx.data")
    assert data.is_file()
    before = snapshot(source.parent)

    out = tmp_path / "out" / "pruned.onnx"
    prune(source, out, "--sparsity", "0.5")
    assert snapshot(source.parent) == before  # the model and its .data file are byte-identical
    assert out.with_name("pruned.onnx.data").is_file()
    header = onnx.load(str(out), load_external_data=False)
    stored_outside = {t.name for t in header.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert stored_outside >= {"layers.0.weight", "layers.1.weight"}  # tiny tensors may stay inline
    weights = initializers(out)
    assert (weights["layers.0.weight"] == 0).sum() == weights["layers.0.weight"].size // 2
    assert_bit_identical(initializers(source), weights, ["layers.1.bias"])
    assert_runs_like(out, source)

    single = tmp_path / "single" / "pruned.onnx"
    prune(source, single, "--sparsity", "0.5", "--no-external-data")
    assert sorted(p.name for p in single.parent.iterdir()) == ["pruned.onnx"]
    header = onnx.load(str(single), load_external_data=False)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in header.graph.initializer)
    assert_bit_identical(weights, initializers(single), weights)
    assert_runs_like(single, source)
    assert snapshot(source.parent) == before


def test_input_untouched_by_graph_pruning(tmp_path):
    source = save(gemm_model(True), tmp_path / "model.onnx")
    digest = sha256(source)
    prune(source, tmp_path / "out.onnx", "--sparsity", "0.5")
    assert sha256(source) == digest
