"""MAMA: the move is the least-squares optimum of the layer output error for Wanda's mask.

Errors are measured on the calibration data the statistics came from, against references solved
row by row with numpy (lstsq on the tokens themselves, not on the statistics).
"""

import numpy as np
import pytest
import torch
from conftest import cli, initializers
from graphs import Dense, chain_model, save

from onnxprune.passes import Layer, get_pass
from onnxprune.passes.mama import Mama
from onnxprune.passes.sparsegpt import SparseGPT
from onnxprune.patterns import Pattern, nm_valid

PATTERNS = {"0.5": Pattern(0.5), "0.7": Pattern(0.7), "2:4": Pattern(0.5, 2, 4), "4:8": Pattern(0.5, 4, 8)}


def activations(seed: int, tokens: int = 2048, k: int = 64, dead: tuple[int, ...] = ()) -> np.ndarray:
    """Heavy-tailed inputs with correlated channels (a random mixing), outliers and non-zero means."""
    rng = np.random.default_rng(seed)
    x = rng.standard_t(df=4, size=(tokens, k)) @ (np.eye(k) + rng.normal(size=(k, k)) / np.sqrt(k))
    x[:, rng.choice(k, size=max(1, k // 16), replace=False)] *= 8.0
    x += rng.normal(size=k)
    x[:, list(dead)] = 0.0
    return x.astype(np.float32)


def relu_features(seed: int, tokens: int = 4096, k: int = 256, latent: int = 32) -> np.ndarray:
    """A hidden layer's ReLU outputs (OPT's fc2 inputs): k non-negative, sparse channels driven by
    `latent` factors, so their Gram's spectrum spreads and CG has to work for its move."""
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(tokens, latent)) @ rng.normal(size=(latent, k)) + rng.normal(size=k)
    return np.maximum(hidden, 0.0).astype(np.float32)


def dense(seed: int, out: int = 48, k: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed + 1000)
    return rng.normal(size=(out, k)).astype(np.float32), rng.normal(size=out).astype(np.float32)


def stats_of(x: np.ndarray) -> dict:
    x64 = x.astype(np.float64)
    return {"sq_sum": (x64**2).sum(0), "sum": x64.sum(0), "gram": (x64.T @ x64).astype(np.float32),
            "tokens": len(x), "samples": len(x) // 64}


def prune(method, w, b, x, pattern, allow_new_bias=False):
    """(Ŵ, b̂) with b̂ the layer's bias (or 0) where the pass left it alone."""
    layer = Layer("t", w.copy(), None if b is None else b.copy(), np.random.default_rng(0), stats_of(x),
                  allow_new_bias=allow_new_bias)
    pruned = method.prune(layer, pattern)
    kept = np.zeros(len(w), np.float32) if b is None else b
    return pruned.weight, kept if pruned.bias is None else pruned.bias


def error(w, b, w_hat, b_hat, x) -> float:
    """‖X Wᵀ + b − (X Ŵᵀ + b̂)‖² over the calibration tokens."""
    x64 = x.astype(np.float64)
    b = 0.0 if b is None else b
    return float((((x64 @ w.T.astype(np.float64) + b) - (x64 @ w_hat.T.astype(np.float64) + b_hat)) ** 2).sum())


def optimum(w, mask, x, with_bias: bool, lam: float = 0.0):
    """Per row: the kept weights (and bias shift) minimising ‖X_P w_P − X_K δ − β‖² + n·λ‖δ‖²."""
    x64, n = x.astype(np.float64), len(x)
    w_hat, shift = np.where(mask, 0.0, w.astype(np.float64)), np.zeros(len(w))
    for i, pruned in enumerate(mask):
        design = np.hstack([x64[:, ~pruned], np.ones((n, 1))]) if with_bias else x64[:, ~pruned]
        target = x64[:, pruned] @ w[i, pruned]
        if lam:  # ridge on δ only (not on the bias column)
            ridge = np.sqrt(n * lam) * np.eye(design.shape[1])[: (~pruned).sum()]
            design, target = np.vstack([design, ridge]), np.concatenate([target, np.zeros(len(ridge))])
        solution = np.linalg.lstsq(design, target, rcond=None)[0]
        w_hat[i, ~pruned] += solution[: (~pruned).sum()]
        shift[i] = solution[-1] if with_bias else 0.0
    return w_hat, shift


def optimum_error(w, b, mask, x, lam: float = 0.0) -> float:
    w_hat, shift = optimum(w, mask, x, with_bias=True, lam=lam)
    return error(w, b, w_hat, b + shift, x)


@pytest.mark.parametrize("label", PATTERNS)
def test_move_beats_wanda_and_reaches_the_least_squares_optimum(label):
    pattern, x, (w, b) = PATTERNS[label], activations(0), dense(0)
    w_wanda, _ = prune(get_pass("wanda"), w, b, x, pattern)
    mask = w_wanda == 0
    w_mama, b_mama = prune(get_pass("mama"), w, b, x, pattern)
    assert np.array_equal(w_mama == 0, mask)  # Wanda's mask, weights moved onto the kept ones

    wanda = error(w, b, w_wanda, b, x)
    mama = error(w, b, w_mama, b_mama, x)
    best = optimum_error(w, b, mask, x)
    ridge = optimum_error(w, b, mask, x, lam=Mama.damp * float(x.astype(np.float64).var(0).mean()))
    w_exact, b_exact = prune(Mama(damp=0.0), w, b, x, pattern)
    exact = error(w, b, w_exact, b_exact, x)
    print(f"\n{label}: wanda {wanda:.4g}  mama {mama:.4g} (ridge reference {ridge:.4g})  "
          f"mama damp=0 {exact:.6g}  optimum {best:.6g}")
    assert mama < 0.7 * wanda
    assert abs(mama - ridge) <= 1e-3 * ridge  # the solver: the same damped problem, solved exactly
    assert abs(exact - best) <= 1e-3 * best  # the math: undamped, it is the optimum for the mask
    assert mama <= best * 1.02  # the default damping costs little on the calibration data


def test_centring_with_a_bias_and_not_without():
    """With a bias: the centred covariance + bias shift is the joint optimum, the uncentred one is
    not. Without a bias: the uncentred covariance is the optimum (δ must carry the mean)."""
    pattern, x, (w, b) = Pattern(0.5), activations(1), dense(1)
    mask = prune(get_pass("wanda"), w, b, x, pattern)[0] == 0
    exact = Mama(damp=0.0)

    centred = error(w, b, *prune(exact, w, b, x, pattern), x)
    with_bias = optimum_error(w, b, mask, x)
    stats, removed = stats_of(x), np.where(mask, w, 0.0)
    mean = stats["sum"] / len(x)
    delta = exact.move(removed[None], ~mask[None], stats["gram"][None].astype(np.float64) / len(x))[0]
    uncentred = error(w, b, np.where(mask, 0.0, w + delta), b + (removed - delta) @ mean, x)

    plain = error(w, None, *prune(exact, w, None, x, pattern), x)
    without_bias = error(w, None, optimum(w, mask, x, False)[0], 0.0, x)
    print(f"\nbias: centred {centred:.6g}  uncentred {uncentred:.6g}  optimum {with_bias:.6g}\n"
          f"no bias: uncentred {plain:.6g}  optimum {without_bias:.6g}")
    assert abs(centred - with_bias) <= 1e-4 * with_bias
    assert uncentred > 1.01 * with_bias
    assert abs(plain - without_bias) <= 1e-4 * without_bias


def test_nothing_pruned_changes_nothing():
    x, (w, b) = activations(2), dense(2)
    layer = Layer("t", w.copy(), b.copy(), np.random.default_rng(0), stats_of(x))
    pruned = get_pass("mama").prune(layer, Pattern(0.0))
    assert np.array_equal(pruned.weight, w) and pruned.bias is None


@pytest.mark.parametrize("label", PATTERNS)
def test_pattern_and_exact_sparsity_survive_the_move(label):
    pattern, x, (w, b) = PATTERNS[label], activations(3, dead=(5, 17)), dense(3)
    w_wanda, _ = prune(get_pass("wanda"), w, b, x, pattern)
    w_mama, b_mama = prune(get_pass("mama"), w, b, x, pattern)
    assert np.isfinite(w_mama).all() and np.isfinite(b_mama).all()
    assert np.array_equal(w_mama == 0, w_wanda == 0)
    assert ((w_mama == 0).sum(1) == int(w.shape[1] * pattern.sparsity)).all()
    if pattern.is_nm:
        assert nm_valid(w_mama, pattern.n, pattern.m)
    assert (w_mama[:, [5, 17]] == 0).all()  # dead inputs score 0: pruned first, nothing to move
    assert error(w, b, w_mama, b_mama, x) < error(w, b, w_wanda, b, x)


def test_bias_takes_the_mean():
    pattern, x, (w, _) = Pattern(0.5), activations(4), dense(4)
    w_plain, b_plain = prune(get_pass("mama"), w, None, x, pattern)
    layer = Layer("t", w.copy(), None, np.random.default_rng(0), stats_of(x), allow_new_bias=True)
    pruned = get_pass("mama").prune(layer, pattern)
    assert pruned.bias is not None and pruned.bias.shape == (len(w),) and pruned.bias.dtype == np.float32
    plain, biased = error(w, None, w_plain, b_plain, x), error(w, None, pruned.weight, pruned.bias, x)
    print(f"\nno bias {plain:.5g}  new bias {biased:.5g}")
    assert biased < 0.98 * plain


@pytest.mark.parametrize("with_bias", [True, False])
def test_against_sparsegpt(with_bias):
    """Both reconstruct; MAMA solves exactly for Wanda's mask (and uses the bias), SparseGPT picks
    its mask adaptively but reconstructs greedily left to right."""
    results = []
    for seed in range(5):
        x, (w, b) = activations(10 + seed), dense(10 + seed)
        b = b if with_bias else None
        wanda = error(w, b, *prune(get_pass("wanda"), w, b, x, Pattern(0.5)), x)
        mama = error(w, b, *prune(get_pass("mama"), w, b, x, Pattern(0.5)), x)
        sparsegpt = error(w, b, *prune(SparseGPT(), w, b, x, Pattern(0.5)), x)
        results.append((wanda, mama, sparsegpt))
        print(f"\nbias={with_bias} seed {seed}: wanda {wanda:.4g}  mama {mama:.4g}  sparsegpt {sparsegpt:.4g}")
    assert all(mama < sparsegpt for _, mama, sparsegpt in results)


def test_cg_gets_the_exact_solves_gain_on_a_1024_layer(capsys):
    """CG's stopping rule (a step gains < tol of the gain so far) leaves little of the move's gain."""
    x, w = activations(5, tokens=4096, k=1024), np.random.default_rng(5).normal(size=(1024, 1024)).astype(np.float32)
    cg, exact = Mama(), Mama()
    exact.direct_max_kept = 1024
    w_cg, b_cg = prune(cg, w, None, x, Pattern(0.5), allow_new_bias=True)
    w_exact, b_exact = prune(exact, w, None, x, Pattern(0.5), allow_new_bias=True)
    wanda = error(w, None, np.where(w_exact == 0, 0.0, w), 0.0, x)
    best, got = error(w, None, w_exact, b_exact, x), error(w, None, w_cg, b_cg, x)
    with capsys.disabled():
        print(f"\nmama [1024, 1024] 50%: CG {cg.last_solve}, excess {(got - best) / (wanda - best):.1e} of the gain")
    assert 0 < cg.last_solve["iterations"] < Mama.max_iter and exact.last_solve["iterations"] == 0
    assert got - best <= 1e-3 * (wanda - best)


@pytest.mark.parametrize("low_precision", [False, True], ids=["float32", "bfloat16"])
def test_preconditioned_cg_reaches_the_exact_move_in_fewer_iterations(low_precision, monkeypatch):
    """CG on (Ĉ⁻¹)_KK-preconditioned systems ends at the exact solve's move, in fewer iterations than
    with the Jacobi scaling alone, with its preconditioner in float32 or in bfloat16 (as on CPUs with
    bfloat16 dot products: forced here, so the rounding is exercised on any CPU)."""
    from onnxprune import array_backend

    monkeypatch.setattr(array_backend, "_cpu_has_bfloat16_dot_products", lambda: low_precision)
    x, w = relu_features(12), np.random.default_rng(12).normal(size=(256, 256)).astype(np.float32)
    exact, plain, preconditioned = Mama(backend="torch"), Mama(backend="torch"), Mama(backend="torch")
    exact.direct_max_kept, plain.precondition = 1024, False
    results = {m: prune(m, w, None, x, Pattern(0.5), allow_new_bias=True) for m in (exact, plain, preconditioned)}
    errors = {m: error(w, None, *results[m], x) for m in results}
    wanda = error(w, None, np.where(results[exact][0] == 0, 0.0, w), 0.0, x)
    gain = wanda - errors[exact]
    for method in (plain, preconditioned):
        excess = (errors[method] - errors[exact]) / gain
        assert excess <= 2e-4, (method.last_solve, excess)
    assert 0 < preconditioned.last_solve["iterations"] <= 0.7 * plain.last_solve["iterations"], \
        (preconditioned.last_solve, plain.last_solve)


def test_singular_system_solves_without_the_preconditioner():
    """Undamped with dead inputs, the system is singular: no inverse, CG on the Jacobi scaling alone,
    and the move still lands on the optimum for the mask."""
    x, (w, b) = activations(13, k=128, dead=(3, 40)), dense(13, out=64, k=128)
    method = Mama(damp=0.0)
    method.direct_max_kept = 0
    w_hat, b_hat = prune(method, w, b, x, Pattern(0.5))
    assert np.isfinite(w_hat).all() and method.last_solve["iterations"] > 0
    best = optimum_error(w, b, w_hat == 0, x)
    assert error(w, b, w_hat, b_hat, x) <= best * (1 + 1e-3)


def test_stopping_early_still_improves_on_wanda():
    """CG from δ = 0 lowers the output error at every step: a capped solve warns and is still better."""
    pattern, x, (w, b) = Pattern(0.5), activations(6), dense(6)
    method = Mama()
    method.max_iter, method.direct_max_kept = 3, 0  # force the iterative solver
    with pytest.warns(UserWarning, match="stopped after 3 iterations"):
        w_mama, b_mama = prune(method, w, b, x, pattern)
    w_wanda, _ = prune(get_pass("wanda"), w, b, x, pattern)
    assert error(w, b, w_mama, b_mama, x) < error(w, b, w_wanda, b, x)


def test_through_the_cli(tmp_path):
    """`apply -m mama` end to end: the first layer (with bias, so its statistics come straight from
    the calibration inputs) lands on the least-squares optimum for Wanda's mask."""
    model = save(chain_model([Dense("Gemm", 32, 48, True, bias=True), Dense("Gemm", 48, 24, True)]),
                 tmp_path / "chain.onnx")
    x = activations(7, tokens=96, k=32)
    np.savez(tmp_path / "calib.npz", X=x)
    for method in ("wanda", "mama"):
        cli("apply", model, "-m", method, "-s", "0.5", "--calib", tmp_path / "calib.npz",
            "-o", tmp_path / f"{method}.onnx").ok()
    dense, wanda, mama = (initializers(path) for path in (model, tmp_path / "wanda.onnx", tmp_path / "mama.onnx"))
    w, b = dense["layers.0.weight"], dense["layers.0.bias"]
    mask = wanda["layers.0.weight"] == 0
    assert np.array_equal(mama["layers.0.weight"] == 0, mask)
    moved = error(w, b, mama["layers.0.weight"], mama["layers.0.bias"], x)
    assert moved < 0.8 * error(w, b, wanda["layers.0.weight"], b, x)
    assert moved <= 1.05 * optimum_error(w, b, mask, x)


@pytest.mark.parametrize("op", ["MatMul", "Gemm"])
def test_add_bias_and_data_free_through_the_cli(tmp_path, op):
    """--add-bias gives bias-less layers a bias (an Add after MatMul, Gemm's C) that takes the removed
    weights' mean; --data-free keeps the |W| mask; both models run in onnxruntime."""
    import onnxruntime as ort

    model = save(chain_model([Dense(op, 32, 48, True), Dense(op, 48, 24, True)]), tmp_path / "m.onnx")
    x = activations(8, tokens=128, k=32)
    np.savez(tmp_path / "calib.npz", X=x)
    outputs = {}
    for tag, extra in {"plain": [], "biased": ["--add-bias"], "free": ["--data-free"]}.items():
        out = tmp_path / f"{tag}.onnx"
        cli("apply", model, "-m", "mama", "-s", "0.5", "--calib", tmp_path / "calib.npz", "-o", out, *extra).ok()
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        outputs[tag] = (initializers(out), session.run(None, {"X": x[:16]})[0])
    assert {"layers.0.weight.added_bias", "layers.1.weight.added_bias"} <= set(outputs["biased"][0])
    assert not any(name.endswith("added_bias") for name in outputs["plain"][0])
    assert all(np.isfinite(o[1]).all() for o in outputs.values())
    w = initializers(model)["layers.0.weight"]
    rows = w if op == "Gemm" else w.T  # canonical [out, K]
    # The first layer's statistics come straight from x: with the added bias its output error is lower.
    canonical = {tag: (o[0]["layers.0.weight"] if op == "Gemm" else o[0]["layers.0.weight"].T) for tag, o in outputs.items()}
    zero = np.zeros(len(rows), np.float32)
    assert error(rows, None, canonical["biased"], outputs["biased"][0]["layers.0.weight.added_bias"], x) < \
        error(rows, None, canonical["plain"], zero, x)
    free = outputs["free"][0]["layers.0.weight"]
    free_rows = free if op == "Gemm" else free.T
    expected = np.argsort(np.abs(rows), axis=1)[:, :16]
    assert np.array_equal(np.sort(np.argsort(free_rows == 0, axis=1, kind="stable")[:, -16:], 1), np.sort(expected, 1))
    assert "takes no option --data-free" in cli("apply", model, "-m", "wanda", "-s", "0.5", "--data-free",
                                                "--calib", tmp_path / "calib.npz", "-o", tmp_path / "w.onnx").err


@pytest.mark.parametrize("label", ["0.5", "2:4"])
def test_direct_and_iterative_solves_agree(label):
    """Batched Cholesky and masked CG run to a tight tolerance reach the same move."""
    pattern, x, (w, b) = PATTERNS[label], activations(11), dense(11)
    direct, iterative = Mama(), Mama()
    direct.direct_max_kept, iterative.direct_max_kept, iterative.tol = 1024, 0, 1e-10
    w_direct, b_direct = prune(direct, w, b, x, pattern)
    w_iterative, b_iterative = prune(iterative, w, b, x, pattern)
    assert direct.last_solve["iterations"] == 0 and iterative.last_solve["iterations"] > 0
    np.testing.assert_allclose(w_direct, w_iterative, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(b_direct, b_iterative, rtol=1e-3, atol=1e-3)
