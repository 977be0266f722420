"""MAMA ("instead of directly removing weights, identify unimportant weights and *move* their values
to other more significant connections"), done as the least-squares move the idea calls for.

Moving matters because a pruned weight's expected contribution to the output is re-expressed on
the kept inputs correlated with its input, which minimises the layer's output error for the mask
instead of merely choosing the mask. The paper's published code zeroed the weights and then added
a sum that was already zero, so its "move" did nothing and it equalled magnitude pruning.

Per output row with pruned set P and kept set K (Wanda's mask):
    δᵀ = (C_KK + λI)⁻¹ C_KP w_Pᵀ,   w_K += δ,   w_P = 0,
the minimiser of E(w_P x_P − δ x_K)² + λ‖δ‖². When the layer has (or may get) a bias, C is the
centred covariance XᵀX/n − μμᵀ and `b += w_P·μ_P − δ·μ_K` takes the mean of the removed
contribution: jointly optimal in (δ, b). Without a bias C = XᵀX/n, so δ must carry the mean too.
λ = damp·mean(diag C). All rows (of all groups, for a grouped conv) are solved together on the Jacobi-scaled system: by batched
Cholesky of each row's kept block when those are small enough, else by conjugate gradients
preconditioned by the kept block of the system's inverse (per iteration one [rows, K] @ [K, K]
float32 matmul and one more, in bfloat16 where that is faster), on numpy or torch
(onnxprune.array_backend).
`data_free` chooses the mask from |W| alone (no activation norms); the move still needs the
statistics, since without them the only neutral assumption C = I has C_KP = 0 and moves nothing.
"""

from __future__ import annotations

import warnings

import numpy as np

from onnxprune.array_backend import backend
from onnxprune.passes.base import Layer, Pruned
from onnxprune.passes.registry import register
from onnxprune.passes.wanda import Wanda
from onnxprune.patterns import Pattern, select_lowest


@register
class Mama(Wanda):
    name = "mama"
    summary = "Wanda mask; pruned weights' output moved onto correlated kept inputs, mean into the bias (MAMA)"
    needs = frozenset({"sq_sum", "gram", "sum", "tokens"})
    takes_new_bias = True
    damp = 0.01  # λ relative to mean(diag C); see `move`
    # CG stops when a step gains less than tol of the error reduction so far: on all-MiniLM-L6-v2's
    # layers the output error then exceeds the exact solve's by 4e-6 to 7e-5 of MAMA's gain over
    # Wanda, after 14-37 preconditioned iterations (Jacobi alone: 9e-6 to 2e-4 after 23-81).
    # benchmarks/mama_solvers.py
    tol = 1e-5
    max_iter = 300
    precondition = True  # CG on (Ĉ⁻¹)_KK-preconditioned systems: see `_preconditioner`
    # Exact batched Cholesky up to this many kept inputs per row (depthwise kernels, stems), else CG:
    # gathering and factoring a k×k block per row is slower than CG from about 32 kept inputs on
    # (as fast at K = 64, 1.9-10x slower above: benchmarks/mama_solvers.py).
    direct_max_kept = 32

    def __init__(self, damp: float | None = None, data_free: bool = False, backend: str | None = None,
                 device: str = "cpu"):
        if damp is not None:
            self.damp = damp
        self.data_free = data_free
        self.backend_name = backend  # numpy or torch; None: torch when installed
        self.device = device  # cuda: the solves in torch on the GPU
        self.last_solve: dict[str, float] = {}  # iterations and residual of the latest `move`

    def score(self, layer: Layer) -> np.ndarray:
        return np.abs(layer.weight) if self.data_free else super().score(layer)

    def prune(self, layer: Layer, pattern: Pattern) -> Pruned:
        mask = select_lowest(self.score(layer), pattern, self.per_output)
        if not mask.any():
            return Pruned(layer.weight)
        # A leading group axis g: a grouped conv's groups (each its rows, its own statistics) are
        # solved in one batch; g = 1 for every other layer.
        groups = layer.groups
        shape = (groups, len(mask) // groups, mask.shape[1])
        tokens = max(int(layer.stats["tokens"]), 1)
        cov = layer.grouped("gram") / tokens
        with_bias = layer.bias is not None or layer.allow_new_bias
        if with_bias:
            # The bias absorbs the removed contribution's mean; δ need only reproduce its fluctuation.
            mean = layer.grouped("sum") / tokens
            cov -= mean[:, :, None] * mean[:, None, :]
        removed = np.where(mask, layer.weight, 0.0).reshape(shape)
        delta = self.move(removed, ~mask.reshape(shape), cov)
        weight = np.where(mask, 0.0, layer.weight + delta.reshape(mask.shape)).astype(np.float32)
        if not with_bias:
            return Pruned(weight)
        bias = np.zeros(len(weight)) if layer.bias is None else layer.bias.astype(np.float64)
        return Pruned(weight, (bias + np.einsum("grk,gk->gr", removed - delta, mean).ravel()).astype(np.float32))

    def move(self, removed: np.ndarray, keep: np.ndarray, cov: np.ndarray) -> np.ndarray:
        """δ [g, rows, K], zero off `keep`: per row, (C_KK + λI) δ_K = C_KP w_P, with its group's C
        (`cov` [g, K, K]).

        Solved on Ĉ = S(C + λI)S with S = diag(C + λI)^-½ (Jacobi), which has a unit diagonal so
        outlier channels no longer dominate the conditioning. Since `removed` is zero on K the
        right-hand side is (removed @ (C + λI))_K, i.e. (u @ Ĉ)_K with u = removed / S.
        """
        xp = backend(self.backend_name, self.name, self.device)
        lam = self.damp * np.diagonal(cov, axis1=1, axis2=2).mean(1)
        damped = cov + lam[:, None, None] * np.eye(cov.shape[-1])
        diag = np.diagonal(damped, axis1=1, axis2=2).copy()
        diag[diag <= 0] = 1.0  # dead inputs (only reachable with damp = 0): nothing to scale
        scale = 1.0 / np.sqrt(diag)[:, None, :]
        system = xp.asarray(scale.mT * damped * scale)
        kept = xp.asarray(keep)
        rhs = (xp.asarray(removed / scale) @ system) * kept
        kept_per_row = keep.sum(axis=-1)
        x = None
        if kept_per_row.min() == kept_per_row.max() and kept_per_row.flat[0] <= self.direct_max_kept:
            x = self._batched_cholesky(xp, system, keep, rhs)
        if x is None:  # uneven rows, large blocks, or a float32 breakdown on a near-singular block
            x = self._masked_cg(xp, system, kept, rhs)
        return xp.to_numpy(x).astype(np.float64) * scale

    def _batched_cholesky(self, xp, system, keep: np.ndarray, rhs):
        """Exact solves, a chunk of rows at a time: every row keeps the same number k of inputs
        (per-output and N:M masks), so its k×k sub-block of its group's `system` batches with the
        others. rows·k³/3 flops in small factorizations: only for small k (see `direct_max_kept`).
        None when a block is not positive definite in float32 (CG copes with those)."""
        groups, rows, k = keep.shape[0], keep.shape[1], int(keep[0, 0].sum())
        index = np.nonzero(keep)[2].reshape(groups * rows, k)  # all rows of all groups, one after the other
        group_of = np.repeat(np.arange(groups), rows)
        flat_rhs = rhs.reshape(groups * rows, rhs.shape[-1])
        x = xp.zeros_like(flat_rhs)
        chunk = max(1, (64 << 20) // (4 * k * k))  # ~64 MB of sub-blocks at a time
        for start in range(0, groups * rows, chunk):
            rows_of = xp.index(np.arange(start, min(start + chunk, groups * rows)))[:, None]
            group = xp.index(group_of[start:start + chunk])[:, None, None]
            idx = xp.index(index[start:start + chunk])
            solved = xp.spd_solve(system[group, idx[:, :, None], idx[:, None, :]], flat_rhs[rows_of, idx])
            if solved is None:
                return None
            x[rows_of, idx] = solved
        self.last_solve = {"iterations": 0, "residual": 0.0}
        return x.reshape(rhs.shape)

    def _masked_cg(self, xp, system, kept, rhs):
        """Preconditioned conjugate gradients for all rows of all groups at once on the kept
        sub-blocks of `system`.

        Every iterate lowers each row's output error below the previous one (each step is the exact
        line search along its direction, from δ = 0), so stopping early is safe. A step lowers the
        (damped) output error of its rows by α·rᵀp each: a group stops once a step gains less than
        `tol` of what its steps gained so far, and is frozen while others go on, so a grouped layer
        gets the moves of its groups solved one at a time. β is the flexible (Polak-Ribière) one,
        which stays conjugate enough when the preconditioner is applied in bfloat16.
        """
        precondition = self._preconditioner(xp, system, kept)
        x = xp.zeros_like(rhs)
        r = xp.copy(rhs)
        z = precondition(r)
        p = xp.copy(z)
        rz = (r * z).sum(-1)
        gained = xp.zeros_like(rz[:, 0])
        active = xp.asarray(((r * r).sum(-1) > 0).any(-1))  # per group, 1.0 until it converges
        iterations = 0
        while bool(active.any()) and iterations < self.max_iter:
            iterations += 1
            q = (p @ system) * kept
            rp = (r * p).sum(-1)
            alpha = xp.ratio(rp, (p * q).sum(-1)) * active[:, None]  # rows with nothing to move: p = 0
            x += alpha[..., None] * p
            previous, r = r, r - alpha[..., None] * q
            step = (alpha * rp).sum(-1)
            gained += step
            active = active * (step > self.tol * gained)
            z = precondition(r)
            beta = xp.ratio((z * (r - previous)).sum(-1), rz)
            rz = (r * z).sum(-1)
            p = z + beta[..., None] * p
        bad = ~xp.isfinite(x).all(-1)
        x[bad] = 0.0  # numerical breakdown: those rows are left as the plain Wanda mask
        # The true residual (float32 recurrences drift from it), relative, worst row.
        residual = rhs - (x @ system) * kept
        true = float(xp.ratio((residual * residual).sum(-1) ** 0.5, (rhs * rhs).sum(-1) ** 0.5).max())
        self.last_solve = {"iterations": iterations, "residual": true}
        if bool(active.any()) or bool(bad.any()):
            warnings.warn(f"mama: conjugate gradients stopped after {iterations} iterations at relative "
                          f"residual {true:.1e} ({int(bad.sum())} rows reset to no move)", stacklevel=3)
        return x

    def _preconditioner(self, xp, system, kept):
        """r ↦ (Ĉ⁻¹ r)_K: the kept block of the whole system's inverse, which would be each row's
        exact (Ĉ_KK)⁻¹ if its pruned inputs were uncorrelated with its kept ones, and is close enough
        to cut CG's iterations 1.5-2.7x on the layers of all-MiniLM-L6-v2 and an OPT-125M-shaped
        model (benchmarks/mama_solvers.py). It costs one k×k inverse per group and one more
        [rows, k] @ [k, k] product per iteration, in bfloat16 where that is faster; without enough
        rows to pay for the inverse, or when the system is not positive definite in float32
        (damp = 0), r ↦ r (Jacobi alone)."""
        if not self.precondition or kept.shape[1] * 16 < system.shape[-1]:
            return lambda r: r
        inverse = xp.spd_inverse(system)
        if inverse is None:
            return lambda r: r
        inverse = xp.low_precision(inverse)
        return lambda r: xp.low_precision_matmul(r, inverse) * kept
