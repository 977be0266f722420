"""The MAMA paper's "prune by -weights" ablation: drop the *largest* |W|.

It exists to show that the indicator matters: it should be far worse than magnitude.
"""

import numpy as np

from onnxprune.passes.base import Layer, ScorePass
from onnxprune.passes.registry import register


@register
class InverseMagnitude(ScorePass):
    name = "inverse-magnitude"
    summary = "largest |W| (ablation: the indicator matters)"

    def score(self, layer: Layer) -> np.ndarray:
        return -np.abs(layer.weight)
