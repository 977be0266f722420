"""How a weight operand maps to the canonical matrix `W[out, K]` that passes work on."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# kind → (output axes, reduction axes) of the operand, for the kinds whose axes follow from the rank
_AXES = {
    "kn": lambda rank: ((1,), (0,)),  # MatMul B [K, N]
    "nk": lambda rank: ((0,), (1,)),  # Gemm B with transB, MatMul A (W @ X), ...
    "conv": lambda rank: ((0,), (*range(2, rank), 1)),  # Conv W [O, C/g, *kernel]
    # ConvTranspose W [C, O/g, *kernel], viewed as [g, C/g, O/g, *kernel]: rows (g, O/g), K (*kernel, C/g)
    "convT": lambda rank: ((0, 2), (*range(3, rank + 1), 1)),
    "recurrent": lambda rank: ((0, 1), (2,)),  # LSTM/GRU/RNN W, R [directions, gates·H, K]
}


@dataclass(frozen=True)
class Layout:
    """The operand as the consuming node reads it (`shape`), and which of its axes are
    outputs and which the reduction K. Canonical = operand transposed to (out axes, K axes) and
    flattened to [out, K].

    Conv and ConvTranspose: K is ordered (*kernel, C/g) so that groups of M consecutive K entries
    are M consecutive input channels at one kernel position, the N:M layout TensorRT's sparse
    convolutions need; output channels of group j see only group j's inputs. Other kinds (einsum)
    give their axes explicitly.
    """

    kind: str
    shape: tuple[int, ...]
    groups: int = 1  # convolutions' group attribute
    out_axes: tuple[int, ...] = field(default=())
    k_axes: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.out_axes and not self.k_axes:
            out_axes, k_axes = _AXES[self.kind](len(self.shape))
            object.__setattr__(self, "out_axes", out_axes)
            object.__setattr__(self, "k_axes", k_axes)

    @property
    def is_conv(self) -> bool:
        return self.kind in ("conv", "convT")

    @property
    def _view(self) -> tuple[int, ...]:
        """The operand's shape as the axes refer to it (ConvTranspose splits C into groups)."""
        if self.kind == "convT":
            channels, *rest = self.shape
            return (self.groups, channels // self.groups, *rest)
        return self.shape

    @property
    def out_features(self) -> int:
        return int(np.prod([self._view[a] for a in self.out_axes]))

    @property
    def in_features(self) -> int:
        return int(np.prod([self._view[a] for a in self.k_axes]))

    @property
    def nm_group_extent(self) -> int:
        """Length of the run along which N:M groups are laid (must be divisible by M)."""
        if self.is_conv:
            return self._view[self.k_axes[-1]]  # input channels (per group) at one kernel position
        return self.in_features

    def to_canonical(self, stored: np.ndarray) -> np.ndarray:
        viewed = stored.reshape(self._view)
        return viewed.transpose(self.out_axes + self.k_axes).reshape(self.out_features, self.in_features)

    def from_canonical(self, canonical: np.ndarray) -> np.ndarray:
        order = self.out_axes + self.k_axes
        moved = canonical.reshape([self._view[a] for a in order])
        return moved.transpose(np.argsort(order)).reshape(self.shape)
