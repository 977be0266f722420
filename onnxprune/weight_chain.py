"""What stands between a stored weight and the op that multiplies it: a chain of pass-through ops.

Exporters rarely feed an initializer straight into MatMul: paddle2onnx and tf2onnx store weights
as `Constant` nodes, torch puts a Transpose or Cast in front, quantizers a DequantizeLinear, and
int8 exports a Cast→Mul by the scale. Each pass-through op is one rule in `PASS_THROUGH`: it turns
the node into a `Step` (forward: the tensor before the op → after it; inverse: back), or declines
(None) when the node is not a pure, invertible rewrite of the weight in that form. Reading a weight
runs the steps forward; writing runs them backwards, so a pruned weight is stored in the form it
came in (int8 codes stay int8: a zeroed weight becomes the zero point, scales are untouched).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

DEFAULT_DOMAINS = ("", "ai.onnx")
INTEGER_CODES = (np.int8, np.uint8, np.int16, np.uint16, np.int32)


def op_name(node: ir.Node) -> str:
    """`MatMul`, or `com.microsoft.Attention` outside the default domain."""
    return node.op_type if node.domain in DEFAULT_DOMAINS else f"{node.domain}.{node.op_type}"


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The value of an initializer or of a Constant node's output; None when it is computed."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is None or producer.op_type != "Constant" or producer.domain not in DEFAULT_DOMAINS:
        return None
    for name, attribute in producer.attributes.items():
        if name == "value" and attribute.type == ir.AttributeType.TENSOR:
            return attribute.value.numpy()
        if name in ("value_float", "value_floats", "value_int", "value_ints"):
            return np.asarray(attribute.value, dtype=np.float32 if "float" in name else np.int64)
    return None


@dataclass(frozen=True)
class Step:
    """One pass-through node. `key` tells equal rewrites apart from different ones (two weights
    reach their consumers in the same form only if their steps' keys match)."""

    op: str
    node: ir.Node
    key: tuple
    shape: tuple[int, ...]  # after the step
    dtype: np.dtype  # after the step
    forward: Callable[[np.ndarray], np.ndarray]
    inverse: Callable[[np.ndarray], np.ndarray]


def step_for(node: ir.Node, index: int, shape: tuple[int, ...], dtype: np.dtype) -> Step | None:
    """The step `node` makes of the weight it reads at input `index`, or None. The step may end at
    a later node (`Step.node`: the Concat after a Slice), whose output the weight then continues from."""
    build = PASS_THROUGH.get(op_name(node))
    if build is None or node.outputs[0].is_graph_output() or len(node.outputs) != 1:
        return None
    step = build(node, index, tuple(int(d) for d in shape), np.dtype(dtype))
    return None if step is None or step.node.outputs[0].is_graph_output() else step


def to_dtype(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`array` stored as `dtype`; integer codes are rounded and clipped to their range."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(array), info.min, info.max).astype(dtype)
    return array.astype(dtype)


def _reshaping(op: str, node: ir.Node, shape: tuple[int, ...], dtype: np.dtype, new_shape) -> Step | None:
    new_shape = tuple(int(d) for d in new_shape)
    if int(np.prod(new_shape)) != int(np.prod(shape)):
        return None
    return Step(op, node, (op, new_shape), new_shape, dtype,
                lambda x: x.reshape(new_shape), lambda y: y.reshape(shape))


def _identity(node, index, shape, dtype):
    return Step("Identity", node, ("Identity",), shape, dtype, lambda x: x, lambda y: y) if index == 0 else None


def _cast(node, index, shape, dtype):
    target = ir.DataType(node.attributes.get_int("to", 0))
    if index != 0 or not target.is_floating_point():
        return None
    to = np.dtype(target.numpy())
    return Step("Cast", node, ("Cast", to.str), shape, to, lambda x: x.astype(to), lambda y: to_dtype(y, dtype))


def _transpose(node, index, shape, dtype):
    if index != 0:
        return None
    perm = tuple(node.attributes.get_ints("perm", list(range(len(shape)))[::-1]))
    if sorted(perm) != list(range(len(shape))):
        return None
    inverse = tuple(int(i) for i in np.argsort(perm))
    return Step("Transpose", node, ("Transpose", perm), tuple(shape[p] for p in perm), dtype,
                lambda x: x.transpose(perm), lambda y: y.transpose(inverse))


def _reshape(node, index, shape, dtype):
    requested = constant_array(node.inputs[1]) if index == 0 and len(node.inputs) > 1 else None
    if requested is None:
        return None
    allow_zero = node.attributes.get_int("allowzero", 0)
    new = [shape[i] if d == 0 and not allow_zero else int(d) for i, d in enumerate(requested.tolist())]
    if new.count(-1) == 1:
        known = int(np.prod([d for d in new if d != -1]))
        if known == 0:
            return None
        new[new.index(-1)] = int(np.prod(shape)) // known
    return _reshaping("Reshape", node, shape, dtype, new)


def _axes(node: ir.Node) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = constant_array(node.inputs[1])
        return None if axes is None else [int(a) for a in np.ravel(axes)]
    attribute = node.attributes.get("axes")
    return None if attribute is None else list(attribute.value)


def _unsqueeze(node, index, shape, dtype):
    axes = _axes(node) if index == 0 else None
    if axes is None:
        return None
    rank = len(shape) + len(axes)
    inserted = sorted(a % rank for a in axes)
    new = list(shape)
    for axis in inserted:
        new.insert(axis, 1)
    return _reshaping("Unsqueeze", node, shape, dtype, new)


def _squeeze(node, index, shape, dtype):
    if index != 0:
        return None
    axes = _axes(node)
    axes = [i for i, d in enumerate(shape) if d == 1] if axes is None else [a % len(shape) for a in axes]
    if any(shape[a] != 1 for a in axes):
        return None
    return _reshaping("Squeeze", node, shape, dtype, [d for i, d in enumerate(shape) if i not in axes])


def _flatten(node, index, shape, dtype):
    if index != 0:
        return None
    axis = node.attributes.get_int("axis", 1) % (len(shape) + 1)
    return _reshaping("Flatten", node, shape, dtype, [int(np.prod(shape[:axis])), int(np.prod(shape[axis:]))])


def _per_axis(parameter: np.ndarray, rank: int, axis: int) -> np.ndarray:
    """A per-tensor or per-axis quantization parameter, broadcastable to the quantized tensor."""
    if parameter.size == 1:
        return parameter.reshape(())
    shape = [1] * rank
    shape[axis % rank] = -1
    return parameter.reshape(shape)


def _dequantize(node, index, shape, dtype):
    """DequantizeLinear of integer codes: (q - zero_point)·scale. Written back in the quantized
    domain: re-quantized on the same scale and zero point, so a pruned weight is its zero point."""
    if index != 0 or dtype not in INTEGER_CODES or node.attributes.get_int("block_size", 0):
        return None
    scale = constant_array(node.inputs[1])
    has_zero_point = len(node.inputs) > 2 and node.inputs[2] is not None
    zero_point = constant_array(node.inputs[2]) if has_zero_point else np.zeros((), dtype)
    if scale is None or zero_point is None or not np.all(np.isfinite(scale)):
        return None
    axis = node.attributes.get_int("axis", 1)
    scale_b = _per_axis(scale, len(shape), axis)
    zero_b = _per_axis(zero_point.astype(np.float64), len(shape), axis)
    if np.broadcast_shapes(scale_b.shape, zero_b.shape, shape) != shape:
        return None
    safe_scale = np.where(scale_b == 0, 1, scale_b)

    def inverse(y: np.ndarray) -> np.ndarray:
        codes = np.where(scale_b == 0, zero_b, np.rint(y.astype(np.float64) / safe_scale) + zero_b)
        return to_dtype(codes, dtype)

    key = ("DequantizeLinear", axis, scale.tobytes(), zero_point.tobytes())
    return Step("DequantizeLinear", node, key, shape, scale.dtype,
                lambda x: ((x.astype(np.float64) - zero_b) * scale_b).astype(scale.dtype), inverse)


def _quantize(node, index, shape, dtype):
    """QuantizeLinear of a float weight (fake-quantized exports: W → Q → DQ): a float zero stays a
    zero code; written back dequantized, on the grid Q snaps it to anyway."""
    if index != 0 or not np.issubdtype(dtype, np.floating) or node.attributes.get_int("block_size", 0):
        return None
    scale = constant_array(node.inputs[1])
    has_zero_point = len(node.inputs) > 2 and node.inputs[2] is not None
    zero_point = constant_array(node.inputs[2]) if has_zero_point else np.zeros((), np.uint8)
    if scale is None or zero_point is None or zero_point.dtype.type not in INTEGER_CODES or np.any(scale == 0):
        return None
    axis = node.attributes.get_int("axis", 1)
    scale_b = _per_axis(scale, len(shape), axis).astype(np.float64)
    zero_b = _per_axis(zero_point.astype(np.float64), len(shape), axis)
    if np.broadcast_shapes(scale_b.shape, zero_b.shape, shape) != shape:
        return None
    key = ("QuantizeLinear", axis, scale.tobytes(), zero_point.tobytes())
    return Step("QuantizeLinear", node, key, shape, zero_point.dtype,
                lambda x: to_dtype(np.rint(x.astype(np.float64) / scale_b) + zero_b, zero_point.dtype),
                lambda q: ((q.astype(np.float64) - zero_b) * scale_b).astype(dtype))


def _scaled(node, index, shape, dtype):
    """Mul by a constant scale or Sub of a constant zero point (int8 weights dequantized by
    Cast→Mul, Cast→Sub→Mul); the constant must not broadcast the weight to a larger shape."""
    if len(node.inputs) != 2:
        return None
    other = constant_array(node.inputs[1 - index])
    if other is None or np.broadcast_shapes(other.shape, shape) != shape:
        return None
    out = np.result_type(dtype, other.dtype)
    if not np.issubdtype(out, np.floating):
        return None
    key = (node.op_type, index, other.shape, other.tobytes())
    if node.op_type == "Mul":
        if np.any(other == 0):
            return None
        return Step("Mul", node, key, shape, out, lambda x: x * other, lambda y: to_dtype(y / other, dtype))
    if index == 0:  # x - c
        return Step("Sub", node, key, shape, out, lambda x: x - other, lambda y: to_dtype(y + other, dtype))
    return Step("Sub", node, key, shape, out, lambda x: other - x, lambda y: to_dtype(other - y, dtype))


def _slice_range(node: ir.Node, shape: tuple[int, ...], axis: int) -> tuple[int, int] | None:
    """[start, end) that a Slice with constant bounds and unit steps keeps along `axis`, or None
    (computed bounds, a stride, or an axis other than `axis` cut)."""
    if len(node.inputs) > 1:  # opset >= 10: starts, ends, axes, steps as inputs
        bounds = [constant_array(v) if v is not None else None for v in list(node.inputs[1:5])]
        bounds += [None] * (4 - len(bounds))
        if bounds[0] is None or bounds[1] is None or any(
                v is not None and b is None for v, b in zip(node.inputs[3:5], bounds[2:])):
            return None
        starts, ends, axes, steps = bounds
    else:
        starts, ends, axes = (node.attributes.get_ints(name) for name in ("starts", "ends", "axes"))
        if starts is None or ends is None:
            return None
        steps = None
    starts, ends = np.ravel(starts).tolist(), np.ravel(ends).tolist()
    axes = list(range(len(starts))) if axes is None else [int(a) % len(shape) for a in np.ravel(axes)]
    if steps is not None and any(int(s) != 1 for s in np.ravel(steps)):
        return None
    kept = {a: (_clamped(b, shape[a]), _clamped(e, shape[a])) for a, b, e in zip(axes, starts, ends)}
    if any(a != axis and kept[a] != (0, shape[a]) for a in kept):
        return None
    return kept.get(axis, (0, shape[axis]))


def _clamped(bound: int, size: int) -> int:
    """A Slice bound as ONNX reads it: negative counts from the end, then clamped to [0, size]."""
    return min(max(bound + size if bound < 0 else bound, 0), size)


def _concat_of_slices(node, index, shape, dtype):
    """A Slice whose only reader is a Concat of Slices of the same tensor along the concat axis
    that together hold every element exactly once: a block permutation (torch's LSTM gates
    i,f,g,o reordered to ONNX's i,o,f,c). One step from the tensor to the Concat's output; written
    back by scattering each block to where it was sliced from."""
    uses = node.outputs[0].uses()
    if index != 0 or len(uses) != 1 or uses[0].node.op_type != "Concat" or uses[0].node.domain not in DEFAULT_DOMAINS:
        return None
    concat = uses[0].node
    axis = concat.attributes.get_int("axis", 0) % len(shape)
    ranges = []
    for part in concat.inputs:
        piece = part.producer() if part is not None else None
        if piece is None or piece.op_type != "Slice" or piece.inputs[0] is not node.inputs[0] \
                or len(part.uses()) != 1 or part.is_graph_output():
            return None
        kept = _slice_range(piece, shape, axis)
        if kept is None:
            return None
        ranges.append(kept)
    ordered = sorted(ranges)
    if [r[0] for r in ordered] != [0] + [r[1] for r in ordered[:-1]] or ordered[-1][1] != shape[axis]:
        return None  # overlapping, or leaving part of the tensor out
    cuts = [(slice(None),) * axis + (slice(begin, end),) for begin, end in ranges]

    def inverse(y: np.ndarray) -> np.ndarray:
        stored = np.empty_like(y)
        offset = 0
        for cut, (begin, end) in zip(cuts, ranges):
            stored[cut] = y[(slice(None),) * axis + (slice(offset, offset + end - begin),)]
            offset += end - begin
        return stored

    return Step("Slice+Concat", concat, ("Slice+Concat", axis, tuple(ranges)), shape, dtype,
                lambda x: np.concatenate([x[cut] for cut in cuts], axis=axis), inverse)


PASS_THROUGH: dict[str, Callable[[ir.Node, int, tuple[int, ...], np.dtype], Step | None]] = {
    "Identity": _identity,
    "Cast": _cast,
    "Transpose": _transpose,
    "Reshape": _reshape,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Flatten": _flatten,
    "DequantizeLinear": _dequantize,
    "QuantizeLinear": _quantize,
    "Mul": _scaled,
    "Sub": _scaled,
    "Slice": _concat_of_slices,
}


def constant_nodes_to_initializers(nodes: list[ir.Node]) -> dict[ir.Value, ir.Value]:
    """Replace each `Constant` node (tensor value) by an initializer of the same name, in the graph
    that holds it: every weight is then an initializer whatever the exporter wrote, and is written
    back as one. Returns {old output: new initializer}."""
    replaced = {}
    for node in nodes:
        output = node.outputs[0]
        tensor = node.attributes["value"].value
        name = output.name
        holder = node.graph
        output.name = f"{name}/constant_node_output"
        initializer = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype),
                               const_value=tensor)
        output.replace_all_uses_with(initializer)
        holder.remove(node, safe=True)
        holder.register_initializer(initializer)
        replaced[output] = initializer
    return replaced
