"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot", ICML 2023), following the reference `IST-DASLab/sparsegpt/sparsegpt.py`.

Columns of W[out, K] are pruned left to right. Each pruned weight's error is spread over the
columns not yet processed by the optimal-brain-surgeon update, using the rows of the upper
Cholesky factor of H⁻¹ (H = 2·XᵀX/samples, the Hessian of the layer's squared output error).
Updates stay inside a block of 128 columns and reach the remaining columns in one matmul per
block ("lazy batch" updates). Computed in float32 torch on CPU, like the reference.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from onnxprune.extras import LazyModule
from onnxprune.passes.base import Layer, Pruned, PruningPass
from onnxprune.passes.registry import register
from onnxprune.patterns import Pattern

torch = LazyModule("torch", "sparsegpt")  # imported on first use: the core install has no torch


@contextmanager
def torch_threads(count: int):
    """torch's intra-op thread count set for a scope, then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@register
class SparseGPT(PruningPass):
    name = "sparsegpt"
    summary = "OBS weight reconstruction from the input Hessian, 128-column blocks (SparseGPT)"
    needs = frozenset({"gram", "samples"})
    blocksize = 128
    percdamp = 0.01

    def __init__(self, blocksize: int | None = None, percdamp: float | None = None):
        if blocksize is not None:
            self.blocksize = blocksize
        if percdamp is not None:
            self.percdamp = percdamp

    def prune(self, layer: Layer, pattern: Pattern) -> Pruned:
        if pattern.sparsity == 0:
            # The reference would still drop each block's smallest score (see the threshold below).
            return Pruned(layer.weight)
        cols = layer.weight.shape[1]
        n, m = pattern.n, pattern.m
        if pattern.is_nm and cols % m:
            raise ValueError(f"{layer.name}: K={cols} is not a multiple of M={m}")
        # Groups of M must not straddle blocks: round the block down to a multiple of M.
        blocksize = max(m, self.blocksize // m * m) if pattern.is_nm else self.blocksize

        W = torch.from_numpy(np.array(layer.weight, dtype=np.float32))
        # The reference's H: 2/samples · Σ x xᵀ (its scale cancels out in every step below).
        gram = np.asarray(layer.stats["gram"], dtype=np.float64)
        H = torch.from_numpy((2.0 / max(int(layer.stats["samples"]), 1) * gram).astype(np.float32))

        # Inputs that never fire: their weights cannot matter on the data; keep H invertible.
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        Hinv = self._inverse_cholesky(H)

        for i1 in range(0, cols, blocksize):
            i2 = min(i1 + blocksize, cols)
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            d1 = torch.diag(Hinv1)[None, :]

            if pattern.is_nm:
                mask1 = torch.zeros_like(W1, dtype=torch.bool)
            else:
                # OBS saliency w²/U_jj², U = chol(H⁻¹) upper: U_jj² is [H_F⁻¹]_jj for the columns
                # F = j.. still open. One threshold for the whole block. As in the
                # reference, the threshold is the sorted score at index ⌊numel·s⌋ and every score
                # `<=` it goes: ⌊numel·s⌋ + 1 weights per block (plus ties).
                score = W1**2 / d1**2
                thresh = torch.sort(score.flatten())[0][int(score.numel() * pattern.sparsity)]
                mask1 = score <= thresh

            with torch_threads(1):  # thousands of tiny ops: dispatch to a pool costs more than it gains
                self._prune_block(W1, Q1, Err1, Hinv1, d1, mask1, pattern)

            W[:, i1:i2] = Q1
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy update of all later columns at once

        return Pruned(W.numpy())

    @staticmethod
    def _prune_block(W1, Q1, Err1, Hinv1, d1, mask1, pattern: Pattern) -> None:
        """Column by column inside one block, updating W1, Q1, Err1 (and mask1 for N:M) in place."""
        n, m = pattern.n, pattern.m
        for i in range(W1.shape[1]):
            if pattern.is_nm and i % m == 0:
                # N:M: choose the group's mask now, on weights already updated by the
                # errors of the columns to its left.
                score = W1[:, i:i + m] ** 2 / d1[:, i:i + m] ** 2
                mask1.scatter_(1, i + torch.topk(score, n, dim=1, largest=False)[1], True)
            w = W1[:, i]
            q = torch.where(mask1[:, i], torch.zeros_like(w), w)
            Q1[:, i] = q
            # OBS: the error of column i, scaled by 1/[chol(H⁻¹)]_ii, is compensated on the
            # columns to its right along row i of the Cholesky factor.
            err1 = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err1[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err1

    def _inverse_cholesky(self, H: torch.Tensor) -> torch.Tensor:
        """Upper Cholesky factor of (H + λI)⁻¹, λ = percdamp·mean(diag H).

        Should the damped H still not be positive definite in float32 (the reference would stop
        with an error), the damping grows tenfold until it is.
        """
        diag = torch.arange(H.shape[0])
        mean = torch.mean(torch.diag(H))
        percdamp = self.percdamp
        while True:
            Hd = H.clone()
            Hd[diag, diag] += percdamp * mean
            L, info = torch.linalg.cholesky_ex(Hd)
            if info == 0:
                U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
                if info == 0:
                    return U
            if percdamp >= 1e3:
                raise ValueError("SparseGPT: the Hessian is not positive definite even heavily damped")
            percdamp *= 10
