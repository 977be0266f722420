"""verify (sparsity and N:M per layer, after ORT optimizations / fp16 / quantization / onnxslim) and
quantization that keeps pruned weights zero, checked against raw initializers read with numpy."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import assert_user_error, cli, group_zero_counts, initializers
from graphs import Dense, chain_model, save
from onnx import numpy_helper

import onnxprune
from onnxprune import verification

AFTER = "ort-opt,fp16,quantize,int4"


def pruned_chain(tmp_path, width: int = 64):
    """A MatMul / Gemm(transB, bias) / MatMul chain pruned at 2:4 by SparseGPT, and its calibration inputs."""
    model = save(chain_model([Dense("MatMul", width, width), Dense("Gemm", width, width, True, True),
                              Dense("MatMul", width, 32)]), tmp_path / "dense.onnx")
    x = np.random.default_rng(0).normal(size=(16, width)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", X=x)
    out = onnxprune.prune(model, "sparsegpt", pattern="2:4", calib={"X": x}, include="layers").save(
        tmp_path / "pruned.onnx")
    return out, tmp_path / "calib.npz", x


@pytest.fixture
def pruned(tmp_path):
    return pruned_chain(tmp_path)


def test_2of4_survives_ort_fp16_quantization_and_onnxslim(pruned):
    path, _, _ = pruned
    after = AFTER + (",onnxslim" if verification_has_onnxslim() else "")
    result = cli("verify", path, "--pattern", "2:4", "--after", after, "--json").ok()
    report = json.loads(result.out)
    assert report["ok"] and [s["step"] for s in report["steps"]] == ["as saved", *after.split(",")]
    for step in report["steps"]:
        assert step["totals"]["required"] == 3 and step["totals"]["pattern_valid"] == 3, step["step"]
    # after ort-opt the Gemm + Relu became com.microsoft FusedGemm: its weight is still found
    ops = {row["name"]: row["op"] for row in report["steps"][1]["layers"]}
    assert ops["layers.1.weight"] == "FusedGemm"
    storage = {row["storage"] for row in report["steps"][3]["layers"]}
    assert storage == {"integer"}  # dynamic int8: MatMulInteger weights read as code - zero point
    assert "matmulnbits" in {row["storage"] for row in report["steps"][4]["layers"]}


def verification_has_onnxslim() -> bool:
    from onnxprune.extras import is_available

    return is_available("onnxslim")


def broken_copy(path, out, fill):
    """`path` with layer 0's weight (MatMul [K, N]) changed by `fill(array)` in place."""
    model = onnx.load(str(path))
    weight = next(t for t in model.graph.initializer if t.name == "layers.0.weight")
    array = numpy_helper.to_array(weight).copy()
    fill(array)
    weight.CopyFrom(numpy_helper.from_array(array, weight.name))
    onnx.save(model, str(out))
    return out


def test_verify_fails_with_exit_3_on_a_broken_pattern(pruned, tmp_path):
    path, _, _ = pruned

    def one_group(array):
        array[0:4, 5] = 0.5  # the first group of 4 along K of output 5: no zeros left

    result = cli("verify", broken_copy(path, tmp_path / "broken.onnx", one_group), "--pattern", "2:4")
    assert result.code == 3, result
    assert result.err == "error: as saved: layers.0.weight: 2:4 broken in 1 groups of 4 (+1 more on stdout)\n"
    assert "records 3 layers pruned at 2:4; only 2 hold it" in result.out
    assert "FAILED" in result.out
    # every zero filled: layer 0 no longer looks pruned, but the model records 3 layers pruned at 2:4
    everything = broken_copy(path, tmp_path / "dense0.onnx", lambda a: a.__setitem__(a == 0, 0.5))
    as_json = json.loads(cli("verify", everything, "--pattern", "2:4", "--json").out)
    assert not as_json["ok"]
    assert as_json["steps"][0]["problems"] == ["the model records 3 layers pruned at 2:4; only 2 hold it"]
    # a dense model holds no pattern at all: a failure, not a silent success
    assert cli("verify", tmp_path / "dense.onnx", "--pattern", "2:4").code == 3
    # without a pattern, verify reports sparsity and succeeds
    assert json.loads(cli("verify", tmp_path / "dense.onnx", "--json").ok().out)["steps"][0]["totals"]["zeros"] == 0


def test_verify_reports_zeros_a_step_loses(pruned, monkeypatch):
    path, _, _ = pruned

    def noisy(source, out):
        model = onnx.load(str(source))
        for tensor in model.graph.initializer:
            if tensor.name == "layers.2.weight":
                tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) + 1e-3, tensor.name))
        onnx.save(model, str(out))
        return out

    monkeypatch.setitem(verification.TRANSFORMS, "fp16", noisy)
    result = verification.verify_model(path, None, ["fp16"])
    assert not result["ok"]
    assert result["steps"][1]["problems"] == ["layers.2.weight: fp16 lost 1,024 of its 1,024 zeros"]


@pytest.mark.parametrize("mode", ["int8-static", "int8-dynamic", "int4"])
def test_quantization_keeps_pruned_weights_zero(pruned, tmp_path, mode):
    path, calib, x = pruned
    out = tmp_path / f"{mode}.onnx"
    extra = ["--calib", calib] if mode == "int8-static" else ["--block-size", 16]
    cli("quantize", path, "-o", out, "--mode", mode, *extra, "--report", tmp_path / "q.json").ok()
    report = json.loads((tmp_path / "q.json").read_text())
    assert report["zeros_kept"] and report["pattern"] == "2:4" and report["pattern_layers_after"] == 3
    before, after = initializers(path), initializers(out)
    if mode != "int4":  # int8 codes beside the float names: symmetric, so a pruned weight is code 0
        for name in ("layers.0.weight", "layers.2.weight"):
            codes = after[f"{name}_quantized"]
            assert codes.dtype == np.int8
            assert np.all(codes[before[name] == 0] == 0)
            assert (group_zero_counts(codes, 0, 4) >= 2).all()  # MatMul [K, N]: K on axis 0; rounding may add zeros
    dense_out = ort.InferenceSession(str(path)).run(None, {"X": x})[0]
    quant_out = ort.InferenceSession(str(out)).run(None, {"X": x})[0]
    assert np.corrcoef(dense_out.ravel(), quant_out.ravel())[0, 1] > 0.95
    assert onnx.load(str(out)).metadata_props  # provenance carried over
    assert cli("verify", out, "--pattern", "2:4").ok()


def test_compressed_int8_is_smaller_and_runs_the_same(tmp_path):
    path, calib, x = pruned_chain(tmp_path, width=256)  # large enough that the shared decoder table is small
    plain, packed = tmp_path / "q.onnx", tmp_path / "qc.onnx"
    cli("quantize", path, "-o", plain, "--calib", calib).ok()
    cli("quantize", path, "-o", packed, "--calib", calib, "--compressed").ok()
    assert packed.stat().st_size < 0.75 * plain.stat().st_size  # about (1 - s) + 1/8 of the int8 bytes
    np.testing.assert_array_equal(ort.InferenceSession(str(packed)).run(None, {"X": x})[0],
                                  ort.InferenceSession(str(plain)).run(None, {"X": x})[0])
    assert cli("verify", packed, "--pattern", "2:4", "--after", "ort-opt").ok()


def test_bad_input_exits_2(pruned, tmp_path):
    path, _, _ = pruned
    assert "--after" in assert_user_error(cli("verify", path, "--after", "tensorrt"))
    assert "N:M" in assert_user_error(cli("verify", path, "--pattern", "structured"))
    assert "calibrat" in assert_user_error(cli("quantize", path, "-o", tmp_path / "q.onnx"))
    assert "mode" in assert_user_error(cli("quantize", path, "-o", tmp_path / "q.onnx", "--mode", "fp8"))
    assert "input model" in assert_user_error(cli("quantize", path, "-o", path, "--mode", "int8-dynamic"))


def test_2of4_survives_conv_batchnorm_folding_on_a_real_model(tmp_path):
    """PP-OCR's direction classifier (paddle2onnx, Conv + BatchNorm): onnxruntime folds each BN
    into its Conv under a new name (ConvBnFusion_W_...); the pruned weights are still found."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    model = spec and Path(spec.origin).parent / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    if not model or not model.is_file():
        pytest.skip("rapidocr_onnxruntime's models are not installed")
    pruned = tmp_path / "cls-2of4.onnx"
    cli("apply", model, "-m", "magnitude", "-p", "2:4", "-o", pruned).ok()
    report = json.loads(cli("verify", pruned, "--pattern", "2:4", "--after", "ort-opt", "--json").ok().out)
    optimized = report["steps"][1]
    assert optimized["totals"]["pattern_valid"] == report["steps"][0]["totals"]["pattern_valid"] > 20
    assert any(row["name"].startswith("ConvBnFusion_W_") and row["matched"] for row in optimized["layers"])
