"""fp16 / bf16 models: weights pruned and written back in their own dtype, in external data when
they came in it, and statistics accumulated in float32 or wider (fp16 overflows at 65504)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import assert_user_error, cli, initializers, prune
from onnxprune.statistics import Accumulator

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from memory_bound import llama_model  # noqa: E402  the HF-shaped half-precision Llama of the benchmark

LINEARS = [f"model.layers.{i}.{name}.weight" for i in range(2) for name in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
    "mlp.down_proj")]


def _model(tmp_path: Path, dtype: str) -> tuple[Path, Path]:
    model = llama_model(2, 64, 128, 100, tmp_path / dtype / "model.onnx", dtype)
    calib = tmp_path / "calib.npz"
    np.savez(calib, input_ids=np.random.default_rng(1).integers(0, 100, (4, 32)))
    return model, calib


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "mama"])
def test_float16_weights_stay_float16_in_external_data(tmp_path, method):
    model, calib = _model(tmp_path, "float16")
    out = tmp_path / "out" / "pruned.onnx"
    out.parent.mkdir()
    prune(model, out, "-m", method, "-s", "0.5", *(["--calib", calib] if method != "magnitude" else []))
    stored = {t.name: t for t in onnx.load(str(out), load_external_data=False).graph.initializer}
    weights = initializers(out)
    for name in LINEARS:
        assert stored[name].data_type == onnx.TensorProto.FLOAT16, name
        assert stored[name].data_location == onnx.TensorProto.EXTERNAL, name
        assert weights[name].dtype == np.float16
        # SparseGPT drops each block's ties at the threshold too (one more weight per block, as the reference).
        assert 0.5 <= (weights[name] == 0).mean() <= 0.51, name
    logits = ort.InferenceSession(str(out)).run(None, {"input_ids": np.arange(16)[None]})[0]
    assert logits.dtype == np.float16 and np.isfinite(logits).all()


@pytest.mark.parametrize("needs", [frozenset({"sq_sum", "sum"}), frozenset({"gram"})])
def test_statistics_of_float16_activations_do_not_overflow(needs):
    """Σx² over 128 tokens of x = 100 is 1.28e6, and so are the Gram's entries: inf in float16."""
    rows = np.full((1, 128, 8), 100, dtype=np.float16)
    accumulator = Accumulator(needs)
    accumulator.add(rows)
    accumulator.add(rows)
    stats = accumulator.as_dict()
    for key in needs:
        assert stats[key].dtype.itemsize >= 4, key
        expected = {"sq_sum": 2 * 128 * 100.0**2, "sum": 2 * 128 * 100.0, "gram": 2 * 128 * 100.0**2}[key]
        np.testing.assert_allclose(stats[key], expected, rtol=1e-6)


def test_bfloat16_magnitude_keeps_bfloat16_and_calibration_refuses_in_one_line(tmp_path):
    model, calib = _model(tmp_path, "bfloat16")
    out = tmp_path / "pruned.onnx"
    prune(model, out, "-m", "magnitude", "-s", "0.5")
    stored = {t.name: t for t in onnx.load(str(out), load_external_data=False).graph.initializer}
    assert all(stored[name].data_type == onnx.TensorProto.BFLOAT16 for name in LINEARS)
    assert (initializers(out)[LINEARS[0]].astype(np.float32) == 0).mean() == 0.5
    line = assert_user_error(cli("apply", model, "-o", tmp_path / "w.onnx", "-m", "wanda", "-s", "0.5",
                                 "--calib", calib))
    assert "no bfloat16 kernel" in line and "magnitude" in line
