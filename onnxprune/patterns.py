"""Sparsity patterns and mask selection on canonical weights.

Every weight is seen as a matrix `W[out, K]`: one row per output neuron, the reduction axis K
along columns (see `targets.Layout`). "N:M" means N zeros in every M consecutive weights along K
(the convention of the Wanda and SparseGPT code: 2:4 prunes 2 of every 4).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from onnxprune.errors import UserError

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Pattern:
    """What a pass must produce: unstructured at `sparsity`, or N zeros per M along K; or, with
    `structured`, whole channels removed (`onnxprune.structured`): a smaller dense graph."""

    sparsity: float
    n: int = 0
    m: int = 0
    structured: bool = False

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @property
    def label(self) -> str:
        if self.structured:
            return "structured"
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"

    def pruned_count(self, k: int) -> int:
        """How many of `k` weights one selection unit loses (a row, or a whole matrix).

        `int(k * s)`, exactly as the Wanda reference computes it, so masks match weight for weight.
        """
        return int(k * self.sparsity)


def parse_pattern(pattern: str | None, sparsity: float | None) -> Pattern:
    """Validate the CLI's --pattern/--sparsity pair into a Pattern."""
    if sparsity is not None and not (0.0 <= sparsity < 1.0):
        raise UserError(f"--sparsity must be in [0, 1), got {sparsity:g}")
    if pattern is None or pattern.strip().lower() == "unstructured":
        if sparsity is None:
            raise UserError("give --sparsity (a fraction in [0, 1)) or an N:M --pattern such as 2:4")
        return Pattern(sparsity=sparsity)
    if pattern.strip().lower() == "structured":
        if sparsity is None:
            raise UserError("--pattern structured needs --sparsity (the fraction of channels to remove, in [0, 1))")
        return Pattern(sparsity=sparsity, structured=True)
    match = _NM.match(pattern)
    if not match:
        raise UserError(f"--pattern must be 'unstructured', 'structured' or N:M such as 2:4 (N zeros in every M), "
                        f"got {pattern!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise UserError(f"--pattern {pattern}: N:M needs 0 < N < M (N zeros in every M weights), got N={n}, M={m}")
    if sparsity is not None and not math.isclose(sparsity, n / m, abs_tol=1e-9):
        raise UserError(f"--sparsity {sparsity:g} contradicts --pattern {n}:{m} (which is {n / m:g}); drop one of them")
    return Pattern(sparsity=n / m, n=n, m=m)


def select_lowest(scores: np.ndarray, pattern: Pattern, per_output: bool) -> np.ndarray:
    """Boolean mask (True = prune) of the lowest scores under `pattern`.

    Unstructured: exactly ⌊numel·s⌋ entries of the whole matrix, or ⌊K·s⌋ of every row when
    `per_output`. N:M: the N lowest of every M consecutive entries along K, in every row.
    """
    out, k = scores.shape
    mask = np.zeros(scores.shape, dtype=bool)
    if pattern.is_nm:
        groups = scores.reshape(out, k // pattern.m, pattern.m)
        lowest = np.argpartition(groups, pattern.n - 1, axis=-1)[..., : pattern.n]
        np.put_along_axis(mask.reshape(groups.shape), lowest, True, axis=-1)
        return mask
    if per_output:
        count = pattern.pruned_count(k)
        if count:
            lowest = np.argpartition(scores, count - 1, axis=1)[:, :count]
            np.put_along_axis(mask, lowest, True, axis=1)
        return mask
    count = pattern.pruned_count(scores.size)
    if count:
        lowest = np.argpartition(scores.ravel(), count - 1)[:count]
        mask.ravel()[lowest] = True
    return mask


def nm_valid(weight: np.ndarray, n: int, m: int) -> bool:
    """True when every group of M consecutive weights along K holds at least N zeros."""
    return weight.shape[1] % m == 0 and nm_broken_groups(weight, n, m) == 0


def nm_broken_groups(weight: np.ndarray, n: int, m: int) -> int:
    """How many groups of M consecutive weights along K hold fewer than N zeros (K divisible by M)."""
    out, k = weight.shape
    zeros = (weight.reshape(out, k // m, m) == 0).sum(axis=-1)
    return int((zeros < n).sum())


def sparsity_of(weight: np.ndarray) -> float:
    return float((weight == 0).sum() / weight.size) if weight.size else 0.0
