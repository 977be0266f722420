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


@register
class RandomPattern(RandomPass):
    """Random weights with Wanda's structure: ⌊K·s⌋ in every output neuron (or N:M groups), so it
    isolates what the indicator adds over the pattern itself."""

    name = "random-pattern"
    summary = "random weights, the same count in every output neuron (or N:M group)"
    per_output = True
