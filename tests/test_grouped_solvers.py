"""A grouped convolution's g sub-problems are solved in one batch (a leading group axis in SparseGPT
and MAMA, per-row statistics in Wanda): the result must equal pruning each group as a layer of its
own (`Layer.group`), which is what the pipeline did one call per group before."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from test_mama import activations

from onnxprune.passes import Layer
from onnxprune.passes.mama import Mama
from onnxprune.passes.sparsegpt import SparseGPT
from onnxprune.passes.wanda import Wanda
from onnxprune.patterns import Pattern
from onnxprune.statistics import Accumulator

GROUPS, ROWS = 5, 6


def grouped_layer(k: int, bias: bool) -> Layer:
    """A random grouped conv layer: W [g·rows, K], each group's statistics from its own
    correlated inputs (one group with a dead input channel), gathered as calibration does."""
    rows = np.stack([activations(seed, tokens=512, k=k, dead=(3,) if seed == 2 else ()) for seed in range(GROUPS)])
    accumulator = Accumulator(frozenset({"sq_sum", "gram", "sum"}))
    for sample in np.split(rows, 4, axis=1):  # four calibration samples of 128 tokens
        accumulator.add(sample)
    rng = np.random.default_rng(k)
    layer = Layer("conv", rng.normal(size=(GROUPS * ROWS, k)).astype(np.float32),
                  rng.normal(size=GROUPS * ROWS).astype(np.float32) if bias else None, rng, accumulator.as_dict())
    assert layer.groups == GROUPS
    return layer


METHODS = {
    "sparsegpt-numpy": lambda: SparseGPT(backend="numpy"),
    "sparsegpt-torch": lambda: SparseGPT(backend="torch"),
    "sparsegpt-blocks": lambda: SparseGPT(blocksize=8, backend="numpy"),  # several blocks and lazy updates
    "mama-numpy": lambda: Mama(backend="numpy"),
    "mama-torch": lambda: Mama(backend="torch"),
    "mama-cg": lambda: Mama(backend="numpy"),
    "wanda": Wanda,
}
CASES = [(method, k, pattern) for method in METHODS
         for k, pattern in [(25, Pattern(0.5)), (24, Pattern(0.5, 2, 4)), (32, Pattern(0.7))]]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("name,k,pattern", CASES, ids=[f"{m}-K{k}-{p.label}-{p.sparsity}" for m, k, p in CASES])
def test_batched_groups_equal_one_group_at_a_time(name, k, pattern, bias):
    layer = grouped_layer(k, bias)
    method = METHODS[name]()
    if name == "mama-cg":
        method.direct_max_kept = 0
    batched = method.prune(replace(layer, weight=layer.weight.copy()), pattern)
    looped = [method.prune(layer.group(j), pattern) for j in range(GROUPS)]
    weight = np.concatenate([p.weight for p in looped])
    np.testing.assert_array_equal(batched.weight == 0, weight == 0)
    np.testing.assert_allclose(batched.weight, weight, rtol=1e-5, atol=1e-6)
    assert (batched.weight == 0).mean() >= pattern.pruned_count(k) / k  # something was pruned: ⌊K·s⌋ per row
    if name.startswith("mama") and bias:
        np.testing.assert_allclose(batched.bias, np.concatenate([p.bias for p in looped]), rtol=1e-5, atol=1e-5)
    else:
        assert batched.bias is None and all(p.bias is None for p in looped)
    if name.startswith("sparsegpt"):
        assert (batched.weight[2 * ROWS:3 * ROWS, 3] == 0).all()  # the dead input of group 2
