"""Compressed storage: pruned weights as bitmask + non-zeros, decoded by a constant subgraph.

A pruned model keeps its zeros in dense initializers, so the file is as large as the dense one.
For edge download we store each sparse weight as

* ``<name>.bitmask``: uint8 ``[ceil(n / 8)]``, ``np.packbits`` of "this element is not +0.0"
  (most significant bit first), and
* ``<name>.nonzeros``: the weight's dtype, ``[1 + nnz]``: a leading +0.0, then the other elements
  in row-major order, bit for bit (-0.0 and NaN payloads are kept: the mask tests the bits,
  not the value)

and rebuild the dense tensor with standard ONNX ops (opset >= 13), all fed by initializers only,
so onnxruntime's constant folding evaluates them once when the session is created and runs the
model at dense speed afterwards::

    bytes = Cast(bitmask, to=INT32)                  # Gather needs int32/int64 indices
    bits  = Reshape(Gather(TABLE, bytes), [-1])      # TABLE: int32 [256, 8], the bits of every byte
    bits  = Slice(bits, [0], [n])                    # only when n is not a multiple of 8
    index = Mul(CumSum(bits, 0), bits)               # k-th non-zero -> k, zeros -> 0
    W     = Reshape(Gather(nonzeros, index), shape)  # nonzeros[0] is the +0.0 every zero reads

TABLE and the small int64 constants are shared by all tensors. Indices are int32 (onnxruntime
CPU runs CumSum, Gather and Mul on int32), so tensors of 2**31 elements or more stay dense.

Quantized weights (`compress_quantized`): int8 / uint8 codes behind DequantizeLinear or
MatMulInteger are encoded the same way; with symmetric quantization a pruned weight is code 0.

Size: ``(1 - s) * dense + n / 8`` bytes, i.e. 53% of dense fp32 and 56% of dense fp16 at s = 50%.
An N:M-specific layout would not be smaller for 2:4: two 2-bit positions per group of four take
the same 4 bits as the group's four mask bits, so every pattern uses this one encoding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx_ir as ir

from onnxprune.errors import UserError
from onnxprune.targets import FLOAT_TYPES, Target

ENCODING = "bitmask"
MIN_OPSET = 13
MAX_ELEMENTS = 2**31 - 1  # int32 indices
# Quantized weight codes (compress_quantized); 4-bit types pack two codes per byte and are left alone.
INTEGER_TYPES = {ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT16, ir.DataType.UINT16}
_SHARED = "onnxprune.bitmask."  # prefix of the constants every decoder shares


@dataclass
class EncodedTensor:
    name: str
    encoding: str
    dtype: str
    shape: list[int]
    sparsity: float
    dense_bytes: int
    encoded_bytes: int

    @property
    def ratio(self) -> float:
        return self.encoded_bytes / self.dense_bytes


def compress_weights(model: ir.Model, targets: list[Target] | None = None, min_sparsity: float = 0.3) -> dict:
    """Replace sparse float initializers by bitmask encodings decoded in-graph; returns a report.

    `targets`: the weights to consider (e.g. the pruned ones); None considers every float
    initializer of rank >= 2. A tensor is encoded when at least `min_sparsity` of it is zero and
    the encoding is smaller than the dense tensor. The model is changed in place.
    """
    values = [t.value for t in targets] if targets is not None else _float_initializers(model.graph)
    return _compress(model, values, min_sparsity, listed=targets is not None)


def compress_quantized(model: ir.Model, min_sparsity: float = 0.3) -> dict:
    """The same for quantized weights (int8 codes behind DequantizeLinear / MatMulInteger): with
    symmetric quantization a pruned weight is code 0, whose bits the mask drops like +0.0's."""
    from onnxprune.targets import discover_targets

    values = [t.value for t in discover_targets(model) if t.stored_dtype in INTEGER_TYPES]
    return _compress(model, values, min_sparsity, listed=True)


def _compress(model: ir.Model, values: list[ir.Value], min_sparsity: float, listed: bool) -> dict:
    if not 0.0 <= min_sparsity <= 1.0:
        raise UserError(f"min_sparsity must be in [0, 1], got {min_sparsity:g}")
    graph = model.graph
    opset = graph.opset_imports.get("", graph.opset_imports.get("ai.onnx", 0))
    if opset < MIN_OPSET:
        raise UserError(f"compressed storage needs opset >= {MIN_OPSET}; this model imports opset {opset}")
    encoder = _Encoder(graph)
    encoded, skipped = [], []
    for value in dict.fromkeys(values):  # a weight listed twice is encoded once
        reason, record = encoder.encode(value, min_sparsity)
        if record is not None:
            encoded.append(record)
        elif listed or reason != "dense":
            skipped.append({"name": value.name, "reason": reason})
    encoder.insert_nodes()
    if encoded:
        model.metadata_props["onnxprune.storage"] = ENCODING
    return _report(encoded, skipped, min_sparsity)


def _float_initializers(graph: ir.Graph) -> list[ir.Value]:
    return [v for v in graph.initializers.values()
            if v.const_value is not None and v.const_value.dtype in FLOAT_TYPES and len(v.const_value.shape) >= 2]


def _report(encoded: list[EncodedTensor], skipped: list[dict], min_sparsity: float) -> dict:
    dense = sum(r.dense_bytes for r in encoded)
    packed = sum(r.encoded_bytes for r in encoded)
    return {
        "encoding": ENCODING,
        "min_sparsity": min_sparsity,
        "tensors": [{**asdict(r), "ratio": round(r.ratio, 4)} for r in encoded],
        "skipped": skipped,
        "totals": {"tensors": len(encoded), "dense_bytes": dense, "encoded_bytes": packed,
                   "saved_bytes": dense - packed, "ratio": round(packed / dense, 4) if dense else 1.0},
    }


def bitmask_encode(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(packed mask of elements whose bits are not all zero, [+0.0, those elements...])."""
    flat = np.ascontiguousarray(array).reshape(-1)
    nonzero = flat.view(np.dtype(f"u{flat.dtype.itemsize}")) != 0
    values = np.concatenate([np.zeros(1, dtype=flat.dtype), flat[nonzero]])
    return np.packbits(nonzero), values


class _Encoder:
    """Builds the decoding nodes; shared constants are created on first use."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.nodes: list[ir.Node] = []
        self.taken = {v.name for v in graph.initializers.values()} | {v.name for v in graph.inputs} | {
            out.name for node in graph.all_nodes() for out in node.outputs}
        self.counter = 0
        self.shared: dict[str, ir.Value] = {}

    def encode(self, value: ir.Value, min_sparsity: float) -> tuple[str | None, EncodedTensor | None]:
        """Encode one initializer, or say why not ("dense" when it has no zeros at all)."""
        reason = self._unsupported(value)
        if reason:
            return reason, None
        array = value.const_value.numpy()
        mask, nonzeros = bitmask_encode(array)
        sparsity = 1.0 - (nonzeros.size - 1) / array.size
        extra = 8 * array.ndim + (8 if array.size % 8 else 0)  # per-tensor shape and slice end
        record = EncodedTensor(value.name, ENCODING, value.const_value.dtype.name, list(array.shape),
                               round(sparsity, 6), array.nbytes, mask.nbytes + nonzeros.nbytes + extra)
        if sparsity == 0:
            return "dense", None
        if sparsity < min_sparsity:
            return f"sparsity {sparsity:.3f} < min_sparsity {min_sparsity:g}", None
        if record.encoded_bytes >= record.dense_bytes:
            return f"encoding ({record.encoded_bytes} B) is not smaller than dense ({record.dense_bytes} B)", None
        self._decoder(value, mask, nonzeros, array.shape)
        return None, record

    def _unsupported(self, value: ir.Value) -> str | None:
        tensor = value.const_value
        if tensor is None or not value.is_initializer():
            return "not an initializer"
        if tensor.dtype not in FLOAT_TYPES and tensor.dtype not in INTEGER_TYPES:
            return f"dtype {tensor.dtype.name} is neither a float nor an 8/16-bit integer type"
        if value.is_graph_input():
            return "also a graph input (an overridable initializer)"
        size = tensor.size
        if size == 0:
            return "empty tensor"
        if size > MAX_ELEMENTS:
            return f"{size} elements exceed the int32 indices of the decoder"
        return None

    def _decoder(self, value: ir.Value, mask: np.ndarray, nonzeros: np.ndarray, shape: tuple[int, ...]) -> None:
        name = value.name
        bitmask = self._initializer(f"{name}.bitmask", mask)
        nonzero_values = self._initializer(f"{name}.nonzeros", nonzeros)
        as_int = self._node("Cast", [bitmask], to=ir.DataType.INT32)
        bits = self._node("Reshape", [self._node("Gather", [self._table(), as_int]), self._shared("flat", [-1])])
        if mask.size * 8 != int(np.prod(shape)):
            end = self._initializer(f"{name}.size", np.array([np.prod(shape)], dtype=np.int64))
            bits = self._node("Slice", [bits, self._shared("start", [0]), end])
        index = self._node("Mul", [self._node("CumSum", [bits, self._shared("axis", 0, np.int32)]), bits])
        dense = self._node("Gather", [nonzero_values, index])
        decoded = self._node("Reshape", [dense, self._initializer(f"{name}.shape", np.array(shape, dtype=np.int64))])
        decoded.type, decoded.shape = value.type, value.shape
        value.replace_all_uses_with(decoded, replace_graph_outputs=True)
        self.graph.initializers.pop(name)
        decoded.name = name

    def _node(self, op: str, inputs: list[ir.Value], **attributes) -> ir.Value:
        node = ir.node(op, inputs, attributes or None)
        node.outputs[0].name = self._fresh("_bm")
        self.nodes.append(node)
        return node.outputs[0]

    def _initializer(self, name: str, array: np.ndarray) -> ir.Value:
        name = self._fresh(name)
        value = ir.Value(name=name, const_value=ir.Tensor(array, name=name))
        value.type = ir.TensorType(value.const_value.dtype)
        value.shape = value.const_value.shape
        self.graph.register_initializer(value)
        return value

    def _shared(self, key: str, content, dtype=np.int64) -> ir.Value:
        """A constant all decoders share; an earlier compression's copy is reused."""
        if key not in self.shared:
            existing = self.graph.initializers.get(_SHARED + key)
            self.shared[key] = existing if existing is not None else \
                self._initializer(_SHARED + key, np.array(content, dtype=dtype))
        return self.shared[key]

    def _table(self) -> ir.Value:
        """int32 [256, 8]: row b holds the bits of byte b, most significant first (np.packbits order)."""
        return self._shared("table", np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1), np.int32)

    def _fresh(self, name: str) -> str:
        """`name` if no value in the graph has it yet, else `name` with a numeric suffix."""
        candidate = name
        while candidate in self.taken:
            self.counter += 1
            candidate = f"{name}.{self.counter}"
        self.taken.add(candidate)
        return candidate

    def insert_nodes(self) -> None:
        """Put the decoders first: they read initializers only, so any later node may use them."""
        if not self.nodes:
            return
        first = next(iter(self.graph), None)
        if first is None:
            self.graph.extend(self.nodes)
        else:
            self.graph.insert_before(first, self.nodes)
