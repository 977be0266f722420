"""Finding prunable weights (targets) in any ONNX graph.

A target is a float initializer that reaches the weight operand of MatMul (B), Gemm (B, honouring
transB) or Conv (W), possibly through Transpose and Cast. Passes never see the graph: they get the
weight as a canonical matrix `W[out, K]` (one row per output neuron, K the reduction axis), which
`Layout` maps to and from the stored initializer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxprune.blocks import assign_blocks
from onnxprune.errors import UserError

FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
TINY_K = 16  # layers with fewer inputs per output are left alone by default, as the references do


@dataclass(frozen=True)
class Layout:
    """How a stored weight maps to the canonical `W[out, K]`.

    kind "kn": stored [K, N] (MatMul B).  kind "nk": stored [N, K] (Gemm transB=1, or a Transpose
    in front).  kind "conv": stored [O, C/g, *kernel]; K is ordered (*kernel, C/g) so that groups
    of M consecutive K entries are M consecutive input channels at one kernel position, which is
    the N:M layout TensorRT's sparse convolutions need. kind "convT" (ConvTranspose): stored
    [C_in, C_out/g, *kernel]; canonical rows are the g·C_out/g output channels, K is (*kernel,
    C_in/g) as for Conv. In both conv kinds, output channels of group j see only group j's inputs.
    """

    kind: str
    stored_shape: tuple[int, ...]
    groups: int = 1

    @property
    def out_features(self) -> int:
        if self.kind == "convT":
            return self.stored_shape[1] * self.groups
        return self.stored_shape[1] if self.kind == "kn" else self.stored_shape[0]

    @property
    def in_features(self) -> int:
        if self.kind == "kn":
            return self.stored_shape[0]
        if self.kind == "convT":
            return self.stored_shape[0] // self.groups * int(np.prod(self.stored_shape[2:]))
        return int(np.prod(self.stored_shape[1:]))

    @property
    def nm_group_extent(self) -> int:
        """Length of the run along which N:M groups are laid (must be divisible by M)."""
        if self.kind == "convT":
            return self.stored_shape[0] // self.groups
        return self.stored_shape[1] if self.kind == "conv" else self.in_features

    def to_canonical(self, stored: np.ndarray) -> np.ndarray:
        if self.kind == "kn":
            return stored.T
        if self.kind == "nk":
            return stored
        if self.kind == "convT":  # [g·C_in/g, C_out/g, *k] -> [g, C_out/g, *k, C_in/g]
            inputs, outputs, *kernel = stored.shape
            grouped = stored.reshape(self.groups, inputs // self.groups, outputs, *kernel)
            return np.moveaxis(grouped, 1, -1).reshape(self.out_features, self.in_features)
        channels_last = np.moveaxis(stored, 1, -1)
        return channels_last.reshape(stored.shape[0], -1)

    def from_canonical(self, canonical: np.ndarray) -> np.ndarray:
        if self.kind == "kn":
            return canonical.T
        if self.kind == "nk":
            return canonical
        if self.kind == "convT":
            inputs, outputs, *kernel = self.stored_shape
            grouped = canonical.reshape(self.groups, outputs, *kernel, inputs // self.groups)
            return np.moveaxis(grouped, -1, 1).reshape(self.stored_shape)
        out, channels, *kernel = self.stored_shape
        return np.moveaxis(canonical.reshape(out, *kernel, channels), -1, 1)

    @property
    def is_conv(self) -> bool:
        return self.kind in ("conv", "convT")


@dataclass
class Consumer:
    node: ir.Node
    activation: str  # the tensor X multiplied by the weight


@dataclass
class Target:
    value: ir.Value  # the initializer
    op: str
    layout: Layout
    consumers: list[Consumer]
    via: tuple[str, ...] = ()
    bias: ir.Value | None = None
    block: str | None = None
    block_index: int | None = None
    skip_reason: str | None = None  # cannot be pruned safely
    default_reason: str | None = None  # left alone unless selected with --include

    @property
    def name(self) -> str:
        """The initializer's name: unique, and what reports key on."""
        return self.value.name

    @property
    def node_name(self) -> str:
        return self.consumers[0].node.name or self.name if self.consumers else self.name

    @property
    def stored_dtype(self) -> ir.DataType:
        return self.value.const_value.dtype

    def read(self) -> np.ndarray:
        """The weight as a float32 canonical matrix [out, K] (a fresh, writable array)."""
        stored = self.value.const_value.numpy()
        return np.array(self.layout.to_canonical(stored), dtype=np.float32, order="C")

    def write(self, canonical: np.ndarray) -> None:
        """Replace the initializer with `canonical`, in the stored layout and dtype."""
        stored = np.ascontiguousarray(self.layout.from_canonical(canonical)).astype(self.stored_dtype.numpy())
        self.value.const_value = ir.Tensor(stored, name=self.name)

    def read_bias(self) -> np.ndarray | None:
        return None if self.bias is None else self.bias.const_value.numpy().astype(np.float32)


def discover_targets(model: ir.Model) -> list[Target]:
    """All weight initializers of MatMul/Gemm/Conv in the main graph, in topological order."""
    graph = model.graph
    order = {node: index for index, node in enumerate(graph)}
    targets = []
    for value in graph.initializers.values():
        tensor = value.const_value
        if tensor is None or tensor.dtype not in FLOAT_TYPES or value.is_graph_output():
            continue
        weight_uses, other_uses = trace_weight_uses(value, transposed=False, via=())
        if not weight_uses:
            continue
        targets.append(_make_target(value, tuple(tensor.shape), weight_uses, other_uses))
    targets.sort(key=lambda t: min(order[c.node] for c in t.consumers))
    assign_blocks(graph, targets)
    _mark_defaults(graph, targets)
    return targets


def select_targets(targets: list[Target], include: str | None = None, exclude: str | None = None) -> list[Target]:
    """The targets a pass will prune: the defaults, or those whose names match --include; minus --exclude."""
    include_re, exclude_re = compile_regex(include, "--include"), compile_regex(exclude, "--exclude")
    chosen = []
    for target in targets:
        if target.skip_reason is not None:
            continue
        names = (target.name, target.node_name)
        if include_re is not None:
            if not any(include_re.search(n) for n in names):
                continue
        elif target.default_reason is not None:
            continue
        if exclude_re is not None and any(exclude_re.search(n) for n in names):
            continue
        chosen.append(target)
    return chosen


def compile_regex(pattern: str | None, option: str) -> re.Pattern | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise UserError(f"{option} {pattern!r} is not a valid regular expression ({exc})") from None


_CONV_KINDS = {"Conv": "conv", "ConvTranspose": "convT"}


@dataclass
class _WeightUse:
    node: ir.Node
    op: str
    layout_kind: str
    via: tuple[str, ...]

    def layout(self, stored_shape: tuple[int, ...]) -> Layout:
        groups = self.node.attributes.get_int("group", 1) if self.op in _CONV_KINDS else 1
        return Layout(self.layout_kind, stored_shape, groups)


def trace_weight_uses(value: ir.Value, transposed: bool, via: tuple[str, ...], rank: int | None = None):
    """Follow a weight through Transpose/Cast to the ops that consume it.

    `rank` is the initializer's: Transpose and Cast keep it, and their outputs often carry no
    shape (graphs without value_info), so it is passed down rather than read from them.
    """
    weight_uses: list[_WeightUse] = []
    other_uses: list[str] = []
    if rank is None and value.shape is not None:
        rank = len(value.shape)
    for use in value.uses():
        node, index = use.node, use.idx
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        if op == "Transpose" and index == 0 and rank == 2 and not node.outputs[0].is_graph_output():
            perm = node.attributes.get_ints("perm", [1, 0])
            flipped = transposed ^ (list(perm) == [1, 0])
            found, others = trace_weight_uses(node.outputs[0], flipped, via + ("Transpose",), rank)
            weight_uses += found
            other_uses += others
        elif op == "Cast" and index == 0 and not node.outputs[0].is_graph_output():
            found, others = trace_weight_uses(node.outputs[0], transposed, via + ("Cast",), rank)
            weight_uses += found
            other_uses += others
        elif op == "MatMul" and index == 1 and rank == 2:
            weight_uses.append(_WeightUse(node, op, "nk" if transposed else "kn", via))
        elif op == "Gemm" and index == 1 and rank == 2:
            trans_b = bool(node.attributes.get_int("transB", 0))
            weight_uses.append(_WeightUse(node, op, "nk" if transposed ^ trans_b else "kn", via))
        elif op in _CONV_KINDS and index == 1 and not transposed and rank is not None and rank >= 3:
            weight_uses.append(_WeightUse(node, op, _CONV_KINDS[op], via))
        else:
            other_uses.append(f"{op} {node.name}".strip())
    return weight_uses, other_uses


def _make_target(value: ir.Value, shape: tuple[int, ...], uses: list[_WeightUse], others: list[str]) -> Target:
    first = uses[0]
    target = Target(
        value=value,
        op=first.op,
        layout=first.layout(shape),
        consumers=[Consumer(u.node, u.node.inputs[0].name) for u in uses],
        via=first.via,
    )
    if others:
        target.skip_reason = f"also used by {others[0]}; pruning it would change that node too"
    elif any((u.op, u.layout_kind) != (first.op, first.layout_kind) for u in uses):
        target.skip_reason = "shared by nodes that read it in different orientations"
    if len(uses) == 1:
        target.bias = _find_bias(first.node, target.layout.out_features)
    return target


def _find_bias(node: ir.Node, out_features: int) -> ir.Value | None:
    """Gemm's C / Conv's B, or the initializer added right after a MatMul."""
    candidates = []
    if node.op_type in ("Gemm", *_CONV_KINDS) and len(node.inputs) > 2:
        candidates.append(node.inputs[2])
    elif node.op_type == "MatMul":
        uses = node.outputs[0].uses()
        if len(uses) == 1 and uses[0].node.op_type == "Add":
            candidates += [v for v in uses[0].node.inputs if v is not node.outputs[0]]
    for value in candidates:
        tensor = value.const_value if value is not None else None
        # A bias another node also reads must not be rewritten by passes that compensate biases.
        if tensor is not None and value.is_initializer() and tuple(tensor.shape) == (out_features,) \
                and len(value.uses()) == 1:
            return value
    return None


def _mark_defaults(graph: ir.Graph, targets: list[Target]) -> None:
    """Leave embeddings, LM heads/classifiers and tiny layers alone by default, like the references."""
    in_blocks = any(t.block is not None for t in targets)
    heads = _head_targets(graph, targets)
    for target in targets:
        if target.layout.in_features < TINY_K:
            target.default_reason = f"tiny layer (K={target.layout.in_features} < {TINY_K})"
        elif in_blocks and target.block is None:
            target.default_reason = "outside the repeated blocks (LM head, pooler, classifier)"
        elif not in_blocks and id(target) in heads:
            target.default_reason = "output head (feeds a graph output directly)"


def _head_targets(graph: ir.Graph, targets: list[Target]) -> set[int]:
    """Targets whose output reaches a graph output without passing through another target."""
    owner = {c.node: t for t in targets for c in t.consumers}
    heads, seen = set(), set()
    stack = [v.producer() for v in graph.outputs if v.producer() is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in owner:
            heads.add(id(owner[node]))
            continue
        stack += [v.producer() for v in node.inputs if v is not None and v.producer() is not None]
    return heads


def add_bias(target: Target, values: np.ndarray) -> None:
    """Give a target without bias one: Gemm's C, Conv's B, or an Add right after a MatMul.

    Only for a weight read by one node; the new initializer takes the dtype the node computes in.
    """
    if target.bias is not None or len(target.consumers) != 1:
        raise ValueError(f"{target.node_name}: a bias can be added only to a single-use weight without one")
    node = target.consumers[0].node
    graph = node.graph
    dtype = node.inputs[0].dtype or target.stored_dtype
    name = f"{target.name}.added_bias"
    if node.op_type == "Gemm":
        values = values / node.attributes.get_float("beta", 1.0)  # Gemm adds beta·C
    bias = ir.Value(name=name, const_value=ir.Tensor(values.astype(dtype.numpy()), name=name))
    graph.register_initializer(bias)
    if node.op_type in ("Gemm", *_CONV_KINDS):
        if len(node.inputs) < 3:
            node.resize_inputs(3)
        node.replace_input_with(2, bias)
    else:
        product = node.outputs[0]
        users = [(use.node, use.idx) for use in product.uses()]
        add = ir.Node("", "Add", [product, bias], num_outputs=1, name=f"{node.name}/AddedBias")
        for user, index in users:
            user.replace_input_with(index, add.outputs[0])
        if product.is_graph_output():  # the graph output keeps its name
            position = list(graph.outputs).index(product)
            add.outputs[0].name, product.name = product.name, f"{product.name}/before_bias"
            graph.outputs[position] = add.outputs[0]
        else:
            add.outputs[0].name = f"{product.name}/biased"
        graph.insert_after(node, add)
    target.bias = bias
