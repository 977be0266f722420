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

import tempfile
from dataclasses import asdict
from pathlib import Path

import onnx_ir as ir

from onnxprune.errors import UserError, first_line
from onnxprune.layer_checks import LayerCheck, layer_checks, survival_problems
from onnxprune.model_io import load_model, resolve_model_path
from onnxprune.patterns import Pattern

AFTER_STEPS = ("ort-opt", "fp16", "quantize", "int4", "onnxslim")


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
