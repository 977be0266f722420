"""Unit tests: pattern parsing, mask selection, and the stored ↔ canonical weight layouts."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import K_AXIS, assert_nm

from onnxprune.errors import UserError
from onnxprune.patterns import Pattern, nm_valid, parse_pattern, select_lowest, sparsity_of
from onnxprune.targets import Layout


@pytest.mark.parametrize("pattern, sparsity, expected", [
    ("2:4", None, Pattern(0.5, 2, 4)),
    ("2:4", 0.5, Pattern(0.5, 2, 4)),
    (" 4 : 8 ", None, Pattern(0.5, 4, 8)),
    ("1:4", 0.25, Pattern(0.25, 1, 4)),
    ("3:4", None, Pattern(0.75, 3, 4)),
    (None, 0.3, Pattern(0.3)),
    ("unstructured", 0.0, Pattern(0.0)),
    ("Unstructured", 0.9, Pattern(0.9)),
])
def test_parse_pattern_accepts(pattern, sparsity, expected):
    parsed = parse_pattern(pattern, sparsity)
    assert parsed == expected
    assert parsed.is_nm == (expected.m > 0)
    assert parsed.label == (f"{expected.n}:{expected.m}" if expected.m else "unstructured")


@pytest.mark.parametrize("pattern, sparsity, message", [
    (None, None, "give --sparsity"),
    (None, 1.0, "[0, 1)"),
    (None, -0.1, "[0, 1)"),
    ("unstructured", 1.5, "[0, 1)"),
    ("2:x", None, "N:M"),
    ("abc", None, "N:M"),
    ("2:4:8", None, "N:M"),
    ("-1:4", None, "N:M"),
    ("4:2", None, "0 < N < M"),
    ("0:4", None, "0 < N < M"),
    ("4:4", None, "0 < N < M"),
    ("2:4", 0.6, "contradicts"),
    ("2:4", 0.25, "contradicts"),
])
def test_parse_pattern_rejects(pattern, sparsity, message):
    with pytest.raises(UserError) as error:
        parse_pattern(pattern, sparsity)
    assert message in str(error.value)


@pytest.mark.parametrize("k, s, expected", [(100, 0.3, 30), (10, 0.25, 2), (7, 0.5, 3), (64, 0.0, 0), (3, 0.99, 2)])
def test_pruned_count_is_floor(k, s, expected):
    assert Pattern(s).pruned_count(k) == expected


def scores(shape=(12, 64), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape)


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.3, 0.5, 0.77, 0.99])
def test_select_lowest_whole_matrix(sparsity):
    values = scores()
    mask = select_lowest(values, Pattern(sparsity), per_output=False)
    assert mask.dtype == bool and mask.shape == values.shape
    assert mask.sum() == int(values.size * sparsity)
    if mask.any():
        assert values[mask].max() < values[~mask].min()


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.3, 0.5, 0.77, 0.99])
def test_select_lowest_per_output(sparsity):
    values = scores(seed=1)
    mask = select_lowest(values, Pattern(sparsity), per_output=True)
    count = int(values.shape[1] * sparsity)
    assert (mask.sum(axis=1) == count).all()
    for row, chosen in zip(values, mask):
        if count:
            assert row[chosen].max() < row[~chosen].min()


@pytest.mark.parametrize("n, m", [(1, 4), (2, 4), (3, 4), (4, 8), (1, 2), (5, 16)])
@pytest.mark.parametrize("per_output", [False, True])
def test_select_lowest_n_m(n, m, per_output):
    values = scores(seed=n * 100 + m)
    mask = select_lowest(values, Pattern(n / m, n, m), per_output)
    groups_mask = mask.reshape(values.shape[0], -1, m)
    groups = values.reshape(values.shape[0], -1, m)
    assert (groups_mask.sum(axis=-1) == n).all()
    for group, chosen in zip(groups.reshape(-1, m), groups_mask.reshape(-1, m)):
        assert group[chosen].max() < group[~chosen].min()
    weights = np.where(mask, 0.0, 1.0)
    assert nm_valid(weights, n, m)
    assert sparsity_of(weights) == pytest.approx(n / m)


def test_nm_valid_and_sparsity_of():
    weight = np.ones((2, 8))
    assert not nm_valid(weight, 2, 4)
    weight[:, [0, 1, 6, 7]] = 0
    assert nm_valid(weight, 2, 4) and nm_valid(weight, 4, 8) and not nm_valid(weight, 3, 4)
    weight[1, 0] = 5  # one group of the second row keeps three
    assert not nm_valid(weight, 2, 4) and nm_valid(weight, 1, 4)
    assert not nm_valid(np.zeros((2, 6)), 2, 4)  # K not divisible by M
    assert sparsity_of(weight) == 7 / 16
    assert sparsity_of(np.zeros((0, 4))) == 0.0


def stored(shape) -> np.ndarray:
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape)


def test_layout_kn():
    layout, array = Layout("kn", (32, 48)), stored((32, 48))  # MatMul B: [K, N]
    canonical = layout.to_canonical(array)
    assert canonical.shape == (48, 32) and (layout.out_features, layout.in_features) == (48, 32)
    assert layout.nm_group_extent == 32
    assert canonical[5, 7] == array[7, 5]  # output j, input k
    assert np.array_equal(layout.from_canonical(canonical), array)


def test_layout_nk():
    layout, array = Layout("nk", (48, 32)), stored((48, 32))  # Gemm transB=1: [N, K]
    canonical = layout.to_canonical(array)
    assert canonical.shape == (48, 32) and (layout.out_features, layout.in_features) == (48, 32)
    assert layout.nm_group_extent == 32
    assert canonical[5, 7] == array[5, 7]
    assert np.array_equal(layout.from_canonical(canonical), array)


def test_layout_conv():
    shape = (6, 8, 3, 2)  # [O, C, kh, kw]
    layout, array = Layout("conv", shape), stored(shape)
    canonical = layout.to_canonical(array)
    assert canonical.shape == (6, 8 * 3 * 2) and (layout.out_features, layout.in_features) == (6, 48)
    assert layout.nm_group_extent == 8
    # K is ordered (kh, kw, c): consecutive canonical columns are consecutive input channels
    for o, c, kh, kw in [(0, 0, 0, 0), (5, 7, 2, 1), (3, 4, 1, 0), (2, 1, 0, 1)]:
        assert canonical[o, (kh * 2 + kw) * 8 + c] == array[o, c, kh, kw]
    assert np.array_equal(layout.from_canonical(canonical), array)


@pytest.mark.parametrize("kind, shape", [("kn", (16, 24)), ("nk", (24, 16)), ("conv", (4, 8, 3, 3)), ("conv", (4, 4, 5))])
def test_layout_round_trip_of_a_pruned_mask(kind, shape):
    """Pruning 2:4 in canonical space lands on groups of 4 along K in stored space."""
    layout = Layout(kind, shape)
    array = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    canonical = layout.to_canonical(array).copy()
    canonical[select_lowest(np.abs(canonical), Pattern(0.5, 2, 4), False)] = 0
    back = layout.from_canonical(canonical)
    assert back.shape == shape
    assert_nm(back, K_AXIS[kind], 2, 4)
