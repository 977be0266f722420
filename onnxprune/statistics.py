"""Streaming activation statistics for one weight's input X[tokens, K].

Kept per activation tensor, so targets sharing an input (q/k/v, gate/up) share one accumulator.
Only what the chosen method needs is computed: Σx² (Wanda), Σxxᵀ (SparseGPT, MAMA), Σx (means).
Column order matches the canonical weight's K order (see `targets.Layout`).
"""

from __future__ import annotations

import numpy as np

from onnxprune.extras import LazyModule
from onnxprune.targets import Consumer

torch = LazyModule("torch", "calibration statistics")  # imported on first use: the core install has no torch

STAT_KEYS = frozenset({"sq_sum", "gram", "sum", "tokens", "samples"})


class Accumulator:
    def __init__(self, needs: frozenset[str]) -> None:
        self.needs = needs
        self.sq_sum: torch.Tensor | None = None  # float64 [K]
        self.sum: torch.Tensor | None = None  # float64 [K]
        self.gram: torch.Tensor | None = None  # float32 [K, K], like the SparseGPT reference's H
        self.tokens = 0
        self.samples = 0

    def add(self, x: np.ndarray) -> None:
        """Fold in the rows of one calibration sample's activation matrix [tokens, K]."""
        rows = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        if self.tokens == 0:
            k = rows.shape[1]
            self.sq_sum = torch.zeros(k, dtype=torch.float64) if "sq_sum" in self.needs else None
            self.sum = torch.zeros(k, dtype=torch.float64) if "sum" in self.needs else None
            self.gram = torch.zeros(k, k, dtype=torch.float32) if "gram" in self.needs else None
        if self.sq_sum is not None:
            self.sq_sum += rows.double().square().sum(0)
        if self.sum is not None:
            self.sum += rows.double().sum(0)
        if self.gram is not None:
            self.gram.addmm_(rows.T, rows)
        self.tokens += rows.shape[0]
        self.samples += 1

    def merged(self, other: Accumulator) -> Accumulator:
        """Statistics of both inputs pooled (a weight shared by several nodes)."""
        result = Accumulator(self.needs)
        for name in ("sq_sum", "sum", "gram"):
            mine, theirs = getattr(self, name), getattr(other, name)
            setattr(result, name, None if mine is None else mine + theirs)
        result.tokens, result.samples = self.tokens + other.tokens, self.samples + other.samples
        return result

    def as_dict(self) -> dict[str, np.ndarray | int]:
        stats: dict[str, np.ndarray | int] = {"tokens": self.tokens, "samples": self.samples}
        for name in ("sq_sum", "sum", "gram"):
            value = getattr(self, name)
            if value is not None:
                stats[name] = value.numpy()
        return stats


def activation_rows(x: np.ndarray, consumer: Consumer) -> np.ndarray:
    """The activation as the matrix [tokens, K] that multiplies the canonical weight's rows."""
    node = consumer.node
    if node.op_type == "Conv":
        return _conv_patches(x, node)
    if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
        x = x.T
    return x.reshape(-1, x.shape[-1])


def _conv_patches(x: np.ndarray, node) -> np.ndarray:
    """im2col for a 2-D Conv, columns ordered (kh, kw, C) like the canonical Conv weight."""
    if x.ndim != 4 or node.attributes.get_int("group", 1) != 1:
        raise NotImplementedError(f"{node.name}: calibration supports 2-D Conv with group=1")
    weight_shape = node.inputs[1].shape
    kernel = tuple(node.attributes.get_ints("kernel_shape", list(weight_shape[2:])))
    pads = node.attributes.get_ints("pads", [0, 0, 0, 0])
    if node.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise NotImplementedError(f"{node.name}: calibration does not support auto_pad SAME_*")
    padded = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    patches = torch.nn.functional.unfold(
        torch.from_numpy(np.ascontiguousarray(padded, dtype=np.float32)), kernel,
        dilation=tuple(node.attributes.get_ints("dilations", [1, 1])),
        stride=tuple(node.attributes.get_ints("strides", [1, 1])))  # [N, C·kh·kw, L], C slowest
    n, _, positions = patches.shape
    channels = x.shape[1]
    patches = patches.reshape(n, channels, kernel[0] * kernel[1], positions).permute(0, 3, 2, 1)
    return patches.reshape(n * positions, -1).numpy()
