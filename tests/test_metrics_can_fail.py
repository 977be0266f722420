"""Every metric fed known-bad outputs: dead (all-zero), constant, NaN and Inf models never score as
perfect, and each says what is wrong."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from conftest import cli
from graphs import Dense, chain_model, make_model, save
from onnx import TensorProto, helper, numpy_helper

from onnxprune.evaluation import perplexity_of_ids
from onnxprune.fidelity import Agreement

REFERENCE = np.random.default_rng(0).normal(size=(6, 10))


def agreement(model_rows: np.ndarray, reference_rows: np.ndarray = REFERENCE) -> dict:
    metrics = Agreement()
    metrics.add(model_rows, reference_rows)
    return metrics.result()


def test_identical_outputs_are_perfect():
    result = agreement(REFERENCE.copy())
    assert result["cosine"] == pytest.approx(1.0) and result["relative_error"] == 0
    assert result["top1_agreement"] == 1 and result["warnings"] == []


def test_dead_model_scores_zero_and_is_flagged():
    result = agreement(np.zeros_like(REFERENCE))
    assert result["cosine"] == 0 and result["relative_error"] == pytest.approx(1.0)
    assert result["top1_agreement"] == 0  # argmax of a zero row is not a prediction
    assert any("dead model" in w for w in result["warnings"])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_model_makes_every_metric_nan(bad):
    rows = REFERENCE.copy()
    rows[2, 3] = bad
    result = agreement(rows)
    assert math.isnan(result["cosine"]) and math.isnan(result["relative_error"])
    assert math.isnan(result["top1_agreement"])
    assert result["warnings"] == ["the model's output is NaN or Inf in 1 of 6 rows"]


def test_constant_model_has_no_top1_prediction():
    result = agreement(np.ones_like(REFERENCE))
    assert result["top1_agreement"] == 0 and result["cosine"] < 0.9
    assert any("constant" in w for w in result["warnings"])


def test_dead_reference_is_flagged():
    result = agreement(REFERENCE, np.zeros_like(REFERENCE))
    assert result["cosine"] == 0 and result["relative_error"] == math.inf
    assert any("reference's output is all zero" in w for w in result["warnings"])


def test_eval_reference_of_an_all_zero_model_is_not_1(tmp_path):
    dense = chain_model([Dense("MatMul", 32, 48), Dense("MatMul", 48, 16)])
    dead = onnx.ModelProto()
    dead.CopyFrom(dense)
    for tensor in dead.graph.initializer:
        tensor.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(tensor)), tensor.name))
    save(dense, tmp_path / "dense.onnx")
    save(dead, tmp_path / "dead.onnx")
    np.savez(tmp_path / "x.npz", X=np.random.default_rng(1).normal(size=(5, 32)).astype(np.float32))
    result = cli("eval", tmp_path / "dead.onnx", "--reference", tmp_path / "dense.onnx", "--inputs",
                 tmp_path / "x.npz", "-o", tmp_path / "f.json").ok()
    assert "cosine 0.000000" in result.out
    assert "warning: h1: the model's output is all zero in 5 of 5 rows (a dead model)" in result.err
    metrics = json.loads((tmp_path / "f.json").read_text())["outputs"]["h1"]
    assert metrics["cosine"] == 0 and metrics["warnings"]


def lm_with_logits(path, table: np.ndarray):
    """ids → Gather(table) → logits [batch, seq, vocab]: the logits of token t are table[t]."""
    vocab = table.shape[0]
    graph = make_model([helper.make_node("Gather", ["table", "input_ids"], ["logits"], name="/lm/Gather")],
                       [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
                       [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab])],
                       {"table": table.astype(np.float32)})
    return save(graph, path)


def test_perplexity_of_nan_logits_is_nan_and_flagged(tmp_path):
    table = np.random.default_rng(2).normal(size=(12, 12))
    ids = np.random.default_rng(3).integers(0, 12, 64)
    healthy = perplexity_of_ids(lm_with_logits(tmp_path / "ok.onnx", table), ids, 16)
    assert math.isfinite(healthy.perplexity) and healthy.warnings == ()
    table[ids[20]] = np.nan  # every window holding this token gets NaN logits
    broken = perplexity_of_ids(lm_with_logits(tmp_path / "nan.onnx", table), ids, 16)
    assert math.isnan(broken.perplexity)
    assert broken.warnings and "NaN or Inf logits" in broken.warnings[0]
    assert broken.as_dict()["warnings"] == list(broken.warnings)


def test_perplexity_of_a_dead_lm_is_the_vocabulary_size(tmp_path):
    """All-zero logits are a uniform guess: perplexity = vocab, never something that looks trained."""
    ids = np.random.default_rng(4).integers(0, 12, 32)
    result = perplexity_of_ids(lm_with_logits(tmp_path / "dead.onnx", np.zeros((12, 12))), ids, 16)
    assert result.perplexity == pytest.approx(12.0)
