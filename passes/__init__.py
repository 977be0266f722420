"""Pruning passes. Adding a method = adding one module here that defines a `PruningPass`
subclass decorated with `@register`."""

from onnxprune.passes.base import Layer, NeuronPass, NotApplicable, Pruned, PruningPass, ScorePass
from onnxprune.passes.registry import available, get_pass, register, takes_option

__all__ = ["Layer", "NeuronPass", "NotApplicable", "Pruned", "PruningPass", "ScorePass", "available", "get_pass", "register",
           "takes_option"]
