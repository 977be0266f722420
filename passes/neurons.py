"""Whole-neuron indicators from the MAMA paper's tables: L1 norm of a neuron's weights, and its
bias ("Prune by Bias" / "Prune by -Bias"). Zeroing a row removes the neuron's input weights; its
output becomes the bias alone. A layer without bias is not applicable to the bias indicators
(LLaMA has none, hence the paper's all-NA table), and is reported so, never skipped silently.
"""

import numpy as np

from onnxprune.passes.base import Layer, NeuronPass, NotApplicable
from onnxprune.passes.registry import register


@register
class L1Norm(NeuronPass):
    name = "l1"
    summary = "output neurons with the smallest L1 norm of their weights"

    def neuron_scores(self, layer: Layer) -> np.ndarray:
        return np.abs(layer.weight).sum(axis=1)


@register
class Bias(NeuronPass):
    name = "bias"
    summary = "output neurons with the smallest |bias| (layers without bias: not applicable)"

    def neuron_scores(self, layer: Layer) -> np.ndarray:
        if layer.bias is None:
            raise NotApplicable("the layer has no bias")
        return np.abs(layer.bias)


@register
class InverseBias(Bias):
    name = "inverse-bias"
    summary = "output neurons with the largest |bias| (ablation)"

    def neuron_scores(self, layer: Layer) -> np.ndarray:
        return -super().neuron_scores(layer)
