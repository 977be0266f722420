"""Grouping targets into the model's repeated blocks.

Exported transformers name their nodes after the module path (`/model/layers.3/...`,
`/decoder/layers.3/...`, `/transformer/h.3/...`, `/encoder/layer.3/...`). When names say nothing,
blocks are the stretches of the graph between residual joins (an Add whose two inputs are a tensor
and something computed from it).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import onnx_ir as ir

if TYPE_CHECKING:
    from onnxprune.targets import Target

_BLOCK_NAME = re.compile(r"^(.*?(?:^|[/.])(?:layers|layer|h|blocks|block|blk)[._]\d+)(?=[/._]|$)")


def block_from_name(name: str) -> str | None:
    """'/model/layers.3/mlp/up_proj/MatMul' -> 'model.layers.3'."""
    match = _BLOCK_NAME.match(name or "")
    if not match:
        return None
    return match.group(1).replace("/", ".").strip(".")


def node_positions(graph: ir.Graph) -> tuple[dict[ir.Node, int], dict[ir.Graph, ir.Node]]:
    """Execution order of every node, subgraph nodes included (a body's nodes come right after
    the If/Loop/Scan that holds them), and the node that holds each subgraph."""
    positions: dict[ir.Node, int] = {}
    owners: dict[ir.Graph, ir.Node] = {}

    def visit(current: ir.Graph) -> None:
        for node in current:
            positions[node] = len(positions)
            for attribute in node.attributes.values():
                for body in attribute_subgraphs(attribute):
                    owners[body] = node
                    visit(body)

    visit(graph)
    return positions, owners


def attribute_subgraphs(attribute) -> list[ir.Graph]:
    """The bodies an attribute holds (If's branches, Loop's and Scan's body)."""
    if attribute.type == ir.AttributeType.GRAPH:
        return [attribute.value]
    if attribute.type == ir.AttributeType.GRAPHS:
        return list(attribute.value)
    return []


def assign_blocks(graph: ir.Graph, targets: list[Target]) -> bool:
    """Set `block` and `block_index` (execution order) on every target; True when the blocks
    come from the exporter's names (a transformer), False when from topology or absent."""
    for target in targets:
        target.block = block_from_name(target.node_name) or block_from_name(target.name)
    named = any(t.block for t in targets)
    if not named:
        _assign_by_residual_joins(graph, targets)
    _assign_fused_nodes(targets)
    order, _ = node_positions(graph)
    first_seen: dict[str, int] = {}
    for target in targets:
        if target.block is not None:
            position = min(order[c.node] for c in target.consumers)
            first_seen[target.block] = min(first_seen.get(target.block, position), position)
    rank = {block: index for index, block in enumerate(sorted(first_seen, key=first_seen.get))}
    for target in targets:
        target.block_index = rank.get(target.block)
    return named


def _assign_fused_nodes(targets: list[Target]) -> None:
    """Nodes that graph optimizers fuse lose the exporter's module path (onnxruntime's fused
    `Attention_0`): such a node belongs to the block of the next weight in execution order
    (`targets` are sorted), as a block's attention comes before the rest of the block."""
    following = None
    for target in reversed(targets):
        if target.block is None and following is not None and "/" not in target.node_name:
            target.block = following
        following = target.block if target.block is not None else following


def _assign_by_residual_joins(graph: ir.Graph, targets: list[Target]) -> None:
    order, _ = node_positions(graph)
    joins = [order[node] for node in graph if node.op_type == "Add" and _is_residual_join(node, order)]
    if not joins:
        return
    for target in targets:
        position = min(order[c.node] for c in target.consumers)
        segment = sum(1 for join in joins if join < position)
        if segment < len(joins):  # after the last join comes the head, not a block
            target.block = f"segment.{segment}"


def _is_residual_join(add: ir.Node, order: dict[ir.Node, int]) -> bool:
    producers = [v.producer() if v is not None else None for v in add.inputs]
    if len(producers) != 2 or None in producers or producers[0] is producers[1]:
        return False
    early, late = sorted(producers, key=order.get)
    return _depends_on(late, early, order)


def _depends_on(node: ir.Node, ancestor: ir.Node, order: dict[ir.Node, int]) -> bool:
    """Whether `node` is computed from `ancestor`; the search stops at nodes older than it."""
    limit, stack, seen = order[ancestor], [node], set()
    while stack:
        current = stack.pop()
        if current is ancestor:
            return True
        if current in seen or order.get(current, -1) < limit:
            continue
        seen.add(current)
        stack += [v.producer() for v in current.inputs if v is not None and v.producer() is not None]
    return False
