"""Finding prunable weights (targets) in any ONNX graph.

A target is a constant tensor — an initializer or a `Constant` node's value, in the main graph or
inside If/Loop/Scan bodies — that reaches the weight operand of one of the ops in
`weight_ops.RULES` (MatMul, Gemm, Conv, Einsum, LSTM, fused Attention, ...) through a chain of
pass-through ops (`weight_chain.PASS_THROUGH`: Identity, Cast, Transpose, Reshape, DequantizeLinear,
...). Passes never see the graph: they get the weight as a canonical matrix `W[out, K]` (one row per
output neuron, K the reduction axis), which the chain and the rule's `Layout` map to and from the
stored tensor. Weights found in a form nothing can prune are kept in `Discovery.untouched` with the
reason, so reports list them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxprune.blocks import assign_blocks, attribute_subgraphs, node_positions
from onnxprune.defaults import mark_defaults
from onnxprune.errors import UserError
from onnxprune.layout import Layout
from onnxprune.spilled import replacement
from onnxprune.weight_chain import Step, constant_nodes_to_initializers, op_name, step_for
from onnxprune.weight_ops import Consumer, WeightRule, rule_for

FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
_SLICEABLE_STEPS = {"Identity", "Cast", "Transpose"}  # steps structured pruning can slice through

__all__ = ["Consumer", "Discovery", "Layout", "Target", "discover", "discover_targets", "select_targets"]


@dataclass
class Target:
    value: ir.Value  # the stored tensor, an initializer (Constant-node weights are turned into ones)
    op: str
    layout: Layout  # of the operand as the consuming node reads it
    consumers: list[Consumer]
    rule: WeightRule
    chain: tuple[Step, ...] = ()  # pass-through ops from the stored tensor to the operand
    bias: ir.Value | None = None
    block: str | None = None
    block_index: int | None = None
    skip_reason: str | None = None  # cannot be pruned safely
    default_reason: str | None = None  # left alone unless selected with --include
    calibration_reason: str | None = None  # why calibrated methods must leave it alone

    @property
    def name(self) -> str:
        """The stored tensor's name: unique, and what reports key on."""
        return self.value.name

    @property
    def node_name(self) -> str:
        return self.consumers[0].node.name or self.name if self.consumers else self.name

    @property
    def via(self) -> tuple[str, ...]:
        return tuple(step.op for step in self.chain)

    @property
    def stored_shape(self) -> tuple[int, ...]:
        return tuple(self.value.const_value.shape)

    @property
    def stored_dtype(self) -> ir.DataType:
        return self.value.const_value.dtype

    def read(self) -> np.ndarray:
        """The weight as a float32 canonical matrix [out, K] (a fresh, writable array)."""
        operand = self.value.const_value.numpy()
        for step in self.chain:
            operand = step.forward(operand)
        return np.array(self.layout.to_canonical(operand), dtype=np.float32, order="C")

    def write(self, canonical: np.ndarray) -> None:
        """Store `canonical` back in the tensor, through the chain backwards: in its own layout and
        dtype (quantized codes re-quantized on their scale and zero point)."""
        stored = self.layout.from_canonical(canonical)
        for step in reversed(self.chain):
            stored = step.inverse(stored)
        stored = np.ascontiguousarray(stored).astype(self.stored_dtype.numpy())
        self.value.const_value = replacement(self.value.const_value, ir.Tensor(stored, name=self.name))

    def read_bias(self) -> np.ndarray | None:
        return None if self.bias is None else self.bias.const_value.numpy().astype(np.float32)

    @property
    def can_take_bias(self) -> bool:
        """Whether `add_bias` can give this weight's node a bias (it has none, and one node reads it)."""
        if self.bias is not None or len(self.consumers) != 1:
            return False
        node = self.consumers[0].node
        if self.rule.bias_input is not None:
            return len(node.inputs) <= self.rule.bias_input or node.inputs[self.rule.bias_input] is None
        return self.rule.bias_after

    @property
    def structured_reason(self) -> str | None:
        """Why structured pruning cannot slice this weight's stored tensor (None: it can)."""
        if (self.rule.op, self.rule.weight_input) not in (("MatMul", 1), ("Gemm", 1), ("Conv", 1),
                                                          ("ConvTranspose", 1)):
            return f"{self.rule.op} weight (input {self.rule.weight_input}) is pruned per weight only"
        if any(step.op not in _SLICEABLE_STEPS for step in self.chain):
            return f"weight reaches {self.node_name} through {'+'.join(self.via)}"
        if any(c.node.graph is not self.value.graph for c in self.consumers):
            return "read inside a subgraph"
        return None

    def stored_axis(self, operand_axis: int) -> int:
        """The stored tensor's axis that becomes `operand_axis` through the chain's Transposes."""
        axis = operand_axis % len(self.layout.shape)
        for step in reversed(self.chain):
            if step.op == "Transpose":
                axis = step.key[1][axis]
        return axis


@dataclass
class Discovery:
    targets: list[Target]
    untouched: list[dict] = field(default_factory=list)  # weights found in an unsupported form: name, node, op, reason


def discover_targets(model: ir.Model) -> list[Target]:
    """All prunable weights, in topological order (see `discover`)."""
    return discover(model).targets


def discover(model: ir.Model) -> Discovery:
    """Every weight of every graph (subgraphs included): the targets, and the weights left untouched
    with the reason. `Constant`-node weights become initializers of the same name (in the graph that
    holds them), so they are stored back as initializers, once each."""
    graph = model.graph
    positions, owners = node_positions(graph)
    targets, untouched = [], []
    for value, shape, dtype in _stored_tensors(graph):
        uses, others = _trace(value, shape, dtype, ())
        if not uses:
            continue
        candidate = _make_target(value, shape, uses, others, owners)
        if isinstance(candidate, dict):
            untouched.append(candidate)
        else:
            targets.append(candidate)
    for target in targets:
        if target.value.producer() is not None and target.skip_reason is None:
            (target.value,) = constant_nodes_to_initializers([target.value.producer()]).values()
    targets.sort(key=lambda t: min(positions[c.node] for c in t.consumers))
    mark_defaults(graph, targets, named_blocks=assign_blocks(graph, targets))
    return Discovery(targets, untouched)


def _stored_tensors(graph: ir.Graph):
    """(value, shape, numpy dtype) of every initializer and tensor-valued Constant node, in every graph."""
    graphs = [graph, *graph.subgraphs()]
    for holder in graphs:
        for value in holder.initializers.values():
            if value.const_value is not None and value.const_value.shape.rank():
                yield value, tuple(value.const_value.shape), value.const_value.dtype.numpy()
    for node in ir.traversal.RecursiveGraphIterator(graph):
        attribute = node.attributes.get("value")
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and attribute is not None \
                and attribute.type == ir.AttributeType.TENSOR and attribute.value.shape.rank():
            tensor = attribute.value
            yield node.outputs[0], tuple(tensor.shape), tensor.dtype.numpy()


@dataclass
class _Use:
    node: ir.Node
    rule: WeightRule
    chain: tuple[Step, ...]
    layout: Layout | None
    reason: str | None = None  # the form is not supported


def _trace(value: ir.Value, shape: tuple[int, ...], dtype, chain: tuple[Step, ...]) -> tuple[list[_Use], list[str]]:
    """Follow a stored tensor through pass-through ops to the ops that multiply it."""
    uses: list[_Use] = []
    others: list[str] = ["a graph output"] if value.is_graph_output() else []
    followed: set[ir.Node] = set()
    for use in value.uses():
        node, index = use.node, use.idx
        rule = rule_for(node, index)
        if rule is not None:
            uses.append(_weight_use(node, rule, shape, np.dtype(dtype), chain))
            continue
        step = step_for(node, index, shape, dtype)
        if step is None:
            others.append(f"{op_name(node)} {node.name}".strip())
            continue
        if step.node in followed:  # a Concat of Slices reads the tensor once per Slice
            continue
        followed.add(step.node)
        found, more = _trace(step.node.outputs[0], step.shape, step.dtype, chain + (step,))
        uses += found
        others += more
    return uses, others


def _weight_use(node: ir.Node, rule: WeightRule, shape, dtype: np.dtype, chain: tuple[Step, ...]) -> _Use:
    if rule.operand_step is not None:
        step = rule.operand_step(node, shape, dtype)
        if isinstance(step, str):
            return _Use(node, rule, chain, None, step)
        chain, shape, dtype = chain + (step,), step.shape, step.dtype
    layout = rule.layout(node, shape)
    if isinstance(layout, str):
        return _Use(node, rule, chain, None, layout)
    if ir.DataType.from_numpy(np.dtype(dtype)) not in FLOAT_TYPES:  # by ONNX type: ml_dtypes' bfloat16 is not np.floating
        return _Use(node, rule, chain, None, f"{np.dtype(dtype).name} operand of {op_name(node)}")
    return _Use(node, rule, chain, layout)


def _make_target(value: ir.Value, shape, uses: list[_Use], others: list[str],
                 owners: dict[ir.Graph, ir.Node]) -> Target | dict:
    first = uses[0]
    refused = next((u for u in uses if u.reason is not None), None)
    if refused is not None:
        return {"name": value.name, "node": refused.node.name or value.name, "op": refused.rule.op,
                "shape": list(shape), "reason": refused.reason}
    consumers, calibration_reason = [], None
    for use in uses:
        activation = use.rule.activation(use.node, use.layout)
        branch, outside = _branch_of(use.node, owners)
        calibration_reason = calibration_reason or outside
        if isinstance(activation, str):
            calibration_reason = calibration_reason or activation
            consumers.append(Consumer(use.node))
        else:
            consumers.append(Consumer(use.node, tuple(v.name for v in activation.values), activation.form,
                                      activation.rows, branch))
    target = Target(value=value, op=first.rule.op, layout=first.layout, consumers=consumers, rule=first.rule,
                    chain=first.chain, calibration_reason=calibration_reason)
    signature = lambda use: (use.rule, use.layout, tuple(step.key for step in use.chain))  # noqa: E731
    if others:
        target.skip_reason = f"also used by {others[0]}; pruning it would change that node too"
    elif any(signature(u) != signature(first) for u in uses):
        target.skip_reason = "shared by nodes that read it in different orientations"
    if len(uses) == 1:
        target.bias = _find_bias(first.node, first.rule, target.layout.out_features)
    return target


def _branch_of(node: ir.Node, owners: dict[ir.Graph, ir.Node]) -> tuple[tuple[ir.Node, str] | None, str | None]:
    """(the main-graph If and branch holding `node`, None) — or (None, why calibration cannot reach it)."""
    if node.graph not in owners:
        return None, None
    owner = owners[node.graph]
    if owner.op_type != "If" or owner.graph in owners:
        return None, (f"read inside a subgraph (a body of {owner.op_type} {owner.name}): calibration reaches "
                      "the main graph and the branches of its If nodes only")
    (branch,) = [name for name, attribute in owner.attributes.items() if node.graph in attribute_subgraphs(attribute)]
    return (owner, branch), None


def _find_bias(node: ir.Node, rule: WeightRule, out_features: int) -> ir.Value | None:
    """The node's own bias operand, or the constant added right after it; a Constant-node bias is
    turned into an initializer like the weights."""
    candidates = []
    if rule.bias_input is not None and len(node.inputs) > rule.bias_input:
        candidates.append(node.inputs[rule.bias_input])
    elif rule.bias_after:
        uses = node.outputs[0].uses()
        if len(uses) == 1 and uses[0].node.op_type == "Add":
            candidates += [v for v in uses[0].node.inputs if v is not node.outputs[0]]
    for value in candidates:
        # A bias another node also reads must not be rewritten by passes that compensate biases.
        if value is None or len(value.uses()) != 1 or value.is_graph_output():
            continue
        producer = value.producer()
        if producer is not None and producer.op_type == "Constant" and not producer.inputs \
                and producer.attributes.get("value") is not None:
            (value,) = constant_nodes_to_initializers([producer]).values()
        tensor = value.const_value
        if tensor is not None and value.is_initializer() and tuple(tensor.shape) == (out_features,):
            return value
    return None


def select_targets(targets: list[Target], include: str | None = None, exclude: str | None = None) -> list[Target]:
    """The targets a pass will prune: the defaults, or those whose names match --include; minus --exclude."""
    include_re, exclude_re = compile_regex(include, "--include"), compile_regex(exclude, "--exclude")
    return [t for t in targets if _left_out_because(t, include_re, exclude_re) is None]


def untouched_weights(discovery: Discovery, include: str | None = None, exclude: str | None = None) -> list[dict]:
    """Every weight found that `select_targets` leaves alone, and why: {name, node, op, params, reason}."""
    include_re, exclude_re = compile_regex(include, "--include"), compile_regex(exclude, "--exclude")
    records = []
    for target in discovery.targets:
        reason = _left_out_because(target, include_re, exclude_re)
        if reason is not None:
            records.append({"name": target.name, "node": target.node_name, "op": target.op,
                            "params": target.layout.out_features * target.layout.in_features, "reason": reason})
    return records + [{**u, "params": int(np.prod(u["shape"]))} for u in discovery.untouched]


def _left_out_because(target: Target, include_re: re.Pattern | None, exclude_re: re.Pattern | None) -> str | None:
    if target.skip_reason is not None:
        return target.skip_reason
    names = (target.name, target.node_name)
    if include_re is not None:
        if not any(include_re.search(n) for n in names):
            return "not matched by --include"
    elif target.default_reason is not None:
        return f"not selected by default: {target.default_reason}"
    if exclude_re is not None and any(exclude_re.search(n) for n in names):
        return "excluded by --exclude"
    return None


def compile_regex(pattern: str | None, option: str) -> re.Pattern | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise UserError(f"{option} {pattern!r} is not a valid regular expression ({exc})") from None


def add_bias(target: Target, values: np.ndarray) -> None:
    """Give a target without bias one: the node's bias operand (Gemm's C, Conv's B), or an Add right after it (MatMul).

    Only for a weight read by one node; the new initializer takes the dtype the node computes in.
    """
    if not target.can_take_bias:
        raise ValueError(f"{target.node_name}: a bias can be added only to a single-use weight without one")
    node = target.consumers[0].node
    graph = node.graph
    dtype = node.inputs[0].dtype or target.stored_dtype
    name = f"{target.name}.added_bias"
    if node.op_type == "Gemm":
        values = values / node.attributes.get_float("beta", 1.0)  # Gemm adds beta·C
    bias = ir.Value(name=name, const_value=ir.Tensor(values.astype(dtype.numpy()), name=name))
    graph.register_initializer(bias)
    slot = target.rule.bias_input
    if slot is not None:
        if len(node.inputs) <= slot:
            node.resize_inputs(slot + 1)
        node.replace_input_with(slot, bias)
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
