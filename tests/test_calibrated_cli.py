"""Calibrated methods through the CLI on a non-text graph (.npz inputs), and their error lines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import assert_user_error, cli, initializers
from graphs import Dense, chain_model, save

from onnxprune.boundary_cache import BoundaryCache


def wanda_mask_rows(weight_nk: np.ndarray, x: np.ndarray, sparsity: float) -> np.ndarray:
    """Wanda straight from the math: per output row, zero the int(K·s) lowest |W|·‖X_j‖."""
    scores = np.abs(weight_nk) * np.sqrt((x.astype(np.float64) ** 2).sum(0))
    pruned = np.zeros_like(weight_nk, dtype=bool)
    order = np.argsort(scores, axis=1)[:, : int(weight_nk.shape[1] * sparsity)]
    np.put_along_axis(pruned, order, True, axis=1)
    return pruned


@pytest.fixture
def gemm_chain(tmp_path):
    """Two Gemm layers (transB=1, with bias) in blocks layers.0 / layers.1, plus calibration inputs."""
    model = save(chain_model([Dense("Gemm", 32, 48, True, bias=True), Dense("Gemm", 48, 24, True)]),
                 tmp_path / "chain.onnx")
    # .npz convention: the first axis indexes samples, each fed as a batch of one (here one row).
    x = np.random.default_rng(3).standard_normal((35, 32)).astype(np.float32)
    x[..., 4] *= 20.0  # one outlier channel, so Wanda's choice differs from magnitude's
    np.savez(tmp_path / "calib.npz", X=x)
    return model, x


def test_wanda_sequential_on_npz_inputs(gemm_chain, tmp_path):
    model, x = gemm_chain
    out = tmp_path / "wanda.onnx"
    cli("apply", model, "-m", "wanda", "-s", "0.5", "--calib", tmp_path / "calib.npz", "-o", out).ok()
    dense, pruned = initializers(model), initializers(out)
    rows = x.reshape(-1, 32)
    first = np.where(wanda_mask_rows(dense["layers.0.weight"], rows, 0.5), 0, dense["layers.0.weight"])
    np.testing.assert_array_equal(pruned["layers.0.weight"], first)
    # Layer 1 is calibrated on the output of the *pruned* layer 0 (sequential mode).
    hidden = np.maximum(rows @ first.T + dense["layers.0.bias"], 0)
    second = np.where(wanda_mask_rows(dense["layers.1.weight"], hidden, 0.5), 0, dense["layers.1.weight"])
    np.testing.assert_array_equal(pruned["layers.1.weight"], second)
    np.testing.assert_array_equal(pruned["layers.0.bias"], dense["layers.0.bias"])


def test_calibration_errors(gemm_chain, tmp_path):
    model, x = gemm_chain
    out = tmp_path / "o.onnx"
    line = assert_user_error(cli("apply", model, "-m", "wanda", "-s", "0.5", "-o", out))
    assert "--calib" in line
    text = tmp_path / "calib.txt"
    text.write_text("plenty of words " * 200)
    line = assert_user_error(cli("apply", model, "-m", "sparsegpt", "-s", "0.5", "--calib", text, "-o", out))
    assert "tokenizer" in line or "text" in line
    np.savez(tmp_path / "wrong.npz", input_ids=np.zeros((2, 8), np.int64))
    line = assert_user_error(cli("apply", model, "-m", "wanda", "-s", "0.5", "--calib", tmp_path / "wrong.npz",
                                 "-o", out))
    assert "lack X" in line
    line = assert_user_error(cli("apply", model, "-m", "wanda", "-s", "0.5", "--stats", tmp_path / "none.npz",
                                 "-o", out))
    assert "not found" in line
    assert not out.exists()


def test_stats_from_another_model_are_refused(gemm_chain, tmp_path):
    model, _ = gemm_chain
    other = save(chain_model([Dense("MatMul", 32, 40), Dense("MatMul", 40, 24)], seed=9), tmp_path / "other.onnx")
    cli("calibrate", other, "--calib", tmp_path / "calib.npz", "-o", tmp_path / "stats.npz", "-m", "wanda").ok()
    line = assert_user_error(cli("apply", model, "-m", "wanda", "-s", "0.5", "--stats", tmp_path / "stats.npz",
                                 "-o", tmp_path / "o.onnx"))
    assert "layers.1" in line and "K=40" in line and "K=48" in line


def test_boundary_cache_on_disk_gives_the_same_result(gemm_chain, tmp_path, monkeypatch):
    """With no memory budget every boundary tensor is memory-mapped from disk: same pruned model."""
    model, _ = gemm_chain
    cli("apply", model, "-m", "sparsegpt", "-s", "0.5", "--calib", tmp_path / "calib.npz", "-o", tmp_path / "a.onnx").ok()
    monkeypatch.setenv("ONNXPRUNE_CACHE_MB", "0")
    spilled = []
    real_spill = BoundaryCache._spill
    monkeypatch.setattr(BoundaryCache, "_spill", lambda self, array: spilled.append(1) or real_spill(self, array))
    cli("apply", model, "-m", "sparsegpt", "-s", "0.5", "--calib", tmp_path / "calib.npz", "-o", tmp_path / "b.onnx").ok()
    assert len(spilled) == 35  # one boundary tensor (layer 0's output) per sample
    a, b = initializers(tmp_path / "a.onnx"), initializers(tmp_path / "b.onnx")
    assert all(np.array_equal(a[name], b[name]) for name in a)


def test_boundary_cache_budget():
    cache = BoundaryCache(samples=2, budget_bytes=100)
    small, big = np.ones(10, np.float32), np.ones(100, np.float32)
    cache.put("x", 0, small)
    cache.put("x", 1, big)
    assert cache.in_memory == 40 and isinstance(cache.get("x", 1), np.memmap)
    cache.put("x", 0, big)  # replaces the in-memory one: the budget is freed, still too small
    assert cache.in_memory == 0 and isinstance(cache.get("x", 0), np.memmap)
    spilled = Path(cache.get("x", 0).filename)
    cache.keep_only(set())
    assert "x" not in cache and not spilled.exists()
    cache.close()


def test_stage_timer_counts_nested_stages_once(monkeypatch):
    """A stage opened inside another counts for itself only, so stages add up to the wall time."""
    import onnxprune.pipeline as pipeline

    clock = iter([0.0, 1.0, 4.0, 10.0])  # outer opens, inner opens, inner closes, outer closes
    monkeypatch.setattr(pipeline.time, "perf_counter", lambda: next(clock))
    timer = pipeline.StageTimer()
    with timer.stage("calibrate"):
        with timer.stage("load_data"):
            pass
    assert timer.seconds == {"calibrate": 7.0, "load_data": 3.0}
