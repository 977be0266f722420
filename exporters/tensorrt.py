"""TensorRT 2:4 eligibility: which layers can get sparse tensor-core kernels, and why not.

TensorRT (builder flag SPARSE_WEIGHTS, `trtexec --sparsity=enable`, onnxruntime's TensorRT EP
option `trt_sparsity_enable`) looks at constant weights of convolutions and GEMMs (ONNX Gemm, and
MatMul with a constant weight, which it builds as a GEMM) and may run them on sparse tensor
cores when every group of 4 consecutive weights along the reduction axis holds at least 2 zeros
(for Conv: 4 consecutive input channels at each kernel position). It times sparse and dense
tactics and keeps the faster one, so eligibility is necessary, not sufficient.

Rules used here (the structured-sparsity section of the TensorRT developer guide,
https://docs.nvidia.com/deeplearning/tensorrt/10.16.1/inference-library/io-formats-sparsity.html,
and NVIDIA's answers in its issue tracker):

Not eligible (`reasons`):
  * the weight is not 2:4 along K (`patterns.nm_valid(W, 2, 4)` on the canonical [out, K] weight);
  * K is not a multiple of 4 (Conv: input channels per group, C/g);
  * grouped convolution: "TRT does not consider sparse conv kernels for group convs"
    (github.com/NVIDIA/TensorRT/issues/4054);
  * quantized weights with a non-zero zero point (TensorRT quantizes weights symmetrically);
    2:4 validity of int8 codes is judged on code - zero_point, i.e. on the dequantized zeros.

Eligible but likely slow (`notes`, `likely_fast` False; only said of eligible layers):
  * out % 8 or K % 16 (Conv: C/g % 16) not zero: the tensor-core alignment NVIDIA's own 2:4
    tool checks before pruning a layer (NVIDIA/apex, apex/contrib/sparsity/asp.py);
  * out < 256 or effective K < 256 (Conv: C/g x kernel area): "sparse conv kernels are faster
    than dense conv kernels if C and K are large enough (>256)" and "3x3 Conv effectively
    increases the C by 9x" (github.com/NVIDIA/TensorRT/issues/3849, also #4065). TensorRT does
    not publish a threshold for GEMMs; the same one is applied as a rule of thumb.

Weights fed through DequantizeLinear (int8 Q/DQ, TensorRT's sparse int8 path) are targets like any
other and reported with `quantized: True`; every target reports its stored dtype.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxprune.patterns import nm_valid
from onnxprune.layout import Layout
from onnxprune.targets import Target
from onnxprune.weight_chain import constant_array

ALIGN_OUT, ALIGN_K = 8, 16
LARGE_ENOUGH = 256
DOCS = ("https://docs.nvidia.com/deeplearning/tensorrt/10.16.1/inference-library/"
        "io-formats-sparsity.html")


def tensorrt_eligibility(model: ir.Model, targets: list[Target], include_quantized: bool = True) -> list[dict]:
    """One row per target (Q/DQ-fed weights only when `include_quantized`):

    {name, node, op, shape, k, out, dtype, quantized, two_four_valid, eligible, likely_fast,
    reasons, notes}. `k` is the canonical reduction length (Conv: C/g x kernel area).
    """
    rows = []
    for target in targets:
        dequantize = next((s.node for s in target.chain if s.op == "DequantizeLinear"), None)
        if dequantize is not None and not include_quantized:
            continue
        extra = ()
        if dequantize is not None and np.any(_zero_point(dequantize) != 0):
            extra = ("weight quantized with a non-zero zero point: TensorRT needs symmetric int8 weights",)
        rows.append(_row(target.name, target.consumers[0].node, target.op, target.layout, target.read(),
                         target.stored_dtype.name, quantized=dequantize is not None, extra_reasons=extra))
    return rows


def _row(name: str, node: ir.Node, op: str, layout: Layout, canonical: np.ndarray, dtype: str, quantized: bool,
         extra_reasons: tuple[str, ...] = ()) -> dict:
    out, k = layout.out_features, layout.in_features
    run = layout.nm_group_extent  # the axis groups of 4 are laid along
    run_name = "C/g" if layout.is_conv else "K"
    group = node.attributes.get_int("group", 1) if op == "Conv" else 1
    valid = run % 4 == 0 and nm_valid(canonical, 2, 4)  # nm_valid alone would let groups straddle kernel taps
    reasons = list(extra_reasons)
    if run % 4:
        where = "K runs along input channels per group, and C/g" if layout.is_conv else "K"
        reasons.append(f"{where} = {run} is not a multiple of 4")
    elif not valid:
        reasons.append("weight is not 2:4 along K (some group of 4 has fewer than 2 zeros)")
    if group > 1:
        reasons.append(f"grouped convolution (group={group}): TensorRT does not use sparse kernels for "
                       "group convs (NVIDIA/TensorRT#4054)")
    slow = []
    if not reasons and (out % ALIGN_OUT or run % ALIGN_K):
        slow.append(f"likely slow: tensor cores want out % {ALIGN_OUT} == 0 and {run_name} % {ALIGN_K} == 0 "
                    f"(out = {out}, {run_name} = {run}; NVIDIA apex ASP skips such layers)")
    if not reasons and (out < LARGE_ENOUGH or k < LARGE_ENOUGH):
        slow.append(f"likely slow: sparse kernels beat dense ones only when out and K are about "
                    f">= {LARGE_ENOUGH} (out = {out}, K = {k}; NVIDIA/TensorRT#3849)")
    info = []
    if op == "MatMul":
        info.append("MatMul with a constant weight: TensorRT builds it as a GEMM and lists it as eligible for "
                    "sparse math (NVIDIA/TensorRT#2169); it keeps the sparse tactic only if that times faster")
    return {"name": name, "node": node.name or name, "op": op, "shape": list(layout.shape), "k": k,
            "out": out, "dtype": dtype, "quantized": quantized, "two_four_valid": valid,
            "eligible": not reasons, "likely_fast": not reasons and not slow,
            "reasons": reasons, "notes": slow + info}


def _zero_point(node: ir.Node) -> np.ndarray:
    """DequantizeLinear's zero point (0 when absent)."""
    value = node.inputs[2] if len(node.inputs) > 2 else None
    return np.zeros(()) if value is None else constant_array(value)


def eligibility_markdown(rows: list[dict]) -> str:
    """A table for reports: one line per layer, with why it will not get sparse kernels."""
    eligible = sum(r["eligible"] for r in rows)
    fast = sum(r["likely_fast"] for r in rows)
    lines = [f"TensorRT 2:4: {eligible} of {len(rows)} layers eligible for sparse kernels, "
             f"{fast} large and aligned enough to be likely faster (rules: {DOCS}).", "",
             "| layer | node | op | shape | K | out | dtype | 2:4 | eligible | why not / notes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dtype = f"{r['dtype']} (Q/DQ)" if r["quantized"] else r["dtype"]
        why = "; ".join(r["reasons"] + r["notes"]) or "-"
        lines.append(f"| `{r['name']}` | `{r['node']}` | {r['op']} | {'x'.join(map(str, r['shape']))} | {r['k']} "
                     f"| {r['out']} | {dtype} | {'yes' if r['two_four_valid'] else 'no'} "
                     f"| {'yes' if r['eligible'] else 'no'} | {why} |")
    return "\n".join(lines) + "\n"
