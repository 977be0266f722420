"""Calibration in onnxruntime: activation statistics per target, block by block.

The graph is cut after the last weight of each group of targets (a block). Each cut piece
(segment) becomes its own small ONNX model, fed with the boundary tensors the earlier segments
left in a cache. Sequential mode, as in the Wanda and SparseGPT references: gather a block's
statistics, prune it, re-run its segment with the pruned weights to produce the next block's
inputs. Each segment runs twice per sample, so the whole job costs about two forward passes,
not one per block per prefix. One-shot mode is the same with a single group (dense statistics).
Memory: the boundary tensors of all samples (as the references keep `inps`/`outs`) plus one
sample's activations and the statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import helper

from onnxprune.boundary_cache import BoundaryCache
from onnxprune.errors import UserError, first_line
from onnxprune.progress import progress_bar
from onnxprune.statistics import Accumulator, activation_rows
from onnxprune.targets import Consumer, Target

Sample = dict[str, np.ndarray]
PruneGroup = Callable[[list[Target], dict[str, dict]], None]


@dataclass
class Segment:
    nodes: list[ir.Node]
    targets: list[Target]
    inputs: list[str] = field(default_factory=list)  # fed: graph inputs or cached boundary tensors
    activations: dict[str, Consumer] = field(default_factory=dict)  # statistics gathered on these
    boundary: list[str] = field(default_factory=list)  # produced here, read by later segments


def group_by_block(targets: list[Target]) -> list[list[Target]]:
    """Sequential order: one group per block; a target outside any block is a group of its own."""
    groups: dict[object, list[Target]] = {}
    for target in targets:
        key = target.block if target.block is not None else ("single", target.name)
        groups.setdefault(key, []).append(target)
    return list(groups.values())


def plan_segments(graph: ir.Graph, groups: list[list[Target]]) -> list[Segment]:
    nodes = list(graph)
    position = {node: index for index, node in enumerate(nodes)}
    last = lambda group: max(position[c.node] for t in group for c in t.consumers)  # noqa: E731
    groups = _merge_interleaved(sorted(groups, key=last), position)
    segments, start = [], 0
    for group in groups:
        end = last(group) + 1
        segments.append(Segment(nodes[start:end], group))
        start = end
    for segment in segments:
        produced = {v.name for n in segment.nodes for v in n.outputs}
        constants = {}
        for name, value in _consumed(segment.nodes).items():
            if name in produced or value.is_initializer():
                continue
            producer = value.producer()
            if producer is not None and producer.op_type == "Constant" and not producer.inputs:
                constants[producer] = None  # cheaper to repeat a Constant than to cache it
            else:
                segment.inputs.append(name)
        segment.nodes = list(constants) + segment.nodes
        for target in segment.targets:
            for consumer in target.consumers:
                segment.activations.setdefault(consumer.activation, consumer)
                if consumer.activation not in produced and consumer.activation not in segment.inputs:
                    segment.inputs.append(consumer.activation)
    for index, segment in enumerate(segments):
        later = {name for s in segments[index + 1:] for name in s.inputs}
        segment.boundary = [v.name for n in segment.nodes for v in n.outputs if v.name in later]
    return segments


def calibrate(model: ir.Model, groups: list[list[Target]], samples: list[Sample], needs: frozenset[str],
              prune_group: PruneGroup | None = None, providers: list[str] | None = None) -> dict[str, dict]:
    """Statistics per target name. With `prune_group`, each group is pruned (by that callback)
    before the next group's statistics are gathered: sequential mode."""
    if not samples:
        raise UserError("no calibration samples")
    segments = plan_segments(model.graph, groups)
    cache = BoundaryCache(len(samples))
    all_stats: dict[str, dict] = {}
    try:
        for index in progress_bar(range(len(segments)), "calibrating blocks"):
            segment = segments[index]
            stats = _segment_statistics(model, segment, _Feeds(segment, cache, samples), needs, providers)
            all_stats.update(stats)
            if prune_group is not None:
                nodes_before = len(model.graph)
                prune_group(segment.targets, stats)
                if len(model.graph) != nodes_before:  # a pass added nodes (a new bias): cut the graph anew
                    segments = plan_segments(model.graph, groups)
                    segment = segments[index]
            if segment.boundary:  # the next segments' inputs, computed through the pruned weights
                feeds = _Feeds(segment, cache, samples)
                session = _session(model, segment, segment.boundary, next(iter(feeds)), providers)
                for sample, feed in enumerate(feeds):
                    for name, value in zip(segment.boundary, _run(session, segment.boundary, feed, segment)):
                        cache.put(name, sample, value)
            cache.keep_only({name for s in segments[index + 1:] for name in s.inputs})
    finally:
        cache.close()
    return all_stats


class _Feeds:
    """Each sample's feed dict for a segment, built when asked (the cache may be on disk)."""

    def __init__(self, segment: Segment, cache: BoundaryCache, samples: list[Sample]) -> None:
        self.segment, self.cache, self.samples = segment, cache, samples

    def __iter__(self):
        for i in range(len(self.samples)):
            yield {name: self.cache.get(name, i) if name in self.cache else self.samples[i][name]
                   for name in self.segment.inputs}


def _segment_statistics(model, segment: Segment, feeds: _Feeds, needs, providers) -> dict[str, dict]:
    wanted = [name for name in segment.activations if name not in segment.inputs]
    session = _session(model, segment, wanted, next(iter(feeds)), providers) if wanted else None
    accumulators = {name: Accumulator(needs) for name in segment.activations}
    for sample in feeds:
        produced = dict(zip(wanted, _run(session, wanted, sample, segment))) if session else {}
        for name, consumer in segment.activations.items():
            x = produced[name] if name in produced else sample[name]
            accumulators[name].add(activation_rows(x, consumer))
    stats, shared = {}, {}
    for target in segment.targets:
        inputs = tuple(dict.fromkeys(c.activation for c in target.consumers))
        if inputs not in shared:  # targets reading the same input share one statistics dict
            pooled = accumulators[inputs[0]]
            for name in inputs[1:]:
                pooled = pooled.merged(accumulators[name])
            shared[inputs] = pooled.as_dict()
        stats[target.name] = shared[inputs]
    return stats


def _session(model: ir.Model, segment: Segment, outputs: list[str], example: Sample, providers):
    proto = _segment_model(model, segment, outputs, example)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(proto.SerializeToString(), options,
                                    providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:
        raise UserError(f"onnxruntime cannot run the calibration segment ending at "
                        f"{segment.targets[-1].node_name}: {first_line(exc)}") from None


def _run(session, outputs: list[str], feeds: Sample, segment: Segment) -> list[np.ndarray]:
    try:
        return session.run(outputs, feeds)
    except Exception as exc:
        raise UserError(f"onnxruntime failed in the calibration segment ending at "
                        f"{segment.targets[-1].node_name}: {first_line(exc)}") from None


def _segment_model(model: ir.Model, segment: Segment, outputs: list[str], example: Sample) -> onnx.ModelProto:
    initializers = {}
    for name, value in _consumed(segment.nodes).items():
        if value.is_initializer() and value.const_value is not None:
            tensor = ir.serde.serialize_tensor(value.const_value)
            tensor.name = name
            initializers[name] = tensor
    inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(example[name].dtype), None)
              for name in segment.inputs]
    graph = helper.make_graph([ir.serde.serialize_node(n) for n in segment.nodes], "segment", inputs,
                              [helper.make_empty_tensor_value_info(name) for name in outputs],
                              list(initializers.values()))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid(domain, version)
                                                    for domain, version in model.opset_imports.items()])
    proto.ir_version = model.ir_version
    proto.functions.extend(ir.serde.serialize_function(f) for f in model.functions.values())
    return proto


def _consumed(nodes: list[ir.Node]) -> dict[str, ir.Value]:
    """Values the nodes read, including outer-scope values captured by If/Loop/Scan bodies."""
    consumed: dict[str, ir.Value] = {}
    for node in nodes:
        for value in node.inputs:
            if value is not None:
                consumed.setdefault(value.name, value)
        for attribute in node.attributes.values():
            for subgraph in _subgraphs(attribute):
                inner = {v.name for n in ir.traversal.RecursiveGraphIterator(subgraph) for v in n.outputs}
                inner |= {v.name for v in subgraph.inputs} | set(subgraph.initializers)
                for inner_node in ir.traversal.RecursiveGraphIterator(subgraph):
                    for value in inner_node.inputs:
                        if value is not None and value.name not in inner:
                            consumed.setdefault(value.name, value)
    return consumed


def _subgraphs(attribute) -> list[ir.Graph]:
    if attribute.type == ir.AttributeType.GRAPH:
        return [attribute.value]
    if attribute.type == ir.AttributeType.GRAPHS:
        return list(attribute.value)
    return []


def _merge_interleaved(groups: list[list[Target]], position: dict) -> list[list[Target]]:
    """A group whose first weight comes before the previous group's last is merged into it
    (the graph's order interleaves them, so they cannot be pruned one after the other)."""
    merged: list[list[Target]] = []
    for group in groups:
        first = min(position[c.node] for t in group for c in t.consumers)
        if merged and first <= max(position[c.node] for t in merged[-1] for c in t.consumers):
            merged[-1] = merged[-1] + group
        else:
            merged.append(list(group))
    return merged
