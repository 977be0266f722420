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

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import helper

from onnxprune.boundary_cache import BoundaryCache
from onnxprune.errors import UserError, first_line
from onnxprune.progress import BlockProgress
from onnxprune.blocks import attribute_subgraphs
from onnxprune.statistics import Accumulator, Uncalibrated, activation_rows
from onnxprune.targets import Consumer, Target

Sample = dict[str, np.ndarray]
PruneGroup = Callable[[list[Target], dict[str, dict]], None]


@dataclass
class Segment:
    nodes: list[ir.Node]
    targets: list[Target]
    inputs: list[str] = field(default_factory=list)  # fed: graph inputs or cached boundary tensors
    activations: dict[tuple[str, ...], Consumer] = field(default_factory=dict)  # statistics per Consumer.stat_key
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
    last = lambda group: max(position[c.main_node] for t in group for c in t.consumers)  # noqa: E731
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
                segment.activations.setdefault(consumer.stat_key, consumer)
                for name in consumer.activations if consumer.branch is None else ():
                    if name not in produced and name not in segment.inputs:
                        segment.inputs.append(name)
    for index, segment in enumerate(segments):
        later = {name for s in segments[index + 1:] for name in s.inputs}
        segment.boundary = [v.name for n in segment.nodes for v in n.outputs if v.name in later]
    return segments


def calibrate(model: ir.Model, groups: list[list[Target]], samples: list[Sample], needs: frozenset[str],
              prune_group: PruneGroup | None = None, providers: list[str] | None = None) -> dict[str, dict]:
    """Statistics per target name. With `prune_group`, each group is pruned (by that callback)
    before the next group's statistics are gathered (sequential mode), and its statistics are
    dropped once pruned (kept, SparseGPT's K×K Grams would grow with the model): returns {}."""
    if not samples:
        raise UserError("no calibration samples")
    segments = plan_segments(model.graph, groups)
    cache = BoundaryCache(len(samples))
    all_stats: dict[str, dict] = {}
    progress = BlockProgress(len(segments))
    try:
        for index in range(len(segments)):
            start = time.perf_counter()
            segment = segments[index]
            stats = _segment_statistics(model, segment, _Feeds(segment, cache, samples), needs, providers)
            pruned_at = time.perf_counter()
            if prune_group is None:
                all_stats.update(stats)
            else:
                nodes_before = len(model.graph)
                prune_group(segment.targets, stats)
                if len(model.graph) != nodes_before:  # a pass added nodes (a new bias): cut the graph anew
                    segments = plan_segments(model.graph, groups)
                    segment = segments[index]
            del stats  # not needed by the boundary run below
            prune_s = time.perf_counter() - pruned_at
            if segment.boundary:  # the next segments' inputs, computed through the pruned weights
                feeds = _Feeds(segment, cache, samples)
                session = _session(model, segment, segment.boundary, next(iter(feeds)), providers)
                for sample, feed in enumerate(feeds):
                    for name, value in zip(segment.boundary, _run(session, segment.boundary, feed, segment)):
                        cache.put(name, sample, value)
                del session  # its copy of the block's weights goes now, not at the next block
            cache.keep_only({name for s in segments[index + 1:] for name in s.inputs})
            progress.step(time.perf_counter() - start - prune_s, prune_s)
    finally:
        progress.close()
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
    """Statistics per target; a target whose input cannot be turned into rows gets
    {"refused": reason} instead, and is left dense by the pipeline."""
    wanted = list(dict.fromkeys(name for c in segment.activations.values() for name in c.fetched
                                if name not in segment.inputs))
    session = _session(model, segment, wanted, next(iter(feeds)), providers) if wanted else None
    accumulators = {key: Accumulator(needs) for key in segment.activations}
    refused: dict[tuple, str] = {}
    for sample in feeds:
        produced = dict(zip(wanted, _run(session, wanted, sample, segment))) if session else {}
        for key, consumer in segment.activations.items():
            if key in refused:
                continue
            arrays = [produced[name] if name in produced else sample[name] for name in consumer.fetched]
            if consumer.branch is not None and arrays[0].size == 0:
                continue  # this sample took the If's other branch
            try:
                accumulators[key].add(activation_rows(arrays, consumer))
            except Uncalibrated as reason:
                refused[key] = f"not calibrated: {reason}"
    stats, shared = {}, {}
    for target in segment.targets:
        keys = tuple(dict.fromkeys(c.stat_key for c in target.consumers))
        reasons = [refused[key] for key in keys if key in refused]
        if reasons:
            stats[target.name] = {"refused": reasons[0]}
            continue
        if keys not in shared:  # targets reading the same input share one statistics dict
            pooled = accumulators[keys[0]]
            for key in keys[1:]:
                pooled = pooled.merged(accumulators[key])
            shared[keys] = pooled.as_dict() if pooled.tokens else {"refused": _NO_ROWS}
        stats[target.name] = shared[keys]
    return stats


_NO_ROWS = ("not calibrated: no activation rows reached this weight (it is in an If branch no sample took, or a "
            "recurrent R that only ever started from a zero state: give samples that carry the previous call's state)")


def _session(model: ir.Model, segment: Segment, outputs: list[str], example: Sample, providers):
    proto, weights = _segment_model(model, segment, outputs, example)
    options = _session_options()
    # Weights go to onnxruntime as views of their arrays (memory maps of the input's external data,
    # or the pruned tensors in memory), never serialized: onnxruntime copies only this segment's.
    values = [_ort_value(t) for t in weights.values()]
    options.add_external_initializers(list(weights), values)
    base_dir = _external_base_dir(model)
    if base_dir:  # external tensors inside subgraphs stay references, resolved beside the model
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", base_dir)
    try:
        session = ort.InferenceSession(proto.SerializeToString(), options,
                                       providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:
        if "NOT_IMPLEMENTED" in str(exc) and any(t.stored_dtype == ir.DataType.BFLOAT16 for t in segment.targets):
            # onnxruntime's CPU provider has no bfloat16 MatMul/Gemm/Add kernels (1.32).
            raise UserError(f"onnxruntime ({', '.join(providers or ['CPUExecutionProvider'])}) has no bfloat16 kernel "
                            f"for this model ({first_line(exc)}); calibrated methods must run it: prune it with a "
                            "data-free method (-m magnitude), or on --device cuda with onnxruntime-gpu, or convert "
                            "it to float16 first") from None
        raise UserError(f"onnxruntime cannot run the calibration segment ending at "
                        f"{segment.targets[-1].node_name}: {first_line(exc)}") from None
    session.weights = values  # the arrays onnxruntime was given stay alive as long as the session
    return session


def _session_options() -> ort.SessionOptions:
    """One intra-op pool of OMP_NUM_THREADS threads (onnxruntime's default when unset), which
    sleep instead of spinning between runs: the Python work between runs (statistics, pruning)
    needs those cores."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _run(session, outputs: list[str], feeds: Sample, segment: Segment) -> list[np.ndarray]:
    try:
        return session.run(outputs, feeds)
    except Exception as exc:
        raise UserError(f"onnxruntime failed in the calibration segment ending at "
                        f"{segment.targets[-1].node_name}: {first_line(exc)}") from None


# Initializers at least this large reach onnxruntime as external initializers (no serialization).
_INLINE_MAX_BYTES = 1024


def _segment_model(model: ir.Model, segment: Segment, outputs: list[str],
                   example: Sample) -> tuple[onnx.ModelProto, dict[str, ir.TensorProtocol]]:
    """The segment as a model, and the initializers it leaves to `add_external_initializers`:
    their protos are placeholders marked external, so no weight bytes enter the protobuf."""
    initializers, weights = [], {}
    for name, value in _consumed(segment.nodes).items():
        if not value.is_initializer() or value.const_value is None:
            continue
        tensor = value.const_value
        if _passable(tensor) and (isinstance(tensor, ir.ExternalTensor) or tensor.nbytes >= _INLINE_MAX_BYTES):
            weights[name] = tensor
            proto = onnx.TensorProto(name=name, data_type=tensor.dtype.value, dims=tensor.shape.numpy(),
                                     data_location=onnx.TensorProto.EXTERNAL)
            proto.external_data.add(key="location", value="onnxprune-in-memory")
        else:
            proto = ir.serde.serialize_tensor(tensor)
            proto.name = name
        initializers.append(proto)
    inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(example[name].dtype), None)
              for name in segment.inputs]
    exposed = _branch_exposures(segment, outputs)
    nodes = [_exposing(ir.serde.serialize_node(n), exposed.get(n, [])) for n in segment.nodes]
    graph = helper.make_graph(nodes, "segment", inputs,
                              [helper.make_empty_tensor_value_info(name) for name in outputs], initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid(domain, version)
                                                    for domain, version in model.opset_imports.items()])
    proto.ir_version = model.ir_version
    proto.functions.extend(ir.serde.serialize_function(f) for f in model.functions.values())
    return proto, weights


def _branch_exposures(segment: Segment, outputs: list[str]) -> dict[ir.Node, list[tuple[str, str, str, int]]]:
    """Per If node: the tensors inside its branches that are asked for, as (name in the branch,
    name fetched, branch attribute, element type)."""
    exposed: dict[ir.Node, list[tuple[str, str, str, int]]] = {}
    for target in segment.targets:
        for consumer in target.consumers:
            if consumer.branch is None:
                continue
            entries = exposed.setdefault(consumer.branch[0], [])
            for inner, fetched in zip(consumer.activations, consumer.fetched):
                if fetched not in outputs or any(entry[1] == fetched for entry in entries):
                    continue
                x = next((v for v in (*consumer.node.inputs, *consumer.node.outputs)
                          if v is not None and v.name == inner), None)
                if x is not None and x.dtype is not None:  # integer too (a MatMulInteger's uint8 X)
                    dtype = x.dtype
                else:  # untyped: X has the float weight's type
                    weight = target.value.const_value.dtype
                    dtype = weight if weight.is_floating_point() else ir.DataType.FLOAT
                entries.append((inner, fetched, consumer.branch[1], dtype.value))
    return exposed


def _exposing(node: onnx.NodeProto, entries: list[tuple[str, str, str, int]]) -> onnx.NodeProto:
    """The If node with one more output per tensor asked for: the tensor in its branch, an empty
    tensor of its type in the other (If's branches must have the same outputs)."""
    for inner_name, fetched, branch, elem_type in entries:
        node.output.append(fetched)
        for attribute in node.attribute:
            inner = f"{fetched}/{attribute.name}"
            if attribute.name == branch:
                attribute.g.node.append(helper.make_node("Identity", [inner_name], [inner]))
            else:
                empty = onnx.TensorProto(name=inner, data_type=elem_type, dims=[0])
                attribute.g.node.append(helper.make_node("Constant", [], [inner], value=empty))
            attribute.g.output.append(helper.make_tensor_value_info(inner, elem_type, None))
    return node


def _passable(tensor: ir.TensorProtocol) -> bool:
    """Whether the tensor's bytes can be handed over as an array (sub-byte types are packed)."""
    return tensor.dtype.bitwidth in (8, 16, 32, 64) and tensor.dtype != ir.DataType.STRING


def _ort_value(tensor: ir.TensorProtocol) -> ort.OrtValue:
    array = np.ascontiguousarray(tensor.numpy())
    if array.dtype.kind in "biufc":
        return ort.OrtValue.ortvalue_from_numpy(array)
    # ml_dtypes (bfloat16, float8): onnxruntime takes the raw bits with the ONNX type.
    bits = array.view(np.dtype(f"uint{8 * array.dtype.itemsize}"))
    return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, tensor.dtype.value)


def _external_base_dir(model: ir.Model) -> str | None:
    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                return os.path.abspath(value.const_value.base_dir)
    return None


def _consumed(nodes: list[ir.Node]) -> dict[str, ir.Value]:
    """Values the nodes read, including outer-scope values captured by If/Loop/Scan bodies."""
    consumed: dict[str, ir.Value] = {}
    for node in nodes:
        for value in node.inputs:
            if value is not None:
                consumed.setdefault(value.name, value)
        for attribute in node.attributes.values():
            for subgraph in attribute_subgraphs(attribute):
                inner = {v.name for n in ir.traversal.RecursiveGraphIterator(subgraph) for v in n.outputs}
                inner |= {v.name for v in subgraph.inputs} | set(subgraph.initializers)
                for inner_node in ir.traversal.RecursiveGraphIterator(subgraph):
                    for value in inner_node.inputs:
                        if value is not None and value.name not in inner:
                            consumed.setdefault(value.name, value)
    return consumed


def _merge_interleaved(groups: list[list[Target]], position: dict) -> list[list[Target]]:
    """A group whose first weight comes before the previous group's last is merged into it
    (the graph's order interleaves them, so they cannot be pruned one after the other)."""
    merged: list[list[Target]] = []
    for group in groups:
        first = min(position[c.main_node] for t in group for c in t.consumers)
        if merged and first <= max(position[c.main_node] for t in merged[-1] for c in t.consumers):
            merged[-1] = merged[-1] + group
        else:
            merged.append(list(group))
    return merged
