"""External-data models calibrate and prune from any working directory, without copying weights."""

from __future__ import annotations

import os
from pathlib import Path

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


@pytest.mark.parametrize("method", CALIBRATED)
def test_pruned_weights_of_an_external_model_are_file_backed_not_in_memory(models, method):
    """Pruned weights held as in-memory tensors until the save make private memory grow with the
    model (issue 9): each must be a memory map of a file of its own, removed with its tensor."""
    import gc

    import onnx_ir as ir

    import onnxprune

    inline, external, calib, _ = models
    result = onnxprune.prune(external, method, 0.5, calib=str(calib))
    reference = onnxprune.prune(inline, method, 0.5, calib=str(calib))
    spilled = []
    for record in result.report.targets:
        tensor = result.model.graph.initializers[record.name].const_value
        assert isinstance(tensor, ir.ExternalTensor), f"{record.name} is held in memory as {type(tensor).__name__}"
        assert Path(tensor.path).parent != external.parent and os.path.getsize(tensor.path) == tensor.nbytes
        expected = reference.model.graph.initializers[record.name].const_value
        assert isinstance(expected, ir.Tensor) and not isinstance(expected, ir.ExternalTensor)  # inline: as before
        np.testing.assert_allclose(tensor.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6, err_msg=record.name)
        spilled.append(tensor.path)
    assert len(spilled) == 3
    del result, tensor
    gc.collect()
    assert not any(os.path.exists(path) for path in spilled)


def test_apply_spills_beside_the_output_and_leaves_nothing_there(models, monkeypatch):
    """The spilled weights wait beside the output and are gone afterwards, also when a run is
    interrupted (the CLI turns signals into exceptions); the input stays as it was."""
    import onnx_ir as ir

    from onnxprune import pipeline

    _, external, calib, elsewhere = models
    data = external.with_name("model.onnx.data")
    before = data.read_bytes()
    out = elsewhere / "out"
    seen = []
    real_save = pipeline.save_model

    def save_model(model, output, external_data=None):
        seen.extend(v.const_value.path for v in model.graph.initializers.values()
                    if isinstance(v.const_value, ir.ExternalTensor) and Path(v.const_value.path).parent.parent == out)
        return real_save(model, output, external_data)

    monkeypatch.setattr(pipeline, "save_model", save_model)
    cli("apply", external, "-m", "wanda", "-s", "0.5", "--calib", calib, "-o", out / "pruned.onnx").ok()
    assert len(seen) == 3
    assert sorted(p.name for p in out.iterdir()) == ["pruned.onnx", "pruned.onnx.data"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "save_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline.apply(external, out / "again.onnx", pipeline.PruneOptions(
            "wanda", pipeline.Pattern(0.5), calibration=pipeline.CalibrationOptions(str(calib))))
    assert sorted(p.name for p in out.iterdir()) == ["pruned.onnx", "pruned.onnx.data"]
    assert data.read_bytes() == before
