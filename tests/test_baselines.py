"""The paper's indicators and baselines: l1, bias / inverse-bias, random-pattern."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import assert_user_error, cli, initializers
from graphs import Dense, chain_model, save

from onnxprune.passes import Layer, NotApplicable, get_pass
from onnxprune.patterns import Pattern


def layer(bias=True, seed=0):
    rng = np.random.default_rng(seed)
    return Layer("w", rng.standard_normal((40, 32)).astype(np.float32),
                 rng.standard_normal(40).astype(np.float32) if bias else None, np.random.default_rng(seed))


def zero_rows(weight):
    return np.flatnonzero((weight == 0).all(axis=1))


def test_l1_zeros_the_weakest_neurons():
    item = layer()
    expected = np.argsort(np.abs(item.weight).sum(1))[: int(40 * 0.3)]
    result = get_pass("l1").prune(item, Pattern(0.3))
    assert sorted(zero_rows(result.weight)) == sorted(expected)
    assert (result.weight == 0).sum() == 12 * 32


def test_bias_and_inverse_bias_rank_by_bias():
    item = layer()
    low = np.argsort(np.abs(item.bias))[:20]
    assert sorted(zero_rows(get_pass("bias").prune(layer(), Pattern(0.5)).weight)) == sorted(low)
    high = np.argsort(-np.abs(item.bias))[:20]
    assert sorted(zero_rows(get_pass("inverse-bias").prune(layer(), Pattern(0.5)).weight)) == sorted(high)


def test_bias_without_bias_and_neurons_under_nm_are_not_applicable():
    with pytest.raises(NotApplicable, match="no bias"):
        get_pass("bias").prune(layer(bias=False), Pattern(0.5))
    with pytest.raises(NotApplicable, match="N:M"):
        get_pass("l1").prune(layer(), Pattern(0.5, 2, 4))


def test_random_pattern_prunes_the_same_count_per_neuron():
    weight = get_pass("random-pattern").prune(layer(), Pattern(0.25)).weight
    assert ((weight == 0).sum(axis=1) == 8).all()
    other = get_pass("random").prune(layer(), Pattern(0.25)).weight
    assert (other == 0).sum() == int(40 * 32 * 0.25) and len(set((other == 0).sum(axis=1))) > 1


def test_bias_through_cli_reports_layers_without_bias(tmp_path):
    model = save(chain_model([Dense("Gemm", 32, 48, True, bias=True), Dense("Gemm", 48, 24, True)]), tmp_path / "m.onnx")
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    cli("apply", model, "-m", "bias", "-s", "0.5", "-o", out, "--report", report).ok()
    result = json.loads(report.read_text())
    assert [t["name"] for t in result["targets"]] == ["layers.0.weight"]
    assert result["skipped"] == [{"name": "layers.1.weight", "node": "/layers.1/fc/Gemm",
                                  "reason": "not applicable: the layer has no bias"}]
    after = initializers(out)
    assert len(zero_rows(after["layers.0.weight"])) == 24
    np.testing.assert_array_equal(after["layers.1.weight"], initializers(model)["layers.1.weight"])
    no_bias = save(chain_model([Dense("MatMul", 32, 48), Dense("MatMul", 48, 24)]), tmp_path / "nb.onnx")
    line = assert_user_error(cli("apply", no_bias, "-m", "bias", "-s", "0.5", "-o", tmp_path / "x.onnx"))
    assert "not applicable to any selected layer" in line and "no bias" in line
