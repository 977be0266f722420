"""`apply --target`: compressed storage, TensorRT eligibility, and the CPU advice."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from conftest import assert_user_error, cli, initializers, metadata
from graphs import Dense, chain_model, save


@pytest.fixture
def big_chain(tmp_path):
    layers = [Dense("MatMul", 256, 256), Dense("Gemm", 256, 256, True), Dense("MatMul", 256, 128)]
    return save(chain_model(layers, seed=5), tmp_path / "m.onnx")


def outputs(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]


def test_compressed_target_is_smaller_and_identical(big_chain, tmp_path):
    dense_zeros, packed = tmp_path / "zeros.onnx", tmp_path / "packed.onnx"
    cli("apply", big_chain, "-m", "magnitude", "-s", "0.5", "-o", dense_zeros).ok()
    cli("apply", big_chain, "-m", "magnitude", "-s", "0.5", "--target", "compressed", "-o", packed,
        "--report", tmp_path / "r.json").ok()
    assert packed.stat().st_size <= 0.6 * dense_zeros.stat().st_size
    x = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
    assert np.array_equal(outputs(packed, x), outputs(dense_zeros, x))
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["emit"]["target"] == "compressed" and report["emit"]["totals"]["tensors"] == 3
    assert "Compressed storage" in (tmp_path / "r.md").read_text()
    assert metadata(packed)["onnxprune.target"] == "compressed"


def test_tensorrt_target_defaults_to_2of4_and_reports_eligibility(big_chain, tmp_path):
    out = tmp_path / "trt.onnx"
    cli("apply", big_chain, "-m", "magnitude", "--target", "tensorrt", "-o", out, "--report", tmp_path / "r.json").ok()
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["pattern"] == "2:4" and all(t["nm_valid"] for t in report["targets"])
    assert report["emit"]["eligible"] == 3 and len(report["emit"]["layers"]) == 3
    assert "TensorRT sparse-kernel eligibility" in (tmp_path / "r.md").read_text()
    line = assert_user_error(cli("apply", big_chain, "-m", "magnitude", "-s", "0.5", "--target", "tensorrt",
                                 "-o", tmp_path / "x.onnx"))
    assert "2:4" in line


def test_cpu_target_advises_structured(big_chain, tmp_path):
    result = cli("apply", big_chain, "-m", "magnitude", "-s", "0.5", "--target", "cpu", "-p", "unstructured",
                 "-o", tmp_path / "o.onnx").ok()
    assert "note:" in result.err and "structured" in result.err
    assert "--target must be one of" in assert_user_error(
        cli("apply", big_chain, "-s", "0.5", "--target", "gpu", "-o", tmp_path / "y.onnx"))
    before = initializers(big_chain)
    assert_user_error(cli("apply", big_chain, "-s", "0.5", "-p", "structured", "--target", "compressed",
                          "-o", tmp_path / "z.onnx"))
    assert initializers(big_chain).keys() == before.keys()
