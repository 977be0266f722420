"""Emitting the pruned graph for a hardware target (`apply --target`).

dense       zeros stay in dense initializers: runs everywhere, no speed-up from zeros on ORT CPU.
compressed  sparse weights stored as bitmask + non-zeros, decoded by a constant subgraph that
            onnxruntime folds at session start: a smaller download, bit-identical weights.
tensorrt    2:4 along K, with a per-layer report of which layers TensorRT can give sparse kernels.
cpu         structured shrinking (a smaller dense graph): the only pruning that speeds up ORT CPU.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxprune.errors import UserError
from onnxprune.patterns import Pattern
from onnxprune.targets import Target

TARGETS = ("dense", "compressed", "tensorrt", "cpu")
# What each hardware target prunes when no pattern is given.
TARGET_DEFAULT_PATTERNS = {"tensorrt": "2:4", "cpu": "structured"}
CPU_NOTE = ("onnxruntime's CPU kernels are dense: unstructured or N:M zeros make the model no faster there; "
            "--pattern structured removes whole neurons, heads and channels instead")


def default_pattern(target: str, pattern: str | None, sparsity: float | None) -> str | None:
    """The pattern a target implies when none is given (tensorrt: 2:4 unless a sparsity is; cpu: structured)."""
    if pattern is None and target in TARGET_DEFAULT_PATTERNS and (sparsity is None or target == "cpu"):
        return TARGET_DEFAULT_PATTERNS[target]
    return pattern


def check_target(target: str, pattern: Pattern, structured: bool) -> str | None:
    """Refuse combinations that cannot work; return a note for the user, if any."""
    if target not in TARGETS:
        raise UserError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    if target == "tensorrt" and (pattern.n, pattern.m) != (2, 4):
        raise UserError("--target tensorrt needs --pattern 2:4 (TensorRT's sparse kernels take 2:4 along K only)")
    if structured and target in ("compressed", "tensorrt"):
        raise UserError(f"--target {target} stores zeros; --pattern structured leaves none (use --target cpu or dense)")
    if target == "cpu" and not structured:
        return CPU_NOTE
    return None


def emit(model: ir.Model, target: str, pruned: list[Target]) -> dict:
    """Rewrite `model` for `target` in place; returns what the report records about it."""
    if target == "compressed":
        from onnxprune.exporters.compressed import compress_weights

        return {"target": target, **compress_weights(model, pruned)}
    if target == "tensorrt":
        from onnxprune.exporters.tensorrt import tensorrt_eligibility

        rows = tensorrt_eligibility(model, pruned)
        return {"target": target, "eligible": sum(r["eligible"] for r in rows), "layers": rows}
    return {"target": target}
