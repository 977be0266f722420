"""Which discovered weights a pass prunes when the user names none (`--include` overrides).

Models whose exporter names the repeated blocks (`/model/layers.N/…`, transformers): the
layers inside the repeated blocks, as the Wanda and SparseGPT references do; embeddings, pooler and LM head stay.
Everything else (CNNs, detectors, audio models): every learned convolution / linear layer except
  - the stem: the first convolution on the raw image / audio input (few input channels),
  - the prediction layers: those whose output reaches a graph output without another weight,
  - fixed signal-processing transforms: an STFT / DFT basis or a mel filterbank stored as a weight,
    on the input side of the model (they are maths, not learned),
  - tiny layers (fewer than TINY_K weights per output), such as 3×3 depthwise convolutions (K = 9),
  - whatever the weight's rule leaves out (`WeightRule.default_reason`: a recurrent layer's R, whose
    error feeds back through the hidden state), in every kind of model.
A depthwise conv with a larger kernel (5×5: K = 25 per channel) is a learned layer like any other:
calibrated methods prune it per channel (statistics per group); at N:M it is left dense and listed,
as every layer whose input channels per group (here 1) cannot hold the pattern.
Every weight left out gets its reason in `default_reason`, which `inspect` and the report show.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

if TYPE_CHECKING:
    from onnxprune.targets import Target

STEM = "stem"  # how a stem's default_reason starts (structured pruning still takes its output channels)
TINY_K = 16  # layers with fewer inputs per output are left alone by default, as the references do
STEM_MAX_CHANNELS = 4  # RGB(A) images, mono/stereo audio: what a stem convolution reads
_TRANSFORM_MIN_K = 32  # a transform basis is long; short learned kernels are smooth and would pass the test
_TRANSFORM_MAX_DEPTH = 3  # fixed transforms chain at the input (STFT -> mel -> DCT), never deeper


def mark_defaults(graph: ir.Graph, targets: list[Target], named_blocks: bool) -> None:
    """Set `default_reason` on every target the default selection leaves alone."""
    heads = head_targets(graph, targets)
    upstream = _upstream_targets(graph, targets)
    transforms = _fixed_transforms(targets, upstream)
    for target in targets:
        k = target.layout.in_features
        if id(target) in transforms:
            target.default_reason = transforms[id(target)]
        elif target.rule.default_reason is not None:
            target.default_reason = target.rule.default_reason
        elif k < TINY_K:
            target.default_reason = f"tiny layer (K={k} < {TINY_K} weights per output: few parameters, each one matters)"
        elif named_blocks:
            if target.block is None:
                target.default_reason = "outside the repeated blocks (LM head, pooler, classifier)"
        elif id(target) in heads:
            target.default_reason = "prediction layer (feeds a graph output directly)"
        elif _is_stem(target, upstream[id(target)], transforms):
            channels = target.layout.nm_group_extent
            target.default_reason = f"{STEM} (first convolution on the model's input, {channels} input channels)"


def head_targets(graph: ir.Graph, targets: list[Target]) -> set[int]:
    """Targets whose output reaches a graph output without passing through another target."""
    owner = {c.node: t for t in targets for c in t.consumers}
    heads, seen = set(), set()
    stack = [v.producer() for v in graph.outputs if v.producer() is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in owner:
            heads.add(id(owner[node]))
            continue
        stack += [v.producer() for v in node.inputs if v is not None and v.producer() is not None]
    return heads


def _upstream_targets(graph: ir.Graph, targets: list[Target]) -> dict[int, frozenset[int]]:
    """For each target, the nearest targets its activation is computed from (empty: it reads
    the model's inputs through weight-free ops only). One pass in topological order."""
    owner = {c.node: t for t in targets for c in t.consumers}
    reach: dict[ir.Node, frozenset[int]] = {}

    def before(value: ir.Value | None) -> frozenset[int]:
        producer = value.producer() if value is not None else None
        return reach.get(producer, frozenset())

    for node in graph:
        if node in owner:
            reach[node] = frozenset({id(owner[node])})
        else:
            reach[node] = frozenset().union(*(before(v) for v in node.inputs))
    return {id(t): frozenset().union(*(before(v) for c in t.consumers for v in _activation_inputs(c))) for t in targets}


def _activation_inputs(consumer) -> list[ir.Value]:
    """The node's inputs its activation is computed from (a recurrent R's initial state; not its own outputs)."""
    return [v for v in consumer.node.inputs if v is not None and v.name in consumer.activations]


def _fixed_transforms(targets: list[Target], upstream: dict[int, set[int]]) -> dict[int, str]:
    """Targets at the input side whose weight is a known signal-processing transform."""
    found: dict[int, str] = {}
    for _ in range(_TRANSFORM_MAX_DEPTH):
        added = False
        for target in targets:
            if id(target) in found or not upstream[id(target)] <= set(found):
                continue
            reason = transform_kind(target)
            if reason is not None:
                found[id(target)] = reason
                added = True
        if not added:
            break
    return found


def transform_kind(target: Target) -> str | None:
    """'fixed transform: …' when the weight looks like an STFT/DFT basis or a filterbank."""
    if target.layout.in_features < _TRANSFORM_MIN_K:
        return None
    canonical = target.read()
    if looks_like_filterbank(canonical):
        return "fixed transform: looks like a filterbank (non-negative, unimodal filters along K)"
    if looks_like_sinusoid_basis(canonical):
        return "fixed transform: looks like an STFT / DFT basis (every row one frequency)"
    return None


def looks_like_sinusoid_basis(rows: np.ndarray) -> bool:
    """Each non-zero row's spectrum concentrated around one frequency (±2 bins, which holds for
    windowed bases too), and the rows spanning many different frequencies."""
    live = rows[np.abs(rows).max(axis=1) > 0]
    if len(live) < 8:
        return False
    power = np.abs(np.fft.rfft(live.astype(np.float64), axis=1)) ** 2
    peak = power.argmax(axis=1)
    near = np.abs(np.arange(power.shape[1])[None, :] - peak[:, None]) <= 2
    share = (power * near).sum(axis=1) / np.maximum(power.sum(axis=1), 1e-30)
    return bool((share > 0.9).mean() >= 0.9 and len(np.unique(peak)) >= max(8, len(live) // 4))


def looks_like_filterbank(rows: np.ndarray) -> bool:
    """Non-negative rows, each one bump: contiguous support rising then falling (mel, bark, …)."""
    if len(rows) < 8 or (rows < 0).any():
        return False
    bumps = 0
    for row in rows:
        support = np.flatnonzero(row > 0)
        if support.size == 0 or support[-1] - support[0] + 1 != support.size or support.size == len(row):
            continue
        steps = np.sign(np.diff(row[support[0]:support[-1] + 1]))
        steps = steps[steps != 0]
        if np.count_nonzero(np.diff(steps)) <= 1:  # rises then falls (or only one of the two)
            bumps += 1
    return bumps >= 0.9 * len(rows)


def _is_stem(target: Target, upstream: set[int], transforms: dict[int, str]) -> bool:
    """A convolution on the raw input: nothing learned before it, and few input channels."""
    return (target.layout.is_conv and upstream <= set(transforms)
            and target.layout.nm_group_extent <= STEM_MAX_CHANNELS)
