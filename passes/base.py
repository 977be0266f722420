"""The one interface every pruning method implements.

A pass sees one weight at a time as a canonical matrix `W[out, K]` (rows are output neurons, K is
the reduction axis), with its bias and whatever calibration statistics it declared it needs. It
returns the new weight (and bias); it never touches the graph.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from onnxprune.patterns import Pattern, select_lowest


@dataclass
class Layer:
    """What a pass gets for one target."""

    name: str
    weight: np.ndarray  # float32 [out, K], a private copy the pass may modify
    bias: np.ndarray | None
    rng: np.random.Generator
    stats: dict[str, np.ndarray] | None = None  # calibration statistics, keyed as in `needs`
    allow_new_bias: bool = False  # a pass may return a bias for a layer without one (the user asked)

    @property
    def groups(self) -> int:
        """g of a grouped convolution, whose rows fall into g equal slices, slice j seeing only
        group j's inputs: its statistics carry a leading group axis. 1 for every other layer."""
        return int(self.stats.get("groups", 1)) if self.stats else 1

    def grouped(self, key: str) -> np.ndarray:
        """Statistic `key` in float64 with the group axis, g = 1 included: [g, K] or [g, K, K]."""
        value = np.asarray(self.stats[key], dtype=np.float64)
        return value if self.groups > 1 else value[None]

    def group(self, j: int) -> Layer:
        """Group j as a layer of its own: a method's result on the grouped layer equals its
        results on these, stacked (solving the groups batched only saves the per-call overhead)."""
        rows = slice(j * (len(self.weight) // self.groups), (j + 1) * (len(self.weight) // self.groups))
        stats = {key: value[j] if np.ndim(value) else value for key, value in self.stats.items() if key != "groups"}
        return Layer(f"{self.name}[group {j}]", self.weight[rows].copy(),
                     None if self.bias is None else self.bias[rows].copy(), self.rng, stats, self.allow_new_bias)


@dataclass
class Pruned:
    weight: np.ndarray
    bias: np.ndarray | None = None  # set only when the pass changed the bias


class NotApplicable(Exception):
    """Raised by a pass for a layer it cannot prune (the message is the reason); the layer stays
    dense and the report lists it."""


class PruningPass(ABC):
    """Base of all methods. Subclasses set `name`, `summary` and implement `prune`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset()  # calibration statistics required
    takes_new_bias: ClassVar[bool] = False  # may give a bias-less layer a bias when asked (--add-bias)

    @abstractmethod
    def prune(self, layer: Layer, pattern: Pattern) -> Pruned: ...


class ScorePass(PruningPass):
    """A method that only chooses a mask: the lowest scores are zeroed.

    `per_output` picks the unstructured selection unit: each output neuron (row) loses ⌊K·s⌋
    weights, or the whole matrix loses ⌊numel·s⌋ under one threshold. N:M ignores it.
    """

    per_output: ClassVar[bool] = False

    @abstractmethod
    def score(self, layer: Layer) -> np.ndarray: ...

    def prune(self, layer: Layer, pattern: Pattern) -> Pruned:
        mask = select_lowest(self.score(layer), pattern, self.per_output)
        weight = layer.weight
        weight[mask] = 0.0
        return Pruned(weight)


class NeuronPass(PruningPass):
    """A method that ranks whole output neurons: the ⌊out·s⌋ lowest rows are zeroed."""

    @abstractmethod
    def neuron_scores(self, layer: Layer) -> np.ndarray: ...

    def prune(self, layer: Layer, pattern: Pattern) -> Pruned:
        if pattern.is_nm:
            raise NotApplicable(f"{self.name} ranks whole neurons, which cannot form an N:M pattern")
        scores = self.neuron_scores(layer)
        rows = select_lowest(scores[:, None], pattern, per_output=False)[:, 0]
        weight = layer.weight
        weight[rows] = 0.0
        return Pruned(weight)
