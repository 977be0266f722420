"""Streaming activation statistics for one weight's input, as rows [groups, tokens, K].

Kept per activation tensor and row rule, so targets sharing an input (q/k/v, gate/up) share one
accumulator. Only what the chosen method needs is computed: Σx² (Wanda), Σxxᵀ (SparseGPT, MAMA),
Σx (means). Column order matches the canonical weight's K order (see `targets.Layout`).

A grouped convolution's output channels of group j see only group j's input channels, so its
statistics carry a leading group axis (Σx² [g, K], Σxxᵀ [g, K, K]): g independent sub-problems,
which the methods solve batched (`passes.base.Layer.grouped`); every other layer has one group,
stored without that axis.

How each op's input becomes the rows [groups, tokens, K] that multiply the canonical weight's rows
is part of that op's rule in `weight_ops.RULES`; the convolutions' im2col lives here.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir
from numpy.lib.stride_tricks import sliding_window_view


if TYPE_CHECKING:
    from onnxprune.weight_ops import Consumer

STAT_KEYS = frozenset({"sq_sum", "gram", "sum", "tokens", "samples"})
_PER_CHANNEL = ("sq_sum", "sum", "gram")


class Uncalibrated(Exception):
    """An input this calibration cannot turn into rows; the message is the reason. The layers
    reading it stay dense and the report lists them; the rest of the model is still pruned."""


class Accumulator:
    """In numpy: Σx² and Σx of one sample are summed in float32 without [tokens, K] temporaries
    (einsum / pairwise sum), then added to float64 totals; Σxxᵀ is one float32 BLAS syrk per group
    and sample (the float64 temporaries of a torch version took 92 of 137 s of a Wanda run)."""

    def __init__(self, needs: frozenset[str]) -> None:
        self.needs = needs
        self.sq_sum: np.ndarray | None = None  # float64 [g, K]
        self.sum: np.ndarray | None = None  # float64 [g, K]
        self.gram: np.ndarray | None = None  # float32 [g, K, K], like the SparseGPT reference's H
        self.tokens = 0
        self.samples = 0

    def add(self, x: np.ndarray) -> None:
        """Fold in the rows [groups, tokens, K] of one calibration sample's activation."""
        rows = np.ascontiguousarray(x, dtype=np.float32)
        if self.tokens == 0:
            groups, _, k = rows.shape
            self.sq_sum = np.zeros((groups, k)) if "sq_sum" in self.needs else None
            self.sum = np.zeros((groups, k)) if "sum" in self.needs else None
            self.gram = np.zeros((groups, k, k), dtype=np.float32) if "gram" in self.needs else None
        if self.sq_sum is not None:
            self.sq_sum += np.einsum("gtk,gtk->gk", rows, rows)
        if self.sum is not None:
            self.sum += rows.sum(1)
        if self.gram is not None:
            for group, block in enumerate(rows):
                self.gram[group] += block.T @ block  # numpy sees Aᵀ·A and calls syrk: half a gemm's flops
        self.tokens += rows.shape[1]
        self.samples += 1

    def merged(self, other: Accumulator) -> Accumulator:
        """Statistics of both inputs pooled (a weight shared by several nodes)."""
        if not other.tokens or not self.tokens:  # e.g. a branch no sample took
            return self if self.tokens else other
        result = Accumulator(self.needs)
        for name in _PER_CHANNEL:
            mine, theirs = getattr(self, name), getattr(other, name)
            setattr(result, name, None if mine is None else mine + theirs)
        result.tokens, result.samples = self.tokens + other.tokens, self.samples + other.samples
        return result

    def as_dict(self) -> dict[str, np.ndarray | int]:
        """The statistics; a single group drops the group axis (Σx² [K], Σxxᵀ [K, K])."""
        stats: dict[str, np.ndarray | int] = {"tokens": self.tokens, "samples": self.samples}
        for name in _PER_CHANNEL:
            value = getattr(self, name)
            if value is not None:
                stats[name] = value[0] if value.shape[0] == 1 else value
                if value.shape[0] > 1:
                    stats["groups"] = value.shape[0]
        return stats


def per_row(stats: dict, key: str, rows: int) -> np.ndarray:
    """Statistic `key` in float64 for each of `rows` output rows: a grouped layer's [g, K] repeated
    to [rows, K] (group j's value for its slice of rows); else [1, K], which broadcasts over them."""
    value = np.atleast_2d(np.asarray(stats[key], dtype=np.float64))
    return np.repeat(value, rows // len(value), axis=0) if len(value) > 1 else value


def statistics_width(stats: dict, key: str) -> int:
    """K of one statistic (the last axis, whether or not it has a group axis)."""
    return int(np.shape(stats[key])[-1])


def activation_rows(arrays: list[np.ndarray], consumer: Consumer) -> np.ndarray:
    """The activation (from the arrays of the consumer's `activations`) as the rows [groups,
    tokens, K] that multiply the canonical weight's rows."""
    return consumer.rows(*(np.asarray(x) for x in arrays))


def sequence_rows(x: np.ndarray, lengths: np.ndarray | None, batch_first: bool) -> np.ndarray:
    """A recurrent layer's input X [T, B, I] ([B, T, I] batch-first) as rows [1, tokens, I]: the
    steps each sequence runs."""
    if batch_first:
        x = x.swapaxes(0, 1)
    return x[_running(lengths, *x.shape[:2])][None]


def previous_states(y: np.ndarray, initial: np.ndarray | None, lengths: np.ndarray | None,
                    reversed_: tuple[bool, ...], batch_first: bool) -> np.ndarray:
    """The hidden state each step of a recurrent layer starts from, as rows [directions, tokens, H]:
    Y [T, D, B, H] ([B, T, D, H] batch-first) one step behind in the direction of travel, and
    initial_h [D, B, H] ([B, D, H]; zero when absent) at each sequence's first step (the last, in
    reverse). Steps past a sequence's length do not run and are left out. So are steps whose state
    is zero in every direction: they add nothing to Σx² or XᵀX, and counted, a layer that only ever
    started from a zero state (one-step calls that do not carry the state) would get all-zero
    statistics, which stop the whole model, instead of none, which leave this weight dense with the
    reason."""
    if y.ndim != 4 or y.shape[1 if not batch_first else 2] != len(reversed_):
        raise Uncalibrated(f"hidden states of shape {list(y.shape)} for {len(reversed_)} direction(s)")
    if batch_first:
        y = y.transpose(1, 2, 0, 3)
        initial = None if initial is None else initial.transpose(1, 0, 2)
    steps, _, batch, _ = y.shape
    initial = np.zeros(y.shape[1:], y.dtype) if initial is None else initial
    running = _running(lengths, steps, batch)
    lengths = running.sum(0)
    per_direction = []
    for direction, backwards in enumerate(reversed_):
        if backwards:  # step t starts from step t+1's output; a sequence's last step from initial_h
            previous = np.concatenate([y[1:, direction], np.zeros_like(y[:1, direction])])
            started = np.flatnonzero(lengths)
            previous[lengths[started] - 1, started] = initial[direction, started]
        else:
            previous = np.concatenate([initial[direction][None], y[:-1, direction]])
        per_direction.append(previous[running])
    states = np.stack(per_direction)
    return states[:, np.any(states != 0, axis=(0, 2))]


def _running(lengths: np.ndarray | None, steps: int, batch: int) -> np.ndarray:
    """[T, B]: whether step t of sequence b runs (every step, without sequence_lens)."""
    if lengths is None:
        return np.ones((steps, batch), dtype=bool)
    return np.arange(steps)[:, None] < np.asarray(lengths).reshape(1, batch)


def conv_rows(x: np.ndarray, node: ir.Node) -> np.ndarray:
    """im2col of any-rank Conv: columns ordered (*kernel, C/g) like the canonical Conv weight."""
    geometry = _ConvGeometry(x, node)
    begins, ends = geometry.conv_pads(x.shape[2:])
    return _grouped_patches(x, geometry.kernel, geometry.strides, geometry.dilations, begins, ends,
                            geometry.groups, flip=False)


def conv_transpose_rows(x: np.ndarray, node: ir.Node) -> np.ndarray:
    """ConvTranspose as the Conv it equals: the input with stride-1 zeros between its pixels,
    padded by d·(k−1) − pad, correlated (stride 1) with the flipped kernel. Columns are ordered
    (*kernel, C_in/g), kernel positions in the stored (unflipped) order."""
    geometry = _ConvGeometry(x, node)
    spatial = x.shape[2:]
    output_padding = node.attributes.get_ints("output_padding", [0] * len(spatial))
    begins, ends = geometry.transpose_pads(spatial, output_padding)
    upsampled = np.zeros(x.shape[:2] + tuple((n - 1) * s + 1 for n, s in zip(spatial, geometry.strides)),
                         dtype=np.float32)
    upsampled[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in geometry.strides)] = x
    reach = [d * (k - 1) for k, d in zip(geometry.kernel, geometry.dilations)]
    return _grouped_patches(upsampled, geometry.kernel, [1] * len(spatial), geometry.dilations,
                            [r - b for r, b in zip(reach, begins)],
                            [r - e + p for r, e, p in zip(reach, ends, output_padding)], geometry.groups, flip=True)


class _ConvGeometry:
    """Kernel, strides, dilations, groups and padding of a Conv / ConvTranspose node."""

    def __init__(self, x: np.ndarray, node: ir.Node) -> None:
        rank = x.ndim - 2
        kernel = node.attributes.get_ints("kernel_shape", None) or (_weight_shape(node) or ())[2:]
        if rank < 1 or len(kernel) != rank:
            raise Uncalibrated(f"{node.op_type} input of rank {x.ndim} does not match its kernel {list(kernel)}")
        self.node, self.kernel = node, [int(k) for k in kernel]
        self.strides = [int(s) for s in node.attributes.get_ints("strides", [1] * rank)]
        self.dilations = [int(d) for d in node.attributes.get_ints("dilations", [1] * rank)]
        self.groups = node.attributes.get_int("group", 1)
        self.auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
        pads = node.attributes.get_ints("pads", [0] * 2 * rank)
        self.pads = [int(p) for p in pads[:rank]], [int(p) for p in pads[rank:]]

    def conv_pads(self, spatial) -> tuple[list[int], list[int]]:
        if self.auto_pad in ("NOTSET", ""):
            return self.pads
        if self.auto_pad == "VALID":
            return [0] * len(spatial), [0] * len(spatial)
        totals = [max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
                  for n, s, k, d in zip(spatial, self.strides, self.kernel, self.dilations)]
        return self._split(totals, upper=self.auto_pad == "SAME_UPPER")

    def transpose_pads(self, spatial, output_padding) -> tuple[list[int], list[int]]:
        """ONNX ConvTranspose: explicit pads, unless output_shape or auto_pad SAME_* fix the output size
        (then the odd pixel of padding goes to the end only for SAME_UPPER, as the ONNX spec says)."""
        output_shape = self.node.attributes.get_ints("output_shape", None)
        if output_shape is None and self.auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
            return self.pads if self.auto_pad != "VALID" else ([0] * len(spatial), [0] * len(spatial))
        if output_shape is None:
            output_shape = [n * s for n, s in zip(spatial, self.strides)]
        output_shape = list(output_shape)[-len(spatial):]
        totals = [s * (n - 1) + p + (k - 1) * d + 1 - o for n, s, p, k, d, o in
                  zip(spatial, self.strides, output_padding, self.kernel, self.dilations, output_shape)]
        return self._split(totals, upper=self.auto_pad == "SAME_UPPER")

    @staticmethod
    def _split(totals: list[int], upper: bool) -> tuple[list[int], list[int]]:
        """SAME_UPPER puts the odd pixel at the end, SAME_LOWER at the beginning."""
        small = [t // 2 for t in totals]
        large = [t - t // 2 for t in totals]
        return (small, large) if upper else (large, small)


def _grouped_patches(x: np.ndarray, kernel, strides, dilations, begins, ends, groups: int, flip: bool) -> np.ndarray:
    """Patches of x [N, C, *spatial] as rows [groups, N·positions, prod(kernel)·C/groups], columns
    ordered (*kernel, C/groups). Negative pads crop. `flip` reverses the kernel positions."""
    rank = len(kernel)
    x = np.asarray(x, dtype=np.float32)
    x = np.pad(x, [(0, 0), (0, 0)] + [(max(b, 0), max(e, 0)) for b, e in zip(begins, ends)])
    x = x[(slice(None), slice(None)) + tuple(slice(max(-b, 0), n - max(-e, 0))
                                             for b, e, n in zip(begins, ends, x.shape[2:]))]
    spans = [d * (k - 1) + 1 for k, d in zip(kernel, dilations)]
    if any(n < span for n, span in zip(x.shape[2:], spans)):
        raise Uncalibrated(f"input {list(x.shape)} is smaller than the kernel's reach {spans}")
    windows = sliding_window_view(x, spans, axis=tuple(range(2, 2 + rank)))  # [N, C, *out, *spans]
    windows = windows[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)
                      + tuple(slice(None, None, -d if flip else d) for d in dilations)]
    n, channels = x.shape[:2]
    if channels % groups:
        raise Uncalibrated(f"{channels} input channels cannot be split into {groups} groups")
    positions = windows.shape[2:2 + rank]
    windows = windows.reshape(n, groups, channels // groups, *positions, *kernel)
    order = (1, 0, *range(3, 3 + 2 * rank), 2)  # [g, N, *out, *kernel, C/g]
    return np.ascontiguousarray(windows.transpose(order)).reshape(
        groups, n * int(np.prod(positions)), int(np.prod(kernel)) * (channels // groups))


def _weight_shape(node: ir.Node) -> tuple[int, ...] | None:
    """The weight operand's shape, looking through the shape-keeping ops (Cast, Identity,
    DequantizeLinear) between it and the stored tensor when the graph carries no shapes."""
    value = node.inputs[1]
    while value is not None:
        if value.shape is not None and all(isinstance(d, int) for d in value.shape):
            return tuple(value.shape)
        if value.const_value is not None:
            return tuple(value.const_value.shape)
        producer = value.producer()
        if producer is None or producer.op_type not in ("Cast", "Identity", "DequantizeLinear"):
            return None
        value = producer.inputs[0]
    return None
