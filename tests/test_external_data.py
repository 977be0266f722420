"""External-data models calibrate and prune from any working directory, without copying weights."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import cli, cli_process, initializers
from graphs import Dense, chain_model, save

CALIBRATED = ("wanda", "sparsegpt", "mama")


@pytest.fixture
def models(tmp_path):
    """The same chain saved inline and with external data, calibration inputs, and a foreign cwd."""
    layers = [Dense("Gemm", 32, 48, True, bias=True), Dense("MatMul", 48, 40), Dense("Gemm", 40, 24, True)]
    inline = save(chain_model(layers), tmp_path / "inline" / "model.onnx")
    external = save(chain_model(layers), tmp_path / "models" / "llm" / "model.onnx", external=True)
    x = np.random.default_rng(5).standard_normal((24, 32)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", X=x)
    elsewhere = tmp_path / "work"
    elsewhere.mkdir()
    return inline, external, tmp_path / "calib.npz", elsewhere


@pytest.mark.parametrize("method", CALIBRATED)
def test_external_data_from_another_cwd_in_a_process(models, method):
    inline, external, calib, elsewhere = models
    expected = inline.with_name(f"{method}.onnx")
    cli("apply", inline, "-m", method, "-s", "0.5", "--calib", calib, "-o", expected).ok()
    relative = os.path.relpath(external, elsewhere)
    result = cli_process("apply", relative, "-m", method, "-s", "0.5", "--calib", calib, "-o", "out/pruned.onnx",
                         cwd=elsewhere)
    assert result.code == 0, result.err
    pruned, reference = initializers(elsewhere / "out" / "pruned.onnx"), initializers(expected)
    assert set(pruned) == set(reference)
    for name in reference:
        np.testing.assert_allclose(pruned[name], reference[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert (pruned["layers.1.weight"] == 0).mean() >= 0.49


def test_external_data_absolute_path_keeps_the_input(models, monkeypatch):
    _, external, calib, elsewhere = models
    data = external.with_name("model.onnx.data")
    before = data.read_bytes()
    monkeypatch.chdir(elsewhere)
    for method in CALIBRATED:
        cli("apply", external.resolve(), "-m", method, "-s", "0.5", "--calib", calib.resolve(),
            "-o", elsewhere / f"{method}.onnx").ok()
        assert (initializers(elsewhere / f"{method}.onnx")["layers.0.weight"] == 0).mean() >= 0.49
    assert data.read_bytes() == before
