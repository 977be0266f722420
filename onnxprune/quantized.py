"""Quantized weights read back in the quantized domain: a weight is zero where its code equals
its zero point (so the dequantized value is exactly 0.0). For `verify`, which must see every
weight after onnxruntime's optimizer and quantizers, including those target discovery cannot
prune (it reads DequantizeLinear chains, MatMulInteger, FusedMatMul and MatMulNBits itself):
- com.microsoft MatMulNBits (2/4/8-bit blockwise, `MatMulNBitsQuantizer`): B is uint8
  [N, K/block, block*bits/8] of packed codes, low bits first; zero points are packed the same
  way per block, 2**(bits-1) when absent (`NBitsBlocks`, shared with discovery's operand step);
- QLinearMatMul / QLinearConv, ConvInteger and onnxruntime's fused integer ops (what its
  optimizer makes of QDQ and dynamic graphs), with an integer weight initializer and its zero point.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxprune.layout import Layout


@dataclass
class QuantizedWeight:
    value: ir.Value  # the stored initializer (codes, or the float weight in front of QuantizeLinear)
    node: ir.Node  # the consumer: MatMul / Gemm / Conv (after DequantizeLinear) or MatMulNBits
    op: str
    layout: Layout
    canonical: np.ndarray  # [out, K], int64 codes minus zero point (floats as stored): 0 = pruned
    form: str  # "integer" (QLinear*, ConvInteger, fused integer ops) or "matmulnbits"
    zero_point_nonzero: bool  # asymmetric quantization (TensorRT wants symmetric weights)

    @property
    def name(self) -> str:
        return self.value.name


def quantized_weights(graph: ir.Graph) -> Iterator[QuantizedWeight]:
    for node in graph:
        if node.op_type in INTEGER_OPS and node.domain in ("", "ai.onnx", "com.microsoft"):
            weight = _integer_op(node)
        elif node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
            weight = _matmul_nbits(node)
        else:
            continue
        if weight is not None:
            yield weight


# op -> (weight input, its zero point input, weight layout); the zero point runs along the output axis.
# The QLinear* and com.microsoft ones are what onnxruntime's optimizer makes of QDQ and dynamic graphs.
INTEGER_OPS = {"ConvInteger": (1, 3, "conv"), "QLinearMatMul": (3, 5, "kn"),
               "QLinearConv": (3, 5, "conv"), "DynamicQuantizeMatMul": (1, 3, "kn"),
               "MatMulIntegerToFloat": (1, 5, "kn"), "QGemm": (3, 5, "gemm")}


def _integer_op(node: ir.Node) -> QuantizedWeight | None:
    weight_index, zero_index, kind = INTEGER_OPS[node.op_type]
    if kind == "gemm":
        kind = "nk" if node.attributes.get_int("transB", 0) else "kn"
    value = node.inputs[weight_index] if len(node.inputs) > weight_index else None
    if value is None or not value.is_initializer() or value.const_value is None or len(value.const_value.shape) < 2:
        return None
    codes = value.const_value.numpy().astype(np.int64)
    zp_value = node.inputs[zero_index] if len(node.inputs) > zero_index else None
    zero_point = np.zeros((), np.int64)
    if zp_value is not None and zp_value.const_value is not None:
        zero_point = zp_value.const_value.numpy().astype(np.int64)
        if zero_point.ndim == 1 and zero_point.size > 1:  # per output: MatMul's last axis, Conv's first
            shape = [1] * codes.ndim
            shape[-1 if kind == "kn" else 0] = -1
            zero_point = zero_point.reshape(shape)
    layout = Layout(kind, tuple(codes.shape), node.attributes.get_int("group", 1) if kind == "conv" else 1)
    return QuantizedWeight(value, node, node.op_type, layout, layout.to_canonical(codes - zero_point), "integer",
                           bool(np.any(zero_point != 0)))


def _matmul_nbits(node: ir.Node) -> QuantizedWeight | None:
    blocks = nbits_blocks(node)
    if isinstance(blocks, str):
        return None
    n, k = blocks.n, blocks.k
    canonical = (blocks.unpack(node.inputs[1].const_value.numpy()) - blocks.zero_point[:, :, None]).reshape(n, -1)[:, :k]
    return QuantizedWeight(node.inputs[1], node, "MatMulNBits", Layout("nk", (n, k)), canonical, "matmulnbits",
                           bool(np.any(blocks.zero_point != 1 << (blocks.bits - 1))))


@dataclass(frozen=True)
class NBitsBlocks:
    """How a MatMulNBits node packs its weight W [N, K]: K in blocks of `block` codes, each block
    with one scale and one zero point; W = (code − zero point) · scale."""

    n: int
    k: int
    bits: int
    block: int
    zero_point: np.ndarray  # [N, blocks] (int64 codes, or floats as stored)
    scale: np.ndarray | None  # [N, blocks], None when the scales are computed

    @property
    def blocks(self) -> int:
        return self.zero_point.shape[1]

    def unpack(self, packed: np.ndarray) -> np.ndarray:
        """uint8 bytes [N, blocks, bytes] → int64 codes [N, blocks, block]."""
        return _unpack(packed.reshape(self.n, self.blocks, -1), self.bits)

    def pack(self, codes: np.ndarray) -> np.ndarray:
        """int64 codes [N, blocks, block] → uint8 bytes [N, blocks, bytes], the inverse of `unpack`."""
        per_byte = 8 // self.bits
        grouped = codes.astype(np.uint8).reshape(self.n, self.blocks, -1, per_byte)
        return np.bitwise_or.reduce(grouped << _shifts(self.bits), axis=-1).astype(np.uint8)


def nbits_blocks(node: ir.Node) -> NBitsBlocks | str:
    """The packing of a MatMulNBits weight, or why it cannot be read."""
    b = node.inputs[1]
    if b is None or b.const_value is None:
        return "the packed weight is computed"
    bits, block = node.attributes.get_int("bits", 4), node.attributes.get_int("block_size", 32)
    n, k = node.attributes.get_int("N"), node.attributes.get_int("K")
    if bits not in (2, 4, 8):
        return f"{bits}-bit codes"
    blocks = -(-k // block)
    zp_value = node.inputs[3] if len(node.inputs) > 3 else None
    if zp_value is None:
        zero_point = np.full((n, blocks), 1 << (bits - 1), np.int64)
    elif zp_value.const_value is None:
        return "the zero points are computed"
    elif zp_value.const_value.dtype == ir.DataType.UINT8:
        zero_point = _unpack(zp_value.const_value.numpy().reshape(n, -1), bits)[:, :blocks]
    else:  # float zero points: a code is zero only if it equals them exactly
        zero_point = zp_value.const_value.numpy().reshape(n, blocks)
    scale = node.inputs[2].const_value if node.inputs[2] is not None else None
    return NBitsBlocks(n, k, bits, block, zero_point, None if scale is None else scale.numpy().reshape(n, blocks))


def _shifts(bits: int) -> np.ndarray:
    return np.arange(8 // bits, dtype=np.uint8) * bits


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint8 bytes -> codes along the last axis, least significant bits first, as int64."""
    codes = (packed[..., None] >> _shifts(bits)) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1).astype(np.int64)
