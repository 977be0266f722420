"""Unstructured passes prune exactly the counts and the weights they promise."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import OUT_AXIS, assert_bit_identical, assert_runs_like, initializers, layout_of, prune, rows
from graphs import conv_model, mixed_model, save

SPARSITY = 0.3


@pytest.fixture(scope="module", params=["mixed", "conv", "llama"])
def source(request, hf_model, tmp_path_factory) -> Path:
    """A model with every weight orientation: MatMul, Gemm transB=0/1, Transpose, Conv, a real Llama."""
    if request.param == "llama":
        return hf_model("llama").onnx_path
    build = {"mixed": mixed_model, "conv": lambda: conv_model(in_channels=8)}[request.param]
    return save(build(), tmp_path_factory.mktemp(request.param) / "model.onnx")


@dataclass
class Result:
    before: dict[str, np.ndarray]
    after: dict[str, np.ndarray]
    targets: list[str]
    layouts: dict[str, str]
    out: Path


def run(source: Path, folder: Path, method: str, sparsity: float = SPARSITY, *options) -> Result:
    out, report = folder / f"{method}-{'-'.join(options)}.onnx", folder / "report.json"
    prune(source, out, "--method", method, "--sparsity", sparsity, *options, report=report)
    targets = [t["name"] for t in json.loads(report.read_text())["targets"]]
    assert targets
    proto = onnx.load(str(source))
    return Result(initializers(source), initializers(out), targets, {n: layout_of(proto, n) for n in targets}, out)


def test_magnitude_prunes_exactly_floor_numel_s_per_matrix(source, tmp_path):
    result = run(source, tmp_path, "magnitude")
    for name in result.targets:
        before, after = result.before[name], result.after[name]
        assert (after == 0).sum() == int(before.size * SPARSITY), name
        pruned = (after == 0) & (before != 0)
        # one threshold per matrix: everything pruned is no larger than anything kept
        assert np.abs(before[pruned]).max() <= np.abs(after[~pruned]).min()
        assert (after[~pruned] == before[~pruned]).all()
    assert_runs_like(result.out, source)


def test_magnitude_output_prunes_exactly_floor_k_s_per_output_neuron(source, tmp_path):
    result = run(source, tmp_path, "magnitude-output")
    for name in result.targets:
        out_axis = OUT_AXIS[result.layouts[name]]
        before, after = rows(result.before[name], out_axis), rows(result.after[name], out_axis)
        k = before.shape[1]
        assert ((after == 0).sum(axis=1) == int(k * SPARSITY)).all(), name
        for dense, sparse in zip(before, after):
            assert np.abs(dense[sparse == 0]).max() <= np.abs(sparse[sparse != 0]).min()


def test_random_is_reproducible_per_seed(source, tmp_path):
    first = run(source, tmp_path / "a", "random", SPARSITY, "--seed", "1")
    again = run(source, tmp_path / "b", "random", SPARSITY, "--seed", "1")
    other = run(source, tmp_path / "c", "random", SPARSITY, "--seed", "2")
    assert_bit_identical(first.after, again.after, first.after)
    for name in first.targets:
        assert (first.after[name] == 0).sum() == int(first.before[name].size * SPARSITY)
        assert not np.array_equal(first.after[name] == 0, other.after[name] == 0), name


def test_inverse_magnitude_prunes_the_largest(source, tmp_path):
    result = run(source, tmp_path, "inverse-magnitude")
    for name in result.targets:
        before, after = result.before[name], result.after[name]
        pruned = after == 0
        assert pruned.sum() == int(before.size * SPARSITY)
        assert np.abs(after[~pruned]).max() <= np.abs(before[pruned]).min()


def test_sparsity_zero_changes_nothing(source, tmp_path):
    result = run(source, tmp_path, "magnitude", 0.0)
    assert set(result.after) == set(result.before)
    assert_bit_identical(result.before, result.after, result.before)
