"""`verify`: does the sparsity hold in this file, and does it survive what runs after pruning?

Every weight layer is read as the canonical [out, K] matrix: float weights through target
discovery, quantized ones in the quantized domain (`onnxprune.quantized`: code − zero point, so
a zero is a weight that dequantizes to exactly 0.0). Per layer: zeros, sparsity, and whether the
requested N:M pattern holds (every group of M along K has N zeros; Conv groups lie along input
channels and need C/g divisible by M).

Which layers must hold the pattern: those matched by `include`/`exclude` when given, else every
layer at least half as sparse as the pattern (a pruned layer; dense embeddings and heads are not
held to it). When the model records what pruned it (`onnxprune.pattern`, `onnxprune.targets` in
metadata_props) and the pattern is the one asked for, at least that many layers must hold it.

`after` steps re-run the check on the model as a later tool leaves it, each on the file as saved:
  ort-opt   onnxruntime's graph optimizations (extended level), the optimized model a session
            writes to SessionOptions.optimized_model_filepath
  fp16      float16 conversion (onnxruntime.transformers.float16, inputs/outputs kept float32)
  quantize  int8 dynamic quantization (onnxprune.quantization, symmetric weights)
  int4      4-bit MatMulNBits (onnxprune.quantization, symmetric blocks)
  onnxslim  onnxslim's graph slimming (the [slim] extra)
A layer survives a step when the same weight is found afterwards (by name, with the prefixes and
suffixes the tools add stripped; else the same node's weight of the same size; else the remaining
layers of the same size, in order), keeps every
zero it had and, if it held the pattern, still holds it.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxprune.errors import UserError, first_line
from onnxprune.model_io import load_model, resolve_model_path
from onnxprune.patterns import Pattern, nm_broken_groups
from onnxprune.quantized import quantized_weights
from onnxprune.layout import Layout
from onnxprune.targets import FLOAT_TYPES, compile_regex, discover_targets

AFTER_STEPS = ("ort-opt", "fp16", "quantize", "int4", "onnxslim")
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


def verify_model(given, pattern: Pattern | None = None, after: list[str] = (), include: str | None = None,
                 exclude: str | None = None) -> dict:
    """{model, pattern, ok, steps: [{step, ok, problems, totals, layers}]}; the first step is the file itself."""
    unknown = [step for step in after if step not in AFTER_STEPS]
    if unknown:
        raise UserError(f"--after must be among {', '.join(AFTER_STEPS)}; got {', '.join(unknown)}")
    path = resolve_model_path(given)
    with tempfile.TemporaryDirectory(prefix="onnxprune-verify-") as scratch:
        model = load_model(path)
        if model.metadata_props.get("onnxprune.storage"):  # compressed: read the weights onnxruntime rebuilds
            path = _ort_optimized(path, Path(scratch) / "decoded.onnx", basic=True)
            model = load_model(path)
        base = layer_checks(model, pattern, include, exclude)
        if not base:
            raise UserError(f"no weight layers found in {path} (no MatMul/Gemm/Conv with a constant weight)")
        steps = [_step("as saved", base, _base_problems(model, base, pattern))]
        for step in after:
            transformed = load_model(TRANSFORMS[step](path, Path(scratch) / f"{step}.onnx"))
            rows = layer_checks(transformed, pattern)
            steps.append(_step(step, rows, survival_problems(base, rows, step)))
    return {"model": str(resolve_model_path(given)), "pattern": pattern.label if pattern else None,
            "ok": all(s["ok"] for s in steps), "steps": steps}


def _base_problems(model: ir.Model, rows: list[LayerCheck], pattern: Pattern | None) -> list[str]:
    if pattern is None or not pattern.is_nm:
        return []
    problems = [_broken(row, pattern) for row in rows if row.required and not row.pattern_valid]
    recorded = model.metadata_props.get("onnxprune.targets")
    holding = sum(1 for row in rows if row.pattern_valid and row.zeros)
    if model.metadata_props.get("onnxprune.pattern") == pattern.label and recorded and recorded.isdigit():
        if holding < int(recorded):
            problems.append(f"the model records {recorded} layers pruned at {pattern.label}; only {holding} hold it")
    if not any(row.required for row in rows):
        problems.append(f"no layer is pruned at {pattern.label} (none has {pattern.sparsity / 2:.0%} zeros or more)")
    return problems


def _broken(row: LayerCheck, pattern: Pattern) -> str:
    if row.broken_groups is None:
        return f"{row.name}: K is not divisible by {pattern.m}, so {pattern.label} cannot hold"
    return f"{row.name}: {pattern.label} broken in {row.broken_groups} groups of {pattern.m}"


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


def _step(name: str, rows: list[LayerCheck], problems: list[str]) -> dict:
    params = sum(r.params for r in rows)
    zeros = sum(r.zeros for r in rows)
    return {"step": name, "ok": not problems, "problems": problems,
            "totals": {"layers": len(rows), "required": sum(r.required for r in rows),
                       "pattern_valid": sum(bool(r.pattern_valid) for r in rows), "params": params, "zeros": zeros,
                       "sparsity": zeros / params if params else 0.0},
            "layers": [asdict(r) for r in rows]}


# ------------------------------------------------------------------------------------ after steps


def _ort_optimized(path: Path, out: Path, basic: bool = False) -> Path:
    """The model as an onnxruntime CPU session leaves it; `basic`: constant folding and the like only."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    # Extended, not all: the layout level rewrites Conv weights into CPU-specific blocked formats.
    levels = ort.GraphOptimizationLevel
    options.graph_optimization_level = levels.ORT_ENABLE_BASIC if basic else levels.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(out)
    options.log_severity_level = 3
    if _has_external_data(path):
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", out.name + ".data")
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise UserError(f"onnxruntime cannot load {path}: {first_line(exc)}") from None
    return out


def _fp16(path: Path, out: Path) -> Path:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
    return _save_proto(converted, out)


def _quantized(mode: str):
    def transform(path: Path, out: Path) -> Path:
        from onnxprune.quantization import quantize_file

        quantize_file(path, out, mode, check=False)
        return out

    return transform


def _slimmed(path: Path, out: Path) -> Path:
    import onnx

    from onnxprune.extras import require

    slim = require("onnxslim", "verify --after onnxslim")
    return _save_proto(slim.slim(onnx.load(str(path))), out)


TRANSFORMS = {"ort-opt": _ort_optimized, "fp16": _fp16, "quantize": _quantized("int8-dynamic"),
              "int4": _quantized("int4"), "onnxslim": _slimmed}


def _save_proto(proto, out: Path) -> Path:
    import onnx

    from onnxprune.model_io import EXTERNAL_DATA_THRESHOLD_BYTES

    large = proto.ByteSize() > EXTERNAL_DATA_THRESHOLD_BYTES
    onnx.save_model(proto, str(out), save_as_external_data=large, location=out.name + ".data")
    return out


def _has_external_data(path: Path) -> bool:
    from onnxprune.model_io import uses_external_data

    return uses_external_data(load_model(path))
