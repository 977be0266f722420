"""Layer-wise sparsity allocation: OWL (Yin et al. 2023, "Outlier Weighed Layerwise Sparsity").

Blocks holding more outlier Wanda scores (|W|·‖X_j‖ above `m` times the block's mean score) are
pruned less. The outlier ratios are mapped linearly onto [s − λ, s + λ] with the mean kept at s,
as the OWL reference does (m = 5, λ = 0.08).
"""

from __future__ import annotations

import numpy as np

OUTLIER_FACTOR = 5.0
SPREAD = 0.08


def outlier_ratio(scores: list[np.ndarray], factor: float = OUTLIER_FACTOR) -> float:
    """Share of a block's scores above `factor` × their mean."""
    flat = np.concatenate([s.ravel() for s in scores])
    return float((flat > factor * flat.mean()).mean())


def owl_sparsities(ratios: dict[str, float], sparsity: float, spread: float = SPREAD) -> dict[str, float]:
    """Per-block sparsity: more outliers, fewer pruned weights; the mean stays at `sparsity`.

    Values are clipped to [0, 0.99], which can move the mean when `sparsity` is within `spread`
    of those bounds.
    """
    values = np.array(list(ratios.values()), dtype=np.float64)
    if len(values) < 2 or values.max() == values.min():
        return {block: sparsity for block in ratios}
    keep = (values - values.min()) / (values.max() - values.min()) * 2 * spread
    keep = keep - keep.mean() + (1.0 - sparsity)
    return {block: float(np.clip(1.0 - k, 0.0, 0.99)) for block, k in zip(ratios, keep)}
