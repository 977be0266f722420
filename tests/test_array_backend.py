"""The numpy backend (the core install's) computes what the torch backend does: primitive by primitive,
and SparseGPT and MAMA end to end on layers large enough for several blocks and both MAMA solvers."""

from __future__ import annotations

import numpy as np
import pytest
from test_mama import activations, dense, error, stats_of

from onnxprune import array_backend
from onnxprune.array_backend import NumpyBackend, TorchBackend, backend
from onnxprune.passes import Layer
from onnxprune.passes.mama import Mama
from onnxprune.passes.sparsegpt import SparseGPT
from onnxprune.patterns import Pattern

NUMPY, TORCH = NumpyBackend(), TorchBackend()


def spd(rng: np.random.Generator, k: int, batch: tuple[int, ...] = ()) -> np.ndarray:
    x = rng.normal(size=(*batch, 2 * k, k))
    return (np.swapaxes(x, -1, -2) @ x / (2 * k) + 0.1 * np.eye(k)).astype(np.float32)


def both(method: str, *args) -> list:
    """The method's result on each backend (arrays as numpy)."""
    results = []
    for xp in (NUMPY, TORCH):
        result = getattr(xp, method)(*(xp.asarray(a) if isinstance(a, np.ndarray) else a for a in args))
        if isinstance(result, tuple):  # (array, numpy flags)
            result = (xp.to_numpy(result[0]), result[1])
        results.append(result if result is None or isinstance(result, tuple) else xp.to_numpy(result))
    return results


def test_default_is_torch_when_installed_and_names_are_checked():
    assert backend().name == "torch" and backend("numpy").name == "numpy"
    with pytest.raises(ValueError, match="unknown array backend 'cupy'"):
        backend("cupy")


def test_inverse_cholesky_upper_agrees_and_tells_which_matrix_is_indefinite():
    a = spd(np.random.default_rng(0), 96, (3,))
    (upper_np, failed_np), (upper_torch, failed_torch) = both("inverse_cholesky_upper", a)
    assert not failed_np.any() and not failed_torch.any()
    np.testing.assert_allclose(upper_np, upper_torch, rtol=1e-4, atol=1e-5)
    assert np.allclose(np.tril(upper_np, -1), 0)
    for u, matrix in zip(upper_np, a):
        np.testing.assert_allclose(u.T.astype(np.float64) @ u @ matrix, np.eye(96), atol=1e-3)
    a[1] -= 2 * np.eye(96, dtype=np.float32) * np.abs(a[1]).max()
    (upper_np, failed_np), (_, failed_torch) = both("inverse_cholesky_upper", a)
    assert failed_np.tolist() == failed_torch.tolist() == [False, True, False]
    np.testing.assert_allclose(upper_np[[0, 2]], upper_torch[[0, 2]], rtol=1e-4, atol=1e-5)


def test_spd_solve_agrees_and_refuses_a_block_that_is_not_positive_definite():
    rng = np.random.default_rng(1)
    blocks, rhs = spd(rng, 40, (7,)), rng.normal(size=(7, 40)).astype(np.float32)
    x_np, x_torch = both("spd_solve", blocks, rhs)
    np.testing.assert_allclose(x_np, x_torch, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.einsum("bij,bj->bi", blocks, x_np), rhs, rtol=1e-4, atol=1e-4)
    blocks[3] -= 2 * np.eye(40, dtype=np.float32) * np.abs(blocks[3]).max()
    assert both("spd_solve", blocks, rhs) == [None, None]


def test_selections_agree():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 4, 300)).astype(np.float32)  # a group axis first
    lowest_np, lowest_torch = both("lowest_of_columns", x, 2)
    assert lowest_np.dtype == bool and (lowest_np.sum(axis=1) == 2).all()
    np.testing.assert_array_equal(lowest_np, lowest_torch)
    np.testing.assert_array_equal(lowest_np, x <= np.sort(x, axis=1)[:, 1:2])
    expected = np.sort(x.reshape(3, -1), axis=1)[:, 517]
    for kth in both("kth_smallest", x, 517):
        np.testing.assert_array_equal(kth, expected)
    a, b = rng.normal(size=50).astype(np.float32), np.where(rng.random(50) < 0.3, 0, rng.random(50)).astype(np.float32)
    ratio_np, ratio_torch = both("ratio", a, b)
    np.testing.assert_array_equal(ratio_np, ratio_torch)
    np.testing.assert_array_equal(ratio_np, np.where(b > 0, a / np.where(b > 0, b, 1), 0))


def pruned(method, w, b, x, pattern):
    layer = Layer("t", w.copy(), None if b is None else b.copy(), np.random.default_rng(0), stats_of(x))
    result = method.prune(layer, pattern)
    return result.weight, b if result.bias is None else result.bias


@pytest.mark.parametrize("sweep", ["numpy", "torch"])
@pytest.mark.parametrize("pattern", [Pattern(0.5), Pattern(0.5, 2, 4)], ids=["0.5", "2:4"])
def test_sparsegpt_on_numpy_equals_torch(pattern, sweep, monkeypatch):
    """Rows are pruned independently; float32 rounding may flip a near-tie in a row, whose later
    choices then differ, so most rows are equal and the layer's output error is the same. On a
    CPU the column sweep runs on numpy; `sweep="torch"` runs it on torch, as on a GPU."""
    if sweep == "torch":
        monkeypatch.setattr(TorchBackend, "on_cpu", False)
    x, (w, _) = activations(3, tokens=4096, k=320), dense(3, out=160, k=320)
    w_np, _ = pruned(SparseGPT(blocksize=128, backend="numpy"), w, None, x, pattern)
    w_torch, _ = pruned(SparseGPT(blocksize=128, backend="torch"), w, None, x, pattern)
    same_rows = np.isclose(w_np, w_torch, rtol=1e-3, atol=1e-4).all(axis=1)
    assert same_rows.mean() >= 0.97, same_rows.mean()
    assert abs(int((w_np == 0).sum()) - int((w_torch == 0).sum())) <= 2
    e_np, e_torch = (error(w, None, v, 0.0, x) for v in (w_np, w_torch))
    assert abs(e_np - e_torch) <= 1e-3 * e_torch


@pytest.mark.parametrize("solver", ["cholesky", "cg"])
@pytest.mark.parametrize("pattern", [Pattern(0.5), Pattern(0.5, 2, 4)], ids=["0.5", "2:4"])
def test_mama_on_numpy_equals_torch(pattern, solver, monkeypatch):
    """The same solves on both; torch's bfloat16 preconditioner (on CPUs that have fast bfloat16) is
    held at float32, numpy's precision, here (tests/test_mama.py checks its move)."""
    monkeypatch.setattr(array_backend, "_cpu_has_bfloat16_dot_products", lambda: False)
    x, (w, b) = activations(4, k=256), dense(4, out=96, k=256)
    results, methods = [], []
    for name in ("numpy", "torch"):
        method = Mama(backend=name)
        method.direct_max_kept = 2048 if solver == "cholesky" else 0
        results.append(pruned(method, w, b, x, pattern))
        methods.append(method)
    (w_np, b_np), (w_torch, b_torch) = results
    np.testing.assert_array_equal(w_np == 0, w_torch == 0)  # Wanda's mask, computed in numpy by both
    np.testing.assert_allclose(w_np, w_torch, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(b_np, b_torch, rtol=1e-3, atol=1e-3)
    iterations = [m.last_solve["iterations"] for m in methods]
    assert iterations == [0, 0] if solver == "cholesky" else min(iterations) > 0
    assert max(iterations) < Mama.max_iter  # CG stopped by its rule, not by the cap
