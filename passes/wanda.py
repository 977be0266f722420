"""Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models").

Score `S_ij = |W_ij| · ‖X_j‖₂`, the weight times the L2 norm of its input over all calibration
tokens; the lowest ⌊K·s⌋ scores go within each output neuron (N:M: the N lowest of every M).
"""

import numpy as np

from onnxprune.passes.base import Layer, ScorePass
from onnxprune.passes.registry import register
from onnxprune.statistics import per_row


@register
class Wanda(ScorePass):
    name = "wanda"
    summary = "smallest |W|·‖X_j‖₂ within each output neuron (Wanda)"
    needs = frozenset({"sq_sum"})
    per_output = True

    def score(self, layer: Layer) -> np.ndarray:
        # The reference uses sq_sum / samples; a positive factor common to every score of the
        # matrix changes no ranking, so the raw sum gives the same mask.
        # A grouped conv's rows see their own group's inputs; its mask is per row, so no group axis.
        norms = np.sqrt(per_row(layer.stats, "sq_sum", len(layer.weight)))
        return np.abs(layer.weight.astype(np.float64)) * norms
