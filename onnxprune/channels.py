"""Channel dependency analysis: which tensors share a prunable channel axis.

Structured pruning removes whole channels (FFN neurons, attention heads, conv filters) and must
remove each one *everywhere it appears*: the producer weights' output rows (and their biases), the
consumer weights' input columns, every per-channel constant on the way (BatchNorm statistics, bias
adds), and the shape constants of the Reshapes that split the channel axis into heads. A
`ChannelGroup` is that set of places.

How a group is found. Every tensor that carries the channel gets an `Axis`: the axis index counted
from the end (-1 is the last axis, so NumPy broadcasting keeps it) and its size S along that axis.
A group removes whole *units* (a neuron, a head, a KV group, a filter), and it has one unit count
U for all its tensors, so a tensor's unit is a block of S/U consecutive indices, or, where Concat
and Split move channels around, the axis has a unit map: the unit at each position, -1 for the
positions of other groups (Torch-Pruning's index mapping, as a table). Starting from one
producer's output, a breadth-first walk applies one rule per operator, in both directions (forward
to consumers, backward to producers); a node is visited again when a Concat/Split widens the map
of a tensor next to it:

- elementwise ops and activations (Add/Sub/Mul/Div/Where with broadcasting, Relu, Gelu, Erf GELU,
  SiLU = x·Sigmoid(x), Tanh, Cast, ...) keep the axis; an operand of size 1 on it is free, a
  constant of size S is a per-channel parameter sliced with the channel (also behind a Reshape
  that makes it broadcast, as paddle2onnx writes biases), another tensor of size S
  joins the group (so gate·up joins gate_proj and up_proj, and a residual Add pulls in the skip
  path and everything on it);
- Transpose, Reshape, Flatten, Squeeze, Unsqueeze move the axis; a Reshape that splits the channel
  into [heads, head_dim] lowers U to the head count (and a GQA repeat [kv, n_rep] -> kv·n_rep
  lowers it to the KV-head count, so a unit is then a KV head with all its query heads); the size
  entries of Reshape/Expand shapes on the channel axis are rewritten (literal constants) or must be
  computed from the shape of a group tensor (dynamic: Shape -> Gather -> Concat, as exported);
  Resize passes the channel when it scales only the other axes;
- Concat along the channel axis: input i's positions sit at its offset in the output, so the
  output carries each input's group on its own positions (and a consumer of it belongs to several
  groups, one per input); Split along it hands each piece its positions, and its sizes (input or
  attribute) are rewritten. A residual Add of a piece with a bottleneck's output (YOLOv8's C2f)
  joins that output to the group; a unit a Concat repeats (SPPF) is removed at every copy;
- activation x activation MatMul (attention scores, probabilities x V) keeps a head axis that is a
  batch axis of both operands; a contracted channel axis is refused;
- a MatMul/Gemm/Conv/ConvTranspose whose weight is a target ends the walk: its output side makes
  it a producer (output rows; ConvTranspose's are weight axis 1), its input side a consumer (input
  columns; ConvTranspose's weight axis 0). Grouped and depthwise Conv and ConvTranspose pass the
  channel through (a unit is a whole number of groups: its input channels, filters and outputs go
  together and `group` shrinks with them), BatchNormalization with per-channel parameters;
- normalisations and reductions over the channel axis (LayerNormalization, the Pow/ReduceMean RMSNorm
  pattern, Softmax over it, GroupNormalization), a Reshape that splits Concat/Split pieces into
  heads (fused QKV, a channel shuffle), grouped convs of mapped channels, graph inputs/outputs
  and unknown ops refuse the group, with the reason. The walk still covers the rest
  of the component, so, e.g., the residual stream of a transformer is one refused group.

Shapes come from onnxruntime's symbolic shape inference on a weightless copy of the graph with
concrete input sizes, so Reshape decisions use real numbers; the pruner re-runs it on the result
and reverts any group whose shapes do not come out as planned.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir

from onnxprune.targets import Target

# Concrete sizes given to symbolic input dimensions (batch, sequence, ...): distinct odd numbers,
# unlikely to coincide with model dimensions, so shape arithmetic cannot line up by accident.
# The last one is given to every symbol beyond the others.
PROBE_DIMS = (3, 7, 5, 11, 13, 17, 19, 23, 29)
# Strided CNNs (detectors, U-Nets) concatenate upsampled maps with skip connections: their shapes
# only resolve for image sizes divisible by the total stride, so a model that leaves tensors
# unresolved under PROBE_DIMS is probed again with these multiples of 64.
STRIDED_PROBE_DIMS = tuple(64 * d for d in PROBE_DIMS)
_WEIGHTLESS_ABOVE = 1024  # initializers larger than this are left out of the shape-inference copy

UNARY = {
    "Relu", "LeakyRelu", "Gelu", "FastGelu", "QuickGelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf",
    "Cast", "CastLike", "Neg", "Abs", "Exp", "Log", "Sqrt", "Reciprocal", "Softplus", "Softsign", "Elu", "Selu",
    "Celu", "Mish", "Identity", "Dropout", "IsNaN", "IsInf", "Not", "Sin", "Cos", "Floor", "Ceil", "Round", "Sign",
    "Clip", "ThresholdedRelu", "Shrink", "Swish",
}
BROADCAST = {
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "Equal", "Less", "LessOrEqual",
    "Greater", "GreaterOrEqual", "And", "Or", "Xor", "Mod", "PRelu", "BitwiseAnd", "BitwiseOr", "BitwiseXor",
}
RESHAPES = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}
REDUCES = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
           "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp", "ArgMax", "ArgMin"}
SOFTMAXES = {"Softmax", "LogSoftmax", "Hardmax"}
POOLS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}
NORMS = {"LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
         "SkipSimplifiedLayerNormalization", "GroupNormalization", "LRN", "MeanVarianceNormalization",
         "LpNormalization"}
# Convolutions: the weight operand's axes holding (output channels, input channels). Conv W is
# [O, C/g, *kernel], ConvTranspose W [C, O/g, *kernel]; the axis 1 count is per group.
CONVS = {"Conv": (0, 1), "ConvTranspose": (1, 0)}
LINEARS = {"MatMul", "Gemm", *CONVS}


class Refuse(Exception):
    """The group cannot be pruned safely; the message says why."""

    kind: str | None = None  # what the refusal says about the group's kind


class Normalises(Refuse):
    """The channel axis is normalised or reduced over: a residual stream."""

    kind = "residual"


class Fused(Refuse):
    """The channel axis is split into several projections (fused QKV)."""

    kind = "heads"


class _Coarsen(Exception):
    def __init__(self, units: int) -> None:
        super().__init__(units)
        self.units = units


UnitMap = tuple[int, ...]  # the unit at each position of an axis; -1: a position of another group


class Positions:
    """A place holding a group's channels on `size` positions of one axis: all of them, unit u at
    the block [u·size/U, (u+1)·size/U) (`unit_of` None), or as `unit_of` maps them, where a
    Concat joins channels of several groups or a Split hands out part of them."""

    size: int
    unit_of: UnitMap | None

    def units_at(self, units: int) -> np.ndarray:
        if self.unit_of is None:
            return np.arange(self.size) // (self.size // units)
        return np.asarray(self.unit_of, dtype=np.int64)

    def removed_at(self, units: int, removed: np.ndarray) -> np.ndarray:
        """Mask of the positions whose unit is `removed`."""
        return removed_at(self.units_at(units), removed)


def removed_at(at: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """Mask of the positions of unit indices `at` (-1: not the group's) whose unit is `removed`."""
    return (at >= 0) & removed[np.maximum(at, 0)]


def unit_map(at: np.ndarray, units: int) -> UnitMap | None:
    """`at` as a Positions.unit_of: None when it is the plain block layout."""
    size = len(at)
    if size % units == 0 and np.array_equal(at, np.arange(size) // (size // units)):
        return None
    return tuple(int(u) for u in at)


@dataclass(frozen=True)
class Axis(Positions):
    axis: int  # negative: counted from the last axis
    size: int  # the tensor's length on that axis
    unit_of: UnitMap | None = None


@dataclass
class WeightSlice(Positions):
    """Output rows of a producer or input columns of a consumer, in the stored initializer."""

    target: Target
    role: str  # "rows" | "columns"
    size: int
    unit_of: UnitMap | None = None

    @property
    def operand_axis(self) -> int:
        """The axis of the operand (as the node reads it) that holds these rows or columns."""
        rows, columns = CONVS.get(self.target.op) or ((1, 0) if self.target.layout.kind == "kn" else (0, 1))
        return rows if self.role == "rows" else columns

    @property
    def stored_axis(self) -> int:
        return self.target.stored_axis(self.operand_axis)


@dataclass
class ConstSlice(Positions):
    """A constant input of `node` (bias, BatchNorm statistics, depthwise kernel) sliced along `axis`."""

    node: ir.Node
    index: int
    axis: int  # non-negative, in the constant
    size: int
    unit_of: UnitMap | None = None


@dataclass
class ShapeEntry(Positions):
    """One entry of a Reshape/Expand/Resize target shape that holds the channel axis' size."""

    node: ir.Node  # the node reading the constant that holds the entry
    index: int  # its input index
    element: int  # position inside that constant
    size: int
    unit_of: UnitMap | None = None


@dataclass
class AttrEdit(Positions):
    node: ir.Node
    name: str
    size: int
    unit_of: UnitMap | None = None


@dataclass
class SplitSizes(Positions):
    """A Split along the channel axis: `lengths` of its pieces, rewritten once channels go, as its
    `split` input (opset >= 13, replacing `num_outputs`) or attribute."""

    node: ir.Node
    lengths: tuple[int, ...]
    by_input: bool
    size: int  # of the split input
    unit_of: UnitMap | None = None


@dataclass(eq=False)
class ChannelGroup:
    seed: Target
    units: int
    members: dict[ir.Value, Axis] = field(default_factory=dict)
    weights: list[WeightSlice] = field(default_factory=list)
    constants: list[ConstSlice] = field(default_factory=list)
    entries: list[ShapeEntry] = field(default_factory=list)
    attributes: list[AttrEdit] = field(default_factory=list)
    splits: list[SplitSizes] = field(default_factory=list)
    attention: list[ir.Node] = field(default_factory=list)  # activation x activation MatMuls
    heads: int | None = None  # query heads, when the group runs through attention
    hint: str | None = None  # the kind a refusal revealed (residual stream, fused attention)
    reasons: list[str] = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        return not self.reasons

    @property
    def reason(self) -> str | None:
        return "; ".join(dict.fromkeys(self.reasons)) if self.reasons else None

    @property
    def producers(self) -> list[WeightSlice]:
        return [w for w in self.weights if w.role == "rows"]

    @property
    def consumers(self) -> list[WeightSlice]:
        return [w for w in self.weights if w.role == "columns"]

    @property
    def kind(self) -> str:
        if any(w.target.op in CONVS for w in self.producers):
            return "conv"
        if self.attention:
            return "heads"
        if self.hint is not None:
            return self.hint
        if len({w.target.block for w in self.producers}) > 1:
            return "residual"
        return "ffn"

    @property
    def unit_name(self) -> str:
        if self.kind == "heads":
            return "heads" if self.heads in (None, self.units) else "kv-groups"
        return {"conv": "channels", "ffn": "neurons"}.get(self.kind, "channels")


# ------------------------------------------------------------------------------------- shapes


class Shapes(dict):
    """Tensor name -> shape, for the sizes `probe` gave the symbolic input dimensions."""

    def __init__(self, shapes: dict[str, tuple[int | None, ...]], probe: tuple[int, ...]) -> None:
        super().__init__(shapes)
        self.probe = probe

    def unresolved(self, model: ir.Model) -> int:
        """How many node outputs have no shape, or one with an unknown dimension."""
        return sum(value.name not in self or None in self[value.name]
                   for node in model.graph for value in node.outputs if value.name)


def static_shapes(model: ir.Model, probe: tuple[int, ...] | None = None) -> Shapes:
    """Shapes of every tensor for concrete input sizes: `probe`, or PROBE_DIMS, or
    STRIDED_PROBE_DIMS when those resolve more tensors (see there).

    Runs onnxruntime's symbolic shape inference (falling back to ONNX's with data propagation) on
    a copy of the graph without the large weights: they become graph inputs of the same shape, so
    nothing big is copied.
    """
    if probe is not None:
        return _inferred_shapes(model, probe)
    shapes = _inferred_shapes(model, PROBE_DIMS)
    unresolved = shapes.unresolved(model)
    if unresolved:
        strided = _inferred_shapes(model, STRIDED_PROBE_DIMS)
        if strided.unresolved(model) < unresolved:
            return strided
    return shapes


def _inferred_shapes(model: ir.Model, probe: tuple[int, ...]) -> Shapes:
    proto = _weightless_proto(model, probe)
    inferred = None
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        logging.getLogger("onnxruntime").setLevel(logging.ERROR)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            inferred = SymbolicShapeInference.infer_shapes(proto, auto_merge=True, guess_output_rank=False)
    except Exception:  # noqa: BLE001 - any failure falls back to ONNX's own inference
        inferred = None
    if inferred is None:
        try:
            inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
        except Exception:  # noqa: BLE001
            inferred = proto
    shapes: dict[str, tuple[int | None, ...]] = {}
    graph = inferred.graph
    for info in [*graph.input, *graph.value_info, *graph.output]:
        tensor_type = info.type.tensor_type
        if tensor_type.HasField("shape"):
            shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)
    return Shapes(shapes, probe)


def _weightless_proto(model: ir.Model, probe_dims: tuple[int, ...]) -> onnx.ModelProto:
    graph = model.graph
    big = {name: value for name, value in graph.initializers.items()
           if value.const_value is not None and value.const_value.size > _WEIGHTLESS_ABOVE}
    saved = {name: value.const_value for name, value in big.items()}
    try:
        for name, value in big.items():  # placeholders: serialising them copies no data
            tensor = saved[name]
            value.const_value = ir.ExternalTensor("__weightless__", 0, tensor.nbytes, tensor.dtype,
                                                  shape=tensor.shape, name=name)
        proto = ir.serde.serialize_model(model)
    finally:
        for name, value in big.items():
            value.const_value = saved[name]
    kept = [t for t in proto.graph.initializer if t.name not in big]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    inputs = {i.name for i in proto.graph.input}
    for name, tensor in saved.items():
        if name in inputs:
            continue
        proto.graph.input.append(onnx.helper.make_tensor_value_info(name, int(tensor.dtype), list(tensor.shape)))
    del proto.graph.value_info[:]  # stale or symbolic: inference recomputes them
    probe = iter(probe_dims)
    symbols: dict[str, int] = {}
    for info in proto.graph.input:
        if info.name in big or not info.type.tensor_type.HasField("shape"):
            continue
        for dim in info.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value"):
                key = dim.dim_param or f"?{id(dim)}"
                if key not in symbols:
                    symbols[key] = next(probe, probe_dims[-1])
                dim.dim_value = symbols[key]
    for info in proto.graph.output:
        info.type.tensor_type.ClearField("shape")
    return proto


# ----------------------------------------------------------------------------------- analysis


class ChannelGraph:
    """The channel groups of a model, found from its weight targets."""

    def __init__(self, model: ir.Model, targets: list[Target], shapes: dict | None = None) -> None:
        self.model = model
        self.targets = targets
        self.shapes = static_shapes(model) if shapes is None else shapes
        self.by_node = {c.node: t for t in targets for c in t.consumers}
        self.opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 17))

    def groups(self, seeds: list[Target] | None = None) -> list[ChannelGroup]:
        """One group per connected component reachable from the producers (each reported once)."""
        covered: set[int] = set()
        groups = []
        for target in self.targets if seeds is None else seeds:
            if id(target) in covered or not self.is_producer(target):
                continue
            group = self.group_of(target)
            covered |= {id(w.target) for w in group.producers}
            groups.append(group)
        return groups

    def is_producer(self, target: Target) -> bool:
        node = target.consumers[0].node
        return node.op_type in LINEARS and node.domain in ("", "ai.onnx") and not _grouped(node) \
            and target.structured_reason is None

    def group_of(self, seed: Target) -> ChannelGroup:
        units = seed.layout.out_features
        while True:
            walk = _Walk(self, seed, units)
            try:
                return walk.run()
            except _Coarsen as coarser:
                units = coarser.units


class _Walk:
    def __init__(self, analysis: ChannelGraph, seed: Target, units: int) -> None:
        self.a = analysis
        self.group = ChannelGroup(seed, units)
        self.queue: list[ir.Value] = []
        self.done: set = set()  # visit keys (see _key)
        self.pending_entries: dict[tuple[int, int], tuple] = {}  # (node, input index) -> _shape_entry args

    def _key(self, node: ir.Node, anchor: ir.Value):
        """A node is visited once, but a target layer once per side (its output (rows) and its
        input (columns) can both be in one group, as in x + conv(x)) and a Concat or Split once
        from each piece that joins the group."""
        return (node, anchor) if node.op_type in ("Concat", "Split") or node in self.a.by_node else node

    @staticmethod
    def _adjacent(value: ir.Value) -> list[ir.Node]:
        return [n for n in [value.producer(), *(use.node for use in value.uses())] if n is not None]

    # -- driving
    def run(self) -> ChannelGroup:
        seed = self.group.seed
        node = seed.consumers[0].node
        if len(seed.consumers) > 1:
            self.group.reasons.append(f"{seed.name} is shared by {len(seed.consumers)} nodes")
            return self.group
        self.done.add(self._key(node, node.outputs[0]))
        try:
            axis = self._axis_out(node, seed)
            self.member(node.outputs[0], axis)
            self._linear(node, node.outputs[0], axis)
        except Refuse as refusal:
            self.group.reasons.append(str(refusal))
            return self.group
        while self.queue:
            value = self.queue.pop(0)
            for node in self._adjacent(value):
                if self._key(node, value) in self.done:
                    continue
                self.done.add(self._key(node, value))
                try:
                    self._visit(node, value, self.group.members[value])
                except Refuse as refusal:
                    self.group.reasons.append(str(refusal))
                    self.group.hint = self.group.hint or refusal.kind
                except _Coarsen:
                    if not self.group.reasons:
                        raise
        for args in self.pending_entries.values():
            try:
                self._shape_entry(*args)
            except Refuse as refusal:
                self.group.reasons.append(str(refusal))
        if self.group.units < 2 and not self.group.reasons:
            self.group.reasons.append("the channels form a single unit (nothing can be removed)")
        return self.group

    def member(self, value: ir.Value, axis: Axis) -> None:
        if self.is_constant(value):
            raise Refuse(f"constant {value.name} would need slicing where it is not a parameter")
        known = self.group.members.get(value)
        if known is not None:
            if (known.axis, known.size) != (axis.axis, axis.size):
                raise Refuse(f"{value.name} carries the channel on two axes ({known.axis} and {axis.axis})")
            merged = self._merged(value, known, axis)
            if merged != known:  # a Concat/Split piece added positions: walk on from them again
                self.group.members[value] = merged
                self.done -= {self._key(node, value) for node in self._adjacent(value)}
                if value.producer() is not None and not value.is_graph_output():
                    self.queue.append(value)
            return
        if axis.unit_of is None and axis.size % self.group.units:
            self._coarsen(math.gcd(self.group.units, axis.size))
        self.group.members[value] = axis
        if value.is_graph_output():
            self.group.reasons.append(f"reaches the model output {value.name}")
        elif value.producer() is None:
            self.group.reasons.append(f"comes from the model input {value.name}")
        else:
            self.queue.append(value)

    def _merged(self, value: ir.Value, known: Axis, axis: Axis) -> Axis:
        units = self.group.units
        old, new = known.units_at(units), axis.units_at(units)
        if ((old >= 0) & (new >= 0) & (old != new)).any():
            raise Refuse(f"{value.name} holds two channels of the group at one position (Concat/Split pieces "
                         f"joined in another order)")
        return Axis(known.axis, known.size, unit_map(np.where(old >= 0, old, new), units))

    @staticmethod
    def _collect(items: list, item, place) -> None:
        """Add `item` to one of the group's lists, replacing the one for the same place (`place`
        gives it): a node is visited again when a Concat/Split widens a member's unit map."""
        for i, old in enumerate(items):
            if place(old) == place(item):
                items[i] = item
                return
        items.append(item)

    def weight(self, item: WeightSlice) -> None:
        self._collect(self.group.weights, item, lambda w: (id(w.target), w.role))

    def constant(self, item: ConstSlice) -> None:
        self._collect(self.group.constants, item, lambda c: (id(c.node), c.index, c.axis))

    def entry(self, node: ir.Node, index: int, position: int, axis: Axis, kind: str) -> None:
        """A shape input entry of `node` to check and rewrite once the group is complete."""
        self.pending_entries[(id(node), index)] = (node, index, position, axis.size, axis.unit_of, kind)

    def _coarsen(self, units: int) -> None:
        if not self.group.reasons:
            raise _Coarsen(units)

    def operand(self, node: ir.Node, index: int, axis: Axis) -> bool:
        """An input of a broadcasting op: free (size 1 or absent on the axis), a per-channel
        constant, or a tensor that joins the group. True when it carries the channel."""
        value = node.inputs[index]
        if value is None:
            return False
        shape = self.shape(value)
        if shape is None:
            raise Refuse(f"unknown shape of {value.name} (input of {node.op_type} {node.name})")
        if len(shape) < -axis.axis:
            return False
        dim = shape[len(shape) + axis.axis]
        if dim == 1:
            return False
        if dim is not None and dim != axis.size:
            raise Refuse(f"{value.name} has size {dim} on the channel axis, expected {axis.size}")
        if self.is_constant(value):
            self.constant(ConstSlice(node, index, len(shape) + axis.axis, axis.size, axis.unit_of))
        else:
            self.member(value, axis)
        return True

    # -- facts about values
    def shape(self, value: ir.Value) -> tuple[int | None, ...] | None:
        tensor = const_tensor(value)
        if tensor is not None:
            return tuple(tensor.shape)
        return self.a.shapes.get(value.name)

    def rank(self, value: ir.Value) -> int:
        shape = self.shape(value)
        if shape is None:
            raise Refuse(f"unknown rank of {value.name}")
        return len(shape)

    @staticmethod
    def is_constant(value: ir.Value) -> bool:
        return const_tensor(value) is not None

    @staticmethod
    def ints(value: ir.Value | None) -> list[int] | None:
        tensor = None if value is None else const_tensor(value)
        return None if tensor is None else [int(v) for v in np.asarray(tensor.numpy()).reshape(-1)]

    # -- rules
    def _visit(self, node: ir.Node, anchor: ir.Value, axis: Axis) -> None:
        op = node.op_type
        if node.domain not in ("", "ai.onnx") and op not in ("Gelu", "FastGelu", "QuickGelu"):
            raise Refuse(f"unsupported op {node.domain}.{op} ({node.name})")
        if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values()):
            raise Refuse(f"control flow {op} ({node.name})")
        if op == "Shape":
            return  # read dynamically: adapts to the pruned size
        if node in self.a.by_node and op in LINEARS and not _grouped(node):
            return self._linear(node, anchor, axis)
        if _grouped(node):
            return self._grouped(node, anchor, axis)
        handler = {
            "MatMul": self._matmul, "Transpose": self._transpose, "Expand": self._expand, "Slice": self._slice,
            "Concat": self._concat, "Split": self._split, "BatchNormalization": self._batchnorm,
            "InstanceNormalization": self._instancenorm, "Pad": self._pad, "Resize": self._resize,
            "Upsample": self._resize,
        }.get(op)
        families = ((UNARY, self._unary), (BROADCAST, self._broadcast), (RESHAPES, self._reshape),
                    (SOFTMAXES, self._softmax), (REDUCES, self._reduce), (POOLS, self._pool), (NORMS, self._norm))
        handler = handler or next((rule for ops, rule in families if op in ops), None)
        if handler is not None:
            return handler(node, anchor, axis)
        raise Refuse(f"unsupported op {op} ({node.name}) on the channel path")

    def _axis_out(self, node: ir.Node, target: Target) -> Axis:
        if node.op_type in CONVS:
            return Axis(1 - len(target.layout.shape), target.layout.out_features)
        return Axis(-1, target.layout.out_features)

    def _linear(self, node: ir.Node, anchor: ir.Value, axis: Axis) -> None:
        target = self.a.by_node[node]
        if target.skip_reason or len(target.consumers) > 1 or target.structured_reason:
            raise Refuse(f"{target.name}: {target.skip_reason or target.structured_reason or 'shared by several nodes'}")
        if anchor is node.outputs[0]:
            expected = self._axis_out(node, target)
            if (axis.axis, axis.size) != (expected.axis, expected.size):
                raise Refuse(f"{node.name}: the channel is not its output axis")
            self.weight(WeightSlice(target, "rows", axis.size, axis.unit_of))
            if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
                if self.is_constant(node.inputs[2]):
                    self.operand(node, 2, Axis(-1, axis.size, axis.unit_of))
                else:
                    raise Refuse(f"{node.name} has a computed bias")
            if node.op_type in CONVS and len(node.inputs) > 2 and node.inputs[2] is not None:
                if not self.is_constant(node.inputs[2]):
                    raise Refuse(f"{node.name} has a computed bias")
                self.constant(ConstSlice(node, 2, 0, axis.size, axis.unit_of))
            return
        if anchor is not node.inputs[0]:
            raise Refuse(f"{node.name}: the channel reaches its weight operand")
        if node.op_type in CONVS:
            expected = Axis(1 - len(target.layout.shape), target.layout.shape[CONVS[node.op_type][1]])
        elif node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
            expected = Axis(-2, target.layout.in_features)
        else:
            expected = Axis(-1, target.layout.in_features)
        if (axis.axis, axis.size) != (expected.axis, expected.size):
            raise Refuse(f"{node.name}: the channel is not its reduction axis")
        self.weight(WeightSlice(target, "columns", axis.size, axis.unit_of))

    def _grouped(self, node: ir.Node, anchor: ir.Value, axis: Axis) -> None:
        """A grouped (or depthwise) convolution passes the channel through: group j's filters read
        only group j's input channels, so a unit of whole groups goes at once, its input channels,
        its filters and its output channels, and `group` shrinks with them. The weight loses them on
        axis 0 (Conv: the filters, ConvTranspose: the input channels; axis 1 counts one group's)."""
        groups = node.attributes.get_int("group", 1)
        weight_shape = self.shape(node.inputs[1])
        channel = 1 - len(weight_shape)
        out_axis, in_axis = CONVS[node.op_type]
        counts = [weight_shape[0], groups * weight_shape[1]]  # channels behind weight axes 0 and 1
        if anchor is node.inputs[0]:
            inputs, outputs = axis, Axis(channel, counts[out_axis])
        elif anchor is node.outputs[0]:
            inputs, outputs = Axis(channel, counts[in_axis]), axis
        else:
            raise Refuse(f"{node.name}: the channel reaches the weight of a grouped convolution")
        if axis.axis != channel:
            raise Refuse(f"{node.name}: grouped convolution over a non-channel axis")
        if axis.unit_of is not None:
            raise Refuse(f"{node.name}: grouped convolution of channels joined by Concat or handed out by Split")
        if groups % self.group.units:
            self._coarsen(math.gcd(self.group.units, groups))  # a unit is a whole number of groups
        self._channel_params(node, (1,), outputs if out_axis == 0 else inputs, "weights")
        self._channel_params(node, (2,), outputs, "bias")
        self._collect(self.group.attributes, AttrEdit(node, "group", groups), lambda a: (id(a.node), a.name))
        self.member(node.inputs[0], inputs)
        self.member(node.outputs[0], outputs)

    def _unary(self, node: ir.Node, anchor: ir.Value, axis: Axis) -> None:
        if anchor is not node.inputs[0] and anchor not in node.outputs:
            raise Refuse(f"{node.op_type} {node.name}: the channel reaches a scalar parameter")
        self.member(node.inputs[0], axis)
        for output in node.outputs:
            if output is not None and (output.uses() or output.is_graph_output()):
                self.member(output, axis)

    def _broadcast(self, node: ir.Node, anchor: ir.Value, axis: Axis) -> None:
        carried = [self.operand(node, i, axis) for i in range(len(node.inputs))]
        if not any(carried):
            raise Refuse(f"{node.op_type} {node.name} creates the channel axis by broadcasting")
        self.member(node.outputs[0], axis)

    def _matmul(self, node: ir.Node, anchor: ir.Value, axis: Axis) -> None:
        a, b = node.inputs[0], node.inputs[1]
        if axis.unit_of is not None:
            raise Refuse(f"MatMul {node.name} of channels joined by Concat or handed out by Split")
        if self.rank(a) < 2 or self.rank(b) < 2:
            raise Refuse(f"1-D MatMul {node.name}")
        output = node.outputs[0]
        if anchor is output:
            if axis.axis == -1:
                self.operand(node, 1, axis)
            elif axis.axis == -2:
                self.operand(node, 0, axis)
            elif not any([self.operand(node, 0, axis), self.operand(node, 1, axis)]):
                raise Refuse(f"MatMul {node.name} creates the channel axis by broadcasting")
        else:
            contracted = -1 if anchor is a else -2
            if axis.axis == contracted:
                raise Refuse(f"MatMul {node.name} contracts the channel axis between two activations")
            if axis.axis <= -3:
                self.operand(node, 1 if anchor is a else 0, axis)
            self.member(output, axis)
        if axis.axis <= -3 and node not in self.group.attention:
            self.group.attention.append(node)
            a_axis = self.group.members.get(a)
            if a_axis is not None and a_axis.axis == axis.axis:
                self.group.heads = max(self.group.heads or 0, a_axis.size)

    def _transpose(self, node: ir.Node, anchor: ir.Value, axis: Axis) -> None:
        rank = self.rank(node.inputs[0])
        perm = list(node.attributes.get_ints("perm", list(range(rank))[::-1]))
        if anchor is node.inputs[0]:
            self.member(node.outputs[0], Axis(perm.index(rank + axis.axis) - rank, axis.size, axis.unit_of))
        else:
            self.member(node.inputs[0], Axis(perm[rank + axis.axis] - rank, axis.size, axis.unit_of))

    def _reshape(self, node: ir.Node, anchor: ir.Value, axis: Axis) -> None:
        source, output = node.inputs[0], node.outputs[0]
        forward = anchor is source
        if not forward and anchor is not output:
            raise Refuse(f"{node.op_type} {node.name}: the channel reaches its shape input")
        src, dst = (source, output) if forward else (output, source)
        src_shape, dst_shape = self.shape(src), self.shape(dst)
        if src_shape is None or dst_shape is None:
            raise Refuse(f"unknown shapes around {node.op_type} {node.name}")
        position = len(src_shape) + axis.axis
        q, size = self._align(list(src_shape), position, axis.size, list(dst_shape), node)
        moved = Axis(q - len(dst_shape), size, self._moved_map(node, axis, size))
        if not forward and self.is_constant(dst):  # a per-channel constant reshaped to broadcast (paddle2onnx)
            self.constant(ConstSlice(node, 0, len(dst_shape) + moved.axis, size, moved.unit_of))
        else:
            self.member(dst, moved)
        out_axis = axis if not forward else moved
        if node.op_type == "Reshape":
            out_rank = len(self.shape(output))
            self.entry(node, 1, out_rank + out_axis.axis, out_axis, "reshape")

    def _moved_map(self, node: ir.Node, axis: Axis, size: int) -> UnitMap | None:
        """The unit map of a mapped channel axis of `axis.size` reshaped to `size`: merged with inner
        axes (each position repeated), or split with the channel outer, when every block of
        positions is one unit; a piece of a Split/Concat split into heads (fused QKV) is refused."""
        if axis.unit_of is None:
            if size % self.group.units:
                self._coarsen(math.gcd(self.group.units, size))
            return None
        at = axis.units_at(self.group.units)
        if size >= axis.size and size % axis.size == 0:
            return unit_map(np.repeat(at, size // axis.size), self.group.units)
        rows = at.reshape(size, -1) if axis.size % size == 0 else None
        if rows is None or (rows != rows[:, :1]).any():
            raise Fused(f"{node.op_type} {node.name} splits channels that a Split or Concat handed out into "
                        f"several axes (fused projections such as QKV, or a channel shuffle)")
        return unit_map(rows[:, 0], self.group.units)

    def _align(self, src: list, position: int, size: int, dst: list, node: ir.Node) -> tuple[int, int]:
        """The destination axis carrying the channel (and its size). The channel's units stay whole
        when the axis keeps the same outer extent (and, see _moved_map, its size is a multiple of
        the unit count)."""
        src, dst = _resolved(src, position, size, dst)
        if src is None:
            raise Refuse(f"cannot resolve the shapes around {node.op_type} {node.name}")
        outer = math.prod(src[:position])
        for q, dim in enumerate(dst):
            if math.prod(dst[:q]) == outer and dim != 1:
                break
        else:
            raise Refuse(f"{node.op_type} {node.name} merges the channel axis with outer axes")
        if math.prod(dst[q:]) != math.prod(src[position:]):
            raise Refuse(f"{node.op_type} {node.name} mixes the channel axis with other axes")
        return q, dst[q]

    def _expand(self, node: ir.Node, anchor: ir.Value, axis: Axis) -> None:
        data, output = node.inputs[0], node.outputs[0]
        if anchor is not data and anchor is not output:
            raise Refuse(f"Expand {node.name}: the channel reaches its shape input")
        out_rank = self.rank(output)
        if anchor is output:
            self.operand(node, 0, axis)
        else:
            self.member(output, axis)
        self.entry(node, 1, out_rank + axis.axis, axis, "expand")

    def _slice(self, node: ir.Node, anchor: ir.Value, axis: Axis) -> None:
        if anchor is not node.inputs[0] and anchor is not node.outputs[0]:
            raise Refuse(f"Slice {node.name}: the channel reaches its indices")
        rank = self.rank(node.inputs[0])
        if self.a.opset < 10:
            starts, ends = node.attributes.get_ints("starts", []), node.attributes.get_ints("ends", [])
            axes = node.attributes.get_ints("axes", list(range(len(starts))))
            steps = [1] * len(starts)
        else:
            starts, ends = self.ints(node.inputs[1]), self.ints(node.inputs[2])
            axes = self.ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
            steps = self.ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else None
            if axes is None:
                axes = list(range(len(starts))) if starts is not None else None
        if axes is None:
            raise Refuse(f"Slice {node.name} with computed axes")
        position = rank + axis.axis
        for i, sliced in enumerate(axes):
            if sliced % rank == position:
                full = (starts is not None and ends is not None and starts[i] == 0 and ends[i] >= axis.size
                        and (steps is None or steps[i] == 1))
                if not full:
                    raise Refuse(f"Slice {node.name} cuts the channel axis")
        self._through(node, axis)

    def _concat(self, node: ir.Node, anchor: ir.Value, axis: Axis) -> None:
        rank = self.rank(node.outputs[0])
        if node.attributes.get_int("axis", 0) % rank == rank + axis.axis:
            self._join(node, node.outputs[0], list(node.inputs), anchor, axis)
            return
        for index in range(len(node.inputs)):
            if not self.operand(node, index, axis):
                raise Refuse(f"Concat {node.name}: an input lacks the channel axis")
        self.member(node.outputs[0], axis)

    def _split(self, node: ir.Node, anchor: ir.Value, axis: Axis) -> None:
        rank = self.rank(node.inputs[0])
        if node.attributes.get_int("axis", 0) % rank != rank + axis.axis:
            self.member(node.inputs[0], axis)
            for output in node.outputs:
                self.member(output, axis)
            return
        by_input = self.a.opset >= 13
        if by_input and len(node.inputs) > 1 and node.inputs[1] is not None and not self.is_constant(node.inputs[1]):
            raise Refuse(f"Split {node.name} with computed sizes")
        lengths = self._join(node, node.inputs[0], list(node.outputs), anchor, axis)
        whole = self.group.members[node.inputs[0]]
        self._collect(self.group.splits, SplitSizes(node, tuple(lengths), by_input, whole.size, whole.unit_of),
                      lambda split: id(split.node))

    def _join(self, node: ir.Node, whole: ir.Value, pieces: list[ir.Value], anchor: ir.Value, axis: Axis) -> list[int]:
        """A Concat output or Split input `whole` is its `pieces` end to end on the channel axis:
        position p of piece i is position offset_i + p of the whole and holds the same unit, both
        ways (the concat/split index mapping of Torch-Pruning's dependency graph). A piece holding
        none of the group's units is not a member. Returns the pieces' lengths."""
        position = self.rank(whole) + axis.axis
        lengths = []
        for piece in pieces:
            shape = self.shape(piece)
            if shape is None or len(shape) <= position or shape[position] is None:
                raise Refuse(f"{node.op_type} {node.name}: unknown size of {piece.name} on the channel axis")
            lengths.append(shape[position])
        offsets = np.cumsum([0, *lengths])
        units = self.group.units
        if anchor is whole:
            at = axis.units_at(units)
            for piece, start, length in zip(pieces, offsets, lengths):
                part = at[start:start + length]
                if (part >= 0).any():
                    self.member(piece, Axis(axis.axis, length, unit_map(part, units)))
            return lengths
        parts = []
        for piece, length in zip(pieces, lengths):
            known = self.group.members.get(piece)
            if known is not None and known.axis != axis.axis:
                raise Refuse(f"{node.op_type} {node.name}: {piece.name} carries the channel on another axis")
            parts.append(np.full(length, -1) if known is None else known.units_at(units))
        self.member(whole, Axis(axis.axis, int(offsets[-1]), unit_map(np.concatenate(parts), units)))
        return lengths

    def _channel_axis(self, node: ir.Node) -> int:
        return 1 - self.rank(node.inputs[0])

    def _channel_params(self, node: ir.Node, indices, axis: Axis, what: str) -> None:
        """Per-channel constant inputs (BatchNorm statistics, depthwise kernels) sliced with the channel."""
        for index in indices:
            value = node.inputs[index] if index < len(node.inputs) else None
            if value is None:
                continue
            if not self.is_constant(value):
                raise Refuse(f"{node.op_type} {node.name} with computed {what}")
            self.constant(ConstSlice(node, index, 0, axis.size, axis.unit_of))

    def _through(self, node: ir.Node, axis: Axis) -> None:
        """The channel passes from the first input to the first output on the same axis."""
        self.member(node.inputs[0], axis)
        self.member(node.outputs[0], axis)

    def _batchnorm(self, node: ir.Node, anchor: ir.Value, axis: Axis) -> None:
        if any(o is not None and o.uses() for o in node.outputs[1:]):
            raise Refuse(f"BatchNormalization {node.name} in training mode")
        if axis.axis == self._channel_axis(node):
            self._channel_params(node, range(1, 5), axis, "statistics")
        self._through(node, axis)

    def _instancenorm(self, node: ir.Node, anchor: ir.Value, axis: Axis) -> None:
        if axis.axis != self._channel_axis(node):
            raise Normalises(f"InstanceNormalization {node.name} normalises over the channel axis")
        self._channel_params(node, (1, 2), axis, "parameters")
        self._through(node, axis)

    def _pool(self, node: ir.Node, anchor: ir.Value, axis: Axis) -> None:
        if axis.axis != self._channel_axis(node):
            raise Refuse(f"{node.op_type} {node.name} pools over the channel axis")
        if len(node.outputs) > 1 and node.outputs[1] is not None and node.outputs[1].uses():
            raise Refuse(f"{node.op_type} {node.name}: its indices output is used")
        self._through(node, axis)

    def _pad(self, node: ir.Node, anchor: ir.Value, axis: Axis) -> None:
        rank = self.rank(node.inputs[0])
        pads = node.attributes.get_ints("pads", None) if self.a.opset < 11 else self.ints(node.inputs[1])
        axes = self.ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else list(range(rank))
        if pads is None or axes is None:
            raise Refuse(f"Pad {node.name} with computed pads")
        position = rank + axis.axis
        for i, padded in enumerate(axes):
            if padded % rank == position and (pads[i] or pads[i + len(axes)]):
                raise Refuse(f"Pad {node.name} pads the channel axis")
        self._through(node, axis)

    def _resize(self, node: ir.Node, anchor: ir.Value, axis: Axis) -> None:
        """Resize/Upsample keeps the channel when it scales only the other axes (nearest or linear
        upsampling between a detector's scales); target `sizes` hold the channel count."""
        if anchor is not node.inputs[0] and anchor is not node.outputs[0]:
            raise Refuse(f"{node.op_type} {node.name}: the channel reaches its scales or sizes")
        position = self.rank(node.inputs[0]) + axis.axis
        late = node.op_type == "Resize" and self.a.opset >= 11
        scales_slot, sizes_slot = (2, 3) if late else (1, None)
        if sizes_slot is not None and len(node.inputs) > sizes_slot and node.inputs[sizes_slot] is not None:
            self.entry(node, sizes_slot, position, axis, "resize")
        elif len(node.inputs) > scales_slot and node.inputs[scales_slot] is not None:
            scales = const_tensor(node.inputs[scales_slot])
            if scales is None:
                raise Refuse(f"{node.op_type} {node.name} with computed scales")
            if float(np.asarray(scales.numpy()).reshape(-1)[position]) != 1.0:
                raise Refuse(f"{node.op_type} {node.name} scales the channel axis")
        elif list(node.attributes.get_floats("scales", [1.0] * (position + 1)))[position] != 1.0:
            raise Refuse(f"{node.op_type} {node.name} scales the channel axis")
        self._through(node, axis)

    def _softmax(self, node: ir.Node, anchor: ir.Value, axis: Axis) -> None:
        rank = self.rank(node.inputs[0])
        position = rank + axis.axis
        if self.a.opset < 13:
            if position >= node.attributes.get_int("axis", 1) % rank:
                raise Normalises(f"{node.op_type} {node.name} normalises over the channel axis")
        elif node.attributes.get_int("axis", -1) % rank == position:
            raise Normalises(f"{node.op_type} {node.name} normalises over the channel axis")
        self._through(node, axis)

    def _reduce(self, node: ir.Node, anchor: ir.Value, axis: Axis) -> None:
        rank = self.rank(node.inputs[0])
        if node.op_type in ("ArgMax", "ArgMin"):
            axes = [node.attributes.get_int("axis", 0)]
        elif "axes" in node.attributes:
            axes = list(node.attributes.get_ints("axes"))
        else:
            axes = self.ints(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else []
            if axes is None:
                raise Refuse(f"{node.op_type} {node.name} with computed axes")
        axes = sorted({a % rank for a in axes}) or list(range(rank))
        if anchor is node.inputs[0]:
            position = rank + axis.axis
        else:
            kept = [p for p in range(rank) if p not in axes] if not node.attributes.get_int("keepdims", 1) else None
            position = (kept[len(kept) + axis.axis] if kept is not None else rank + axis.axis)
        if position in axes:
            raise Normalises(f"{node.op_type} {node.name} reduces over the channel axis (a normalisation such as RMSNorm)")
        self.member(node.inputs[0], Axis(position - rank, axis.size, axis.unit_of))
        if node.attributes.get_int("keepdims", 1):
            self.member(node.outputs[0], Axis(position - rank, axis.size, axis.unit_of))
        else:
            kept = [p for p in range(rank) if p not in axes]
            self.member(node.outputs[0], Axis(kept.index(position) - len(kept), axis.size, axis.unit_of))

    def _norm(self, node: ir.Node, anchor: ir.Value, axis: Axis) -> None:
        op = node.op_type
        rank = self.rank(node.inputs[0])
        position = rank + axis.axis
        if op in ("LayerNormalization", "RMSNormalization"):
            if position < node.attributes.get_int("axis", -1) % rank:
                self.member(node.inputs[0], axis)
                for output in node.outputs:
                    if output is not None and output.uses():
                        self.member(output, axis)
                return
        raise Normalises(f"{op} {node.name} normalises over the channel axis (the residual stream is not pruned)")

    # -- shape entries (checked once the group is complete)
    def _shape_entry(self, node: ir.Node, index: int, position: int, size: int, unit_of: UnitMap | None,
                     kind: str) -> None:
        holder, element = self._locate(node, index, position)
        if holder is None:
            if not self._reads_group_shape(node.inputs[index]):
                raise Refuse(f"{node.op_type} {node.name}: the size of the channel axis is computed from "
                             f"tensors outside the group")
            return
        consumer, slot = holder
        value = self.ints(consumer.inputs[slot])[element]
        if kind == "reshape" and value == -1:
            return
        if kind == "expand" and value == 1 and node.inputs[0] in self.group.members:
            return
        if kind == "reshape" and value == 0 and not node.attributes.get_int("allowzero", 0):
            source = self.group.members.get(node.inputs[0])
            if source is not None and len(self.shape(node.inputs[0])) + source.axis == position:
                return
        if value != size:
            raise Refuse(f"{node.op_type} {node.name} holds {value} at the channel axis, not {size}")
        self._collect(self.group.entries, ShapeEntry(consumer, slot, element, size, unit_of),
                      lambda e: (id(e.node), e.index, e.element))

    def _locate(self, node: ir.Node, index: int, position: int):
        """The constant holding entry `position` of the 1-D tensor `node.inputs[index]`:
        ((consumer node, input index), element), or (None, None) when it is computed."""
        value = node.inputs[index]
        if self.is_constant(value):
            return (node, index), position
        producer = value.producer()
        if producer is not None and producer.op_type == "Concat":
            offset = 0
            for slot, piece in enumerate(producer.inputs):
                shape = self.shape(piece)
                if shape is None or len(shape) != 1 or shape[0] is None:
                    return None, None
                if offset <= position < offset + shape[0]:
                    return self._locate(producer, slot, position - offset)
                offset += shape[0]
        if producer is not None and producer.op_type in ("Cast", "Identity"):
            return self._locate(producer, 0, position)
        return None, None

    def _reads_group_shape(self, value: ir.Value, limit: int = 64) -> bool:
        """Whether a computed shape entry is read from the shape of a group tensor on its channel
        axis (Shape -> Gather(channel axis) -> ...), as exporters write `x.view(b, s, -1, d)`."""
        stack, seen = [value], set()
        while stack and len(seen) < limit:
            node = stack.pop().producer()
            if node is None or node in seen:
                continue
            seen.add(node)
            if node.op_type == "Shape" and node.inputs[0] in self.group.members:
                return True
            if node.op_type == "Gather" and node.inputs[0].producer() is not None \
                    and node.inputs[0].producer().op_type == "Shape":
                source = node.inputs[0].producer().inputs[0]
                index = self.ints(node.inputs[1])
                member = self.group.members.get(source)
                if member is not None and index is not None and len(index) == 1:
                    if index[0] % len(self.shape(source)) == len(self.shape(source)) + member.axis:
                        return True
                continue
            stack += [v for v in node.inputs if v is not None]
        return False


def const_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The constant behind `value`: an initializer, a Constant node, or either behind Identity
    nodes (exporters deduplicate equal initializers, such as all-zero biases, into Identity)."""
    for _ in range(8):
        if value is None:
            return None
        tensor = ir.convenience.get_const_tensor(value)
        if tensor is not None:
            return tensor
        producer = value.producer()
        if producer is None or producer.op_type != "Identity" or producer.domain not in ("", "ai.onnx"):
            return None
        value = producer.inputs[0]
    return None


def _resolved(src: list, position: int, size: int, dst: list):
    """Both shapes with the channel size filled in and at most one unknown dimension solved from
    the equal element counts; (None, None) when they cannot be resolved."""
    src, dst = list(src), list(dst)
    src[position] = size
    unknown = [(side, i) for side, dims in ((0, src), (1, dst)) for i, d in enumerate(dims) if d is None]
    if len(unknown) > 1:
        return None, None
    if unknown:
        side, i = unknown[0]
        known, other = (src, dst) if side == 0 else (dst, src)
        rest = math.prod(d for j, d in enumerate(known) if j != i)
        if rest == 0 or math.prod(other) % rest:
            return None, None
        known[i] = math.prod(other) // rest
    if math.prod(src) != math.prod(dst):
        return None, None
    return src, dst


def _grouped(node: ir.Node) -> bool:
    """A Conv or ConvTranspose with group > 1 (depthwise included) and a constant weight."""
    return (node.op_type in CONVS and node.attributes.get_int("group", 1) > 1
            and const_tensor(node.inputs[1]) is not None)
