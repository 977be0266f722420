"""Magnitude pruning: drop the smallest |W|.

`magnitude` uses one threshold per matrix, the baseline of the Wanda and SparseGPT papers;
`magnitude-output` prunes the same fraction inside every output neuron.
"""

import numpy as np

from onnxprune.passes.base import Layer, ScorePass
from onnxprune.passes.registry import register


@register
class Magnitude(ScorePass):
    name = "magnitude"
    summary = "smallest |W| under one threshold per matrix"

    def score(self, layer: Layer) -> np.ndarray:
        return np.abs(layer.weight)


@register
class MagnitudePerOutput(Magnitude):
    name = "magnitude-output"
    summary = "smallest |W| within each output neuron"
    per_output = True
