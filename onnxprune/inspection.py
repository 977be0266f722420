"""`inspect`: what a model offers for pruning, target by target."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxprune.model_io import load_model, resolve_model_path
from onnxprune.patterns import nm_valid, sparsity_of
from onnxprune.targets import discover, select_targets


def inspect_model(path: str | Path | ir.Model, nm_patterns: list[tuple[int, int]], include: str | None = None,
                  exclude: str | None = None, label: str | None = None) -> dict:
    """`path`: a model file, or a loaded model (then `label` names it in the result)."""
    model = path if isinstance(path, ir.Model) else load_model(path)
    discovery = discover(model)
    targets = discovery.targets
    selected = {id(t) for t in select_targets(targets, include, exclude)}
    rows = []
    for target in targets:
        weight = target.read()
        rows.append({
            "name": target.name,
            "node": target.node_name,
            "op": target.op + ("" if not target.via else f" (via {'+'.join(target.via)})"),
            "shape": list(target.stored_shape),
            "out": target.layout.out_features,
            "k": target.layout.in_features,
            "block": target.block,
            "has_bias": target.bias is not None,
            "selected": id(target) in selected,
            "note": target.skip_reason or ("" if id(target) in selected else target.default_reason or "not matched"),
            "calibration": target.calibration_reason,
            "params": int(weight.size),
            "zeros": int((weight == 0).sum()),
            "sparsity": sparsity_of(weight),
            "nm_valid": {f"{n}:{m}": nm_valid(weight, n, m) for n, m in nm_patterns},
        })
    unsupported = [{"name": u["name"], "node": u["node"], "op": u["op"], "shape": u["shape"],
                    "params": int(np.prod(u["shape"])), "reason": u["reason"]} for u in discovery.untouched]
    chosen = [r for r in rows if r["selected"]]
    params = sum(r["params"] for r in rows)
    zeros = sum(r["zeros"] for r in rows)
    return {
        "model": label or str(resolve_model_path(path)),
        "targets": rows,
        "unsupported": unsupported,  # weights found in forms that cannot be pruned, with the reason
        "totals": {
            "candidates": len(rows),
            "selected": len(chosen),
            "params": params,
            "selected_params": sum(r["params"] for r in chosen),
            "zeros": zeros,
            "sparsity": zeros / params if params else 0.0,
            "blocks": len({r["block"] for r in rows if r["block"] is not None}),
            "unsupported": len(unsupported),
            "unsupported_params": sum(u["params"] for u in unsupported),
        },
    }
