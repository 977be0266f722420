"""Each weight layer's zeros and N:M validity, and what a later transform lost of them.

Every weight is read as the canonical [out, K] matrix: float weights through target discovery,
quantized ones in the quantized domain (`onnxprune.quantized`: code − zero point), onnxruntime's
fused ops by their own layout. `verify` and `quantize` both check with these.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxprune.layout import Layout
from onnxprune.patterns import Pattern, nm_broken_groups
from onnxprune.quantized import quantized_weights
from onnxprune.targets import FLOAT_TYPES, compile_regex, discover_targets

# What quantizers and optimizers add to a weight's name (onnxruntime: W_quantized, W_Q4,
# ConvBnFusion_W_W, ...).
_SUFFIXES = re.compile(r"(_quantized|_Q\d+|_fp16|_transposed|_Transposed|_trans|_DequantizeLinear_Output)+$")
_PREFIXES = re.compile(r"^(\w+?Fusion_(W|B|BN_B)_)+")


def _base_name(name: str) -> str:
    return _PREFIXES.sub("", _SUFFIXES.sub("", name))


@dataclass
class LayerCheck:
    name: str
    node: str
    op: str
    storage: str  # float, qdq, integer, matmulnbits
    shape: list[int]
    params: int
    zeros: int
    sparsity: float
    pattern_valid: bool | None = None  # None when no pattern was asked for
    broken_groups: int | None = None  # groups of M with fewer than N zeros
    required: bool = False  # must hold the pattern (see the module docstring)
    matched: str | None = None  # in an `after` step: the layer of the checked model it is


def layer_checks(model: ir.Model, pattern: Pattern | None, include: str | None = None,
                 exclude: str | None = None) -> list[LayerCheck]:
    rows = [_check(t.name, t.node_name, t.op, _storage(t), t.layout, t.read(), pattern)
            for t in discover_targets(model)]
    seen = {row.name for row in rows}
    rows += [_check(w.name, w.node.name or w.name, w.op, w.form, w.layout, w.canonical, pattern)
             for w in quantized_weights(model.graph) if w.name not in seen]
    rows += [_check(value.name, node.name or value.name, node.op_type, "float", layout,
                    layout.to_canonical(value.const_value.numpy().astype(np.float32)), pattern)
             for node, value, layout in _fused_weights(model.graph) if value.name not in seen]
    include_re, exclude_re = compile_regex(include, "--include"), compile_regex(exclude, "--exclude")
    for row in rows:
        names = (row.name, row.node)
        if include_re is not None or exclude_re is not None:
            row.required = ((include_re is None or any(include_re.search(n) for n in names))
                            and not (exclude_re is not None and any(exclude_re.search(n) for n in names)))
        else:
            row.required = pattern is not None and row.sparsity >= pattern.sparsity / 2
    return rows


def _storage(target) -> str:
    """float, qdq (behind DequantizeLinear), matmulnbits or integer (an integer op's own operand)."""
    if any(step.op == "DequantizeLinear" for step in target.chain):
        return "qdq"
    if any(step.op == "MatMulNBits" for step in target.chain):
        return "matmulnbits"
    return "float" if target.stored_dtype in FLOAT_TYPES else "integer"


# onnxruntime's fused ops (what its optimizer writes, e.g. Gemm + Relu -> FusedGemm): op -> weight layout.
FUSED_OPS = {"FusedGemm": "gemm", "FusedConv": "conv"}


def _fused_weights(graph: ir.Graph):
    for node in graph:
        if node.domain != "com.microsoft" or node.op_type not in FUSED_OPS or len(node.inputs) < 2:
            continue
        value = node.inputs[1]
        if value is None or not value.is_initializer() or value.const_value is None:
            continue
        shape = tuple(value.const_value.shape)
        if FUSED_OPS[node.op_type] == "conv":
            kind = "conv"
        else:
            kind = "nk" if node.attributes.get_int("transB", 0) else "kn"
        if (kind == "conv") == (len(shape) >= 3) and len(shape) >= 2:
            yield node, value, Layout(kind, shape, node.attributes.get_int("group", 1) if kind == "conv" else 1)


def _check(name, node, op, storage, layout, canonical: np.ndarray, pattern: Pattern | None) -> LayerCheck:
    zeros = int((canonical == 0).sum())
    row = LayerCheck(name, node, op, storage, list(layout.shape), int(canonical.size), zeros,
                     zeros / canonical.size if canonical.size else 0.0)
    if pattern is not None and pattern.is_nm:
        if layout.nm_group_extent % pattern.m or canonical.shape[1] % pattern.m:
            row.pattern_valid, row.broken_groups = False, None
        else:
            row.broken_groups = nm_broken_groups(canonical, pattern.n, pattern.m)
            row.pattern_valid = row.broken_groups == 0
    return row


def survival_problems(before: list[LayerCheck], after: list[LayerCheck], step: str) -> list[str]:
    """What `step` lost: each layer with zeros (or the pattern) before must keep them afterwards."""
    by_name = {}
    for row in after:
        by_name.setdefault(_base_name(row.name), row)
    taken: set[int] = set()
    pairs = []
    for row in before:
        match = by_name.get(_base_name(row.name))
        if match is not None and id(match) not in taken:
            taken.add(id(match))
        else:
            match = None
        pairs.append([row, match])
    for same_node in (True, False):  # unmatched by name: the same node's weight of that size, else any
        for pair in pairs:
            if pair[1] is None:
                pair[1] = next((r for r in after if id(r) not in taken and r.params == pair[0].params
                                and (not same_node or r.node == pair[0].node)), None)
                if pair[1] is not None:
                    taken.add(id(pair[1]))
    problems = []
    for row, match in pairs:
        if not row.zeros:
            continue
        if match is None:
            problems.append(f"{row.name}: not found after {step} (folded into another op, or not a weight any more)")
            continue
        match.matched, match.required = row.name, row.required
        lost = row.zeros - match.zeros
        if lost > 0:
            problems.append(f"{row.name}: {step} lost {lost:,} of its {row.zeros:,} zeros")
        if row.pattern_valid and not match.pattern_valid:
            problems.append(f"{row.name}: pattern broken after {step}"
                            + (f" in {match.broken_groups} groups" if match.broken_groups else ""))
    return problems
