"""OWL layer-wise allocation: the mapping, and `apply --allocation owl` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import assert_user_error, cli
from graphs import Dense, chain_model, save

from onnxprune.allocation import outlier_ratio, owl_sparsities


def test_owl_mapping_keeps_the_mean_and_spread():
    ratios = {"a": 0.001, "b": 0.004, "c": 0.010, "d": 0.002}
    sparsities = owl_sparsities(ratios, 0.5)
    assert np.mean(list(sparsities.values())) == pytest.approx(0.5)
    assert max(sparsities.values()) - min(sparsities.values()) == pytest.approx(0.16)
    assert sparsities["c"] == min(sparsities.values()) and sparsities["a"] == max(sparsities.values())
    assert owl_sparsities({"a": 0.1, "b": 0.1}, 0.3) == {"a": 0.3, "b": 0.3}


def test_outlier_ratio():
    scores = np.ones(1000)
    scores[:10] = 100.0
    assert outlier_ratio([scores[:500], scores[500:]]) == pytest.approx(0.01)


def test_apply_owl_allocates_per_block(tmp_path):
    layers = [Dense("MatMul", 32, 32) for _ in range(4)]
    model = save(chain_model(layers, seed=4), tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    x[:, :2] *= 40.0  # outlier input channels feed block 0 only
    np.savez(tmp_path / "x.npz", X=x)
    out, report_path = tmp_path / "o.onnx", tmp_path / "r.json"
    cli("apply", model, "-m", "magnitude-output", "-s", "0.5", "--allocation", "owl", "--calib", tmp_path / "x.npz",
        "-o", out, "--report", report_path).ok()
    report = json.loads(report_path.read_text())
    allocation = report["allocation"]
    assert set(allocation) == {f"layers.{i}" for i in range(4)}
    assert np.mean(list(allocation.values())) == pytest.approx(0.5)
    assert allocation["layers.0"] == min(allocation.values()) < 0.5
    for target in report["targets"]:
        assert target["sparsity"] == pytest.approx(int(32 * allocation[target["block"]]) / 32)
    line = assert_user_error(cli("apply", model, "-m", "magnitude", "-p", "2:4", "--allocation", "owl",
                                 "--calib", tmp_path / "x.npz", "-o", out))
    assert "unstructured" in line
    assert "--calib" in assert_user_error(cli("apply", model, "-m", "magnitude", "-s", "0.5", "--allocation", "owl",
                                              "-o", tmp_path / "p.onnx"))
