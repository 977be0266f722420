"""Random pruning: the floor every indicator must beat. Seeded, so runs repeat exactly."""

import numpy as np

from onnxprune.passes.base import Layer, ScorePass
from onnxprune.passes.registry import register


@register
class RandomPass(ScorePass):
    name = "random"
    summary = "uniformly random weights (seeded baseline)"

    def score(self, layer: Layer) -> np.ndarray:
        return layer.rng.random(layer.weight.shape)
