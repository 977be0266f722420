"""Structured pruning: remove whole channel units and write a smaller *dense* graph.

`channels.ChannelGraph` finds the groups (FFN neurons, attention heads or KV groups, conv filters
with their residual partners); here each selected group gets a score per unit, loses the ⌊U·s⌋
lowest units (at least one unit is always kept), and every place the group names is shrunk: the
producers' output rows, the consumers' input columns, per-channel constants, the Reshape/Expand
sizes and depthwise `group` attributes. The result is checked by re-running shape inference:
a group whose tensors do not come out with the planned shapes is put back and reported as refused.

Channel scores (the structured meaning of the method names; the per-weight passes of the same
names live in `passes/`):
- `l1`: the L1 norm of every weight the unit carries: producer rows + consumer columns.
- `wanda`: structured Wanda, Σ over the unit's consumer columns j of ‖X_j‖₂ · Σ_i |W_ij|, with
  ‖X_j‖ from the consumer's calibration statistics ("sq_sum").
- `mama`: the Wanda scores, then the move: the removed units' mean contribution goes into the
  consumer's bias, b += W[:, P] μ_P with μ = sum / tokens of the consumer input. A consumer without
  a bias gets one only when asked (`add_bias`): for MatMul an Add node with a new initializer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import onnx_ir as ir

from onnxprune import __version__
from onnxprune.channels import (CONVS, ChannelGraph, ChannelGroup, SplitSizes, WeightSlice, const_tensor,
                                removed_at, static_shapes)
from onnxprune.defaults import STEM, TINY_K
from onnxprune.errors import UserError
from onnxprune.report import markdown_table
from onnxprune.samples import calibration_metadata
from onnxprune.spilled import replacement
from onnxprune.targets import FLOAT_TYPES, Target, discover_targets
from onnxprune.targets import add_bias as give_bias
from onnxprune.targets import compile_regex

KINDS = ("ffn", "heads", "conv")
METHOD_NEEDS = {  # structured method -> calibration statistics of the consumers' inputs it needs
    "l1": frozenset(),
    "wanda": frozenset({"sq_sum"}),
    "mama": frozenset({"sq_sum", "sum", "tokens"}),
}


ALIASES = {"magnitude": "l1"}  # the CLI's default method: by weight magnitude, i.e. the channels' L1 norm


def structured_method(method: str) -> str:
    method = ALIASES.get(method, method)
    if method not in METHOD_NEEDS:
        raise UserError(f"structured pruning supports --method {', '.join(METHOD_NEEDS)}; got {method!r}")
    return method


# ------------------------------------------------------------------------------------ records


@dataclass
class GroupRecord:
    kind: str
    unit: str  # neurons, heads, kv-groups, channels
    producers: list[str]
    consumers: list[str]
    units_before: int
    units_after: int
    channels_before: int  # output rows of the first producer
    channels_after: int
    heads_before: int | None = None
    heads_after: int | None = None
    removed: list[int] = field(default_factory=list)  # unit indices
    bias_moved: bool | None = None  # mama: whether the removed mean went into the consumers' biases
    reason: str | None = None  # refused: why


@dataclass
class StructuredReport:
    onnxprune_version: str
    input: str
    output: str
    method: str
    sparsity: float
    pattern: str = "structured"
    seed: int = 0
    groups: list[GroupRecord] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    timings_s: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # advice for the user (none yet for this path)
    calibration: dict = field(default_factory=dict)  # the data used and its hash (samples.calibration_record)
    companions: list[str] = field(default_factory=list)  # tokenizer / config files copied beside the output

    @property
    def pruned(self) -> list[GroupRecord]:
        return [g for g in self.groups if g.reason is None]

    @property
    def refused(self) -> list[GroupRecord]:
        return [g for g in self.groups if g.reason is not None]

    @property
    def totals(self) -> dict:
        return {"groups": len(self.pruned), "refused": len(self.refused),
                "units_before": sum(g.units_before for g in self.pruned),
                "units_after": sum(g.units_after for g in self.pruned),
                "params_before": self.params_before, "params_after": self.params_after,
                "params_removed": self.params_before - self.params_after}

    def to_dict(self) -> dict:
        data = asdict(self)
        data["totals"] = self.totals
        return data

    def provenance(self) -> dict:
        """Extra metadata_props entries for the output model (beyond method, pattern, sparsity)."""
        return {"groups": len(self.pruned), **calibration_metadata(self.calibration)}

    def summary(self) -> str:
        totals = self.totals
        return (f"structured {self.method} at {self.sparsity:g}: pruned {totals['groups']} channel groups "
                f"({totals['units_before']} -> {totals['units_after']} units), {totals['refused']} refused; "
                f"parameters {self.params_before:,} -> {self.params_after:,}")

    def markdown(self) -> str:
        lines = [f"# onnxprune report: structured {self.method}, sparsity {self.sparsity:g}", "",
                 f"- input: `{self.input}`", f"- output: `{self.output}`", f"- {self.summary()}",
                 "- wall time (s): " + ", ".join(f"{k} {v:.3f}" for k, v in self.timings_s.items()), "",
                 markdown_table(["kind", "producers", "consumers", "units", "channels", "heads", "bias moved"],
                                [[g.kind, ", ".join(g.producers), ", ".join(g.consumers),
                                  f"{g.units_before} -> {g.units_after} {g.unit}",
                                  f"{g.channels_before} -> {g.channels_after}",
                                  "-" if g.heads_before is None else f"{g.heads_before} -> {g.heads_after}",
                                  "-" if g.bias_moved is None else ("yes" if g.bias_moved else "no")]
                                 for g in self.pruned])]
        if self.refused:
            lines += ["", "## Refused groups", "",
                      markdown_table(["kind", "producers", "reason"],
                                     [[g.kind, ", ".join(g.producers), g.reason] for g in self.refused])]
        return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ planning


class StructuredPlan:
    """The selected channel groups of a model, before any change (statistics are gathered for
    `consumers()` between planning and pruning)."""

    def __init__(self, model: ir.Model, kinds=KINDS, include: str | None = None, exclude: str | None = None,
                 targets: list[Target] | None = None) -> None:
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise UserError(f"unknown structured kinds {sorted(unknown)}; choose from {', '.join(KINDS)}")
        self.model = model
        self.targets = discover_targets(model) if targets is None else targets
        self.analysis = ChannelGraph(model, self.targets)
        include_re, exclude_re = compile_regex(include, "--include"), compile_regex(exclude, "--exclude")
        self.groups: list[ChannelGroup] = []
        for group in self.analysis.groups():
            names = [n for w in group.weights for n in (w.target.name, w.target.node_name)]
            if include_re is not None:
                if not any(include_re.search(n) for n in names):
                    continue
            elif not all(_default_producer(w.target) for w in group.producers):
                continue
            if exclude_re is not None and any(exclude_re.search(n) for n in names):
                continue
            if group.kind in kinds or (group.kind == "residual" and not group.prunable):
                self.groups.append(group)

    def consumers(self) -> list[Target]:
        """The consumer layers of the prunable groups: their inputs' statistics drive wanda/mama."""
        seen: dict[int, Target] = {}
        for group in self.groups:
            if group.prunable:
                for weight in group.consumers:
                    seen.setdefault(id(weight.target), weight.target)
        return list(seen.values())

    def prune(self, sparsity: float, method: str = "l1", stats: dict[str, dict] | None = None,
              add_bias: bool = False) -> StructuredReport:
        if not 0.0 <= sparsity < 1.0:
            raise UserError(f"--sparsity must be in [0, 1), got {sparsity:g}")
        method = structured_method(method)
        needs = METHOD_NEEDS[method]
        if needs:
            _check_stats(self.consumers(), stats, needs)
        report = StructuredReport(__version__, "", "", method, sparsity, params_before=count_params(self.model))
        unread = _unread(self.model)
        plans, records = [], {}
        for group in self.groups:
            if group.prunable and not group.consumers:
                group.reasons.append("no consumer layer reads the channels")
            if not group.prunable:
                records[group] = _record(group, None)
                continue
            removed = lowest_units(channel_scores(group, method, stats), sparsity)
            moves = bias_moves(group, removed, stats) if method == "mama" and removed.any() else {}
            plans.append((group, removed, moves))
        applied = _apply_verified(self.model, self.analysis.shapes, [(g, r) for g, r, _ in plans])
        kept_rows = {id(place.target): np.flatnonzero(~gone)
                     for key, (place, gone) in _cuts([(g, r) for g, r, _ in plans if g in applied]).items()
                     if key[0] == "weight" and place.role == "rows"}
        for group, removed, moves in plans:
            if group in applied:
                moved = _apply_moves(self.model, moves, kept_rows, add_bias) if moves else None
                records[group] = _record(group, removed, moved)
            else:
                records[group] = _record(group, None)
        report.groups = [records[group] for group in self.groups]
        _remove_dead(self.model, unread)
        report.params_after = count_params(self.model)
        return report


def structured_prune(model: ir.Model, sparsity: float, method: str = "l1", stats: dict[str, dict] | None = None,
                     kinds=KINDS, include: str | None = None, exclude: str | None = None,
                     add_bias: bool = False) -> StructuredReport:
    """Remove ⌊U·s⌋ units of every selected channel group of `model` (in place)."""
    return StructuredPlan(model, kinds, include, exclude).prune(sparsity, method, stats, add_bias)


def _default_producer(target: Target) -> bool:
    """In the default selection, or left out only for being tiny or the stem (small K does not
    matter when whole output channels go). Shared weights stay in: their groups are listed as refused."""
    return (target.default_reason is None or target.layout.in_features < TINY_K
            or target.default_reason.startswith(STEM))


def _check_stats(consumers: list[Target], stats: dict[str, dict] | None, needs: frozenset[str]) -> None:
    if stats is None:
        raise UserError(f"structured scores need calibration statistics ({', '.join(sorted(needs))}) of the "
                        f"consumer layers' inputs: pass --calib or --stats")
    for target in consumers:
        entry = stats.get(target.name, {})
        missing = needs - set(entry)
        if missing:
            raise UserError(f"statistics lack {', '.join(sorted(missing))} for {target.node_name}")
        if np.shape(entry["sq_sum"])[0] != target.layout.in_features:
            raise UserError(f"statistics of {target.node_name} have K={np.shape(entry['sq_sum'])[0]}, its weight "
                            f"has K={target.layout.in_features}: they were computed for another model")


def count_params(model: ir.Model) -> int:
    return sum(v.const_value.size for v in model.graph.initializers.values()
               if v.const_value is not None and v.const_value.dtype in FLOAT_TYPES)


def _record(group: ChannelGroup, removed: np.ndarray | None, bias_moved: bool | None = None) -> GroupRecord:
    units = group.units
    kept = units - int(removed.sum()) if removed is not None else units
    first = group.producers[0] if group.producers else None
    channels = 0 if first is None else int((first.units_at(units) >= 0).sum())
    gone = 0 if first is None or removed is None else int(first.removed_at(units, removed).sum())
    return GroupRecord(
        kind=group.kind, unit=group.unit_name,
        producers=[w.target.node_name for w in group.producers],
        consumers=[w.target.node_name for w in group.consumers],
        units_before=units, units_after=kept, channels_before=channels, channels_after=channels - gone,
        heads_before=group.heads, heads_after=None if group.heads is None else group.heads // units * kept,
        removed=[] if removed is None else [int(u) for u in np.flatnonzero(removed)],
        bias_moved=bias_moved, reason=None if removed is not None else (group.reason or "not applied"))


# ------------------------------------------------------------------------------------- scoring


def _column_units(weight: WeightSlice, units: int, canonical_k: int) -> np.ndarray:
    """Unit of each canonical input column, -1 for other groups' columns (Conv's and ConvTranspose's
    canonical K is (kh, kw, C): channel = j % C)."""
    channel = np.arange(canonical_k) % weight.size if weight.target.layout.is_conv else np.arange(canonical_k)
    return weight.units_at(units)[channel]


def channel_scores(group: ChannelGroup, method: str, stats: dict[str, dict] | None) -> np.ndarray:
    """One score per unit; the lowest go. A unit a Concat repeats (an SPPF block's pooled copies)
    counts every column it has."""
    scores = np.zeros(group.units, dtype=np.float64)

    def add(at: np.ndarray, values: np.ndarray) -> None:
        np.add.at(scores, at[at >= 0], values[at >= 0])

    for weight in group.weights:
        canonical = np.abs(weight.target.read()).astype(np.float64)
        if weight.role == "rows":
            if method == "l1":
                add(weight.units_at(group.units), canonical.sum(axis=1))
            continue
        columns = canonical.sum(axis=0)
        if method != "l1":
            columns = columns * np.sqrt(np.asarray(stats[weight.target.name]["sq_sum"], dtype=np.float64))
        add(_column_units(weight, group.units, canonical.shape[1]), columns)
    return scores


def lowest_units(scores: np.ndarray, sparsity: float) -> np.ndarray:
    """Mask of the ⌊U·s⌋ lowest-scoring units (stable order on ties), never all of them."""
    count = min(int(len(scores) * sparsity), len(scores) - 1)
    removed = np.zeros(len(scores), dtype=bool)
    removed[np.argsort(scores, kind="stable")[:count]] = True
    return removed


def bias_moves(group: ChannelGroup, removed: np.ndarray, stats: dict[str, dict]) -> dict[int, tuple[Target, np.ndarray]]:
    """MAMA's structured move, per consumer: Δb = W[:, P] μ_P in output space (Gemm: times alpha)."""
    moves = {}
    for weight in group.consumers:
        entry = stats[weight.target.name]
        mean = np.asarray(entry["sum"], dtype=np.float64) / max(int(entry["tokens"]), 1)
        canonical = weight.target.read().astype(np.float64)
        gone = removed_at(_column_units(weight, group.units, canonical.shape[1]), removed)
        delta = canonical[:, gone] @ mean[gone]
        node = weight.target.consumers[0].node
        if node.op_type == "Gemm":
            delta *= node.attributes.get_float("alpha", 1.0)
        moves[id(weight.target)] = (weight.target, delta)
    return moves


# --------------------------------------------------------------------------------------- edits


class _Editor:
    """Graph edits with an undo log, so a group that fails verification can be put back."""

    def __init__(self, model: ir.Model) -> None:
        self.graph = model.graph
        self.undo: list[Callable[[], None]] = []
        self.names = {v.name for n in self.graph for v in n.outputs} | set(self.graph.initializers)

    def fresh_name(self, base: str) -> str:
        index = 0
        while f"{base}.pruned{index or ''}" in self.names:
            index += 1
        name = f"{base}.pruned{index or ''}"
        self.names.add(name)
        return name

    def set_value(self, value: ir.Value, array: np.ndarray) -> None:
        old_tensor, old_shape = value.const_value, value.shape
        value.const_value = replacement(old_tensor, ir.Tensor(np.ascontiguousarray(array), name=value.name))
        value.shape = ir.Shape(array.shape)
        self.undo.append(lambda: (setattr(value, "const_value", old_tensor), setattr(value, "shape", old_shape)))

    def set_input(self, node: ir.Node, index: int, array: np.ndarray, base: str = "bias") -> None:
        """Give input `index` of `node` a new constant value: in place when it is an initializer
        only this node reads, else as a new initializer (shared and Constant/Identity inputs, or
        an absent input, named after `base`)."""
        value = node.inputs[index] if index < len(node.inputs) else None
        if value is not None and value.is_initializer() and value.const_value is not None and len(value.uses()) == 1:
            return self.set_value(value, array)
        name = self.fresh_name(value.name if value is not None and value.name else base)
        array = np.ascontiguousarray(array)
        new = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                       const_value=ir.Tensor(array, name=name))
        self.graph.register_initializer(new)
        if index >= len(node.inputs):
            node.resize_inputs(index + 1)
        node.replace_input_with(index, new)

        def undo() -> None:
            node.replace_input_with(index, value)
            self.graph.initializers.pop(name, None)
        self.undo.append(undo)

    def set_shape(self, value: ir.Value, shape) -> None:
        old = value.shape
        value.shape = shape
        self.undo.append(lambda: setattr(value, "shape", old))

    def set_attribute(self, node: ir.Node, name: str, new: int | list[int] | None) -> None:
        """Set an int or ints attribute; None removes it."""
        old = node.attributes.get(name)

        def put(attr) -> None:
            if attr is None:
                node.attributes.pop(name, None)
            else:
                node.attributes[name] = attr

        put(None if new is None else ir.AttrInt64s(name, new) if isinstance(new, list) else ir.AttrInt64(name, new))
        self.undo.append(lambda: put(old))

    def slice_weight(self, weight: WeightSlice, keep: np.ndarray) -> None:
        target = weight.target
        stored = target.value.const_value.numpy()
        old_layout = target.layout
        self.set_value(target.value, np.take(stored, keep, axis=weight.stored_axis))
        operand_shape = list(old_layout.shape)
        operand_shape[weight.operand_axis] = len(keep)
        target.layout = replace(old_layout, shape=tuple(operand_shape))
        self.undo.append(lambda: setattr(target, "layout", old_layout))
        value = target.value
        for _ in target.via:  # Transpose/Cast outputs between the initializer and the node
            value = value.uses()[0].node.outputs[0]
            self.set_shape(value, None)

    def rollback(self) -> None:
        for undo in reversed(self.undo):
            undo()
        self.undo.clear()


def _cuts(plans: list[tuple[ChannelGroup, np.ndarray]]) -> dict[tuple, tuple]:
    """What the plans remove: {place key: (place, mask of its positions that go)}, in the
    positions of the unpruned model. A place several groups share (a Concat output, the columns of
    its consumers, a Split) is cut once, by all of them."""
    cuts: dict[tuple, tuple] = {}

    def cut(key: tuple, place, gone: np.ndarray) -> None:
        cuts[key] = (place, cuts[key][1] | gone) if key in cuts else (place, gone)

    for group, removed in plans:
        units = group.units
        for w in group.weights:
            cut(("weight", id(w.target), w.stored_axis), w, w.removed_at(units, removed))
        for c in group.constants:
            cut(("constant", id(c.node), c.index, c.axis), c, c.removed_at(units, removed))
        for e in group.entries:
            cut(("entry", id(e.node), e.index, e.element), e, e.removed_at(units, removed))
        for a in group.attributes:
            cut(("attribute", id(a.node), a.name), a, a.removed_at(units, removed))
        for split in group.splits:
            cut(("split", id(split.node)), split, split.removed_at(units, removed))
        for value, axis in group.members.items():
            cut(("member", value.name), (value, axis), axis.removed_at(units, removed))
    return cuts


def _cut_constant(editor: _Editor, const, gone: np.ndarray) -> None:
    array = const_tensor(const.node.inputs[const.index]).numpy()
    editor.set_input(const.node, const.index, np.take(array, np.flatnonzero(~gone), axis=const.axis))


def _cut_entry(editor: _Editor, entry, gone: np.ndarray) -> None:
    array = np.array(const_tensor(entry.node.inputs[entry.index]).numpy(), copy=True)
    array.reshape(-1)[entry.element] = entry.size - int(gone.sum())
    editor.set_input(entry.node, entry.index, array)


def _cut_split(editor: _Editor, split: SplitSizes, gone: np.ndarray) -> None:
    starts = np.cumsum([0, *split.lengths])
    sizes = [length - int(gone[start:start + length].sum()) for start, length in zip(starts, split.lengths)]
    if not split.by_input:
        return editor.set_attribute(split.node, "split", sizes)
    editor.set_input(split.node, 1, np.array(sizes, dtype=np.int64), base=f"{split.node.name}.split")
    if "num_outputs" in split.node.attributes:  # opset 18: sizes and num_outputs exclude each other
        editor.set_attribute(split.node, "num_outputs", None)


_CUTTERS = {  # place kind -> how it loses the masked positions
    "weight": lambda editor, weight, gone: editor.slice_weight(weight, np.flatnonzero(~gone)),
    "constant": _cut_constant,
    "entry": _cut_entry,
    "attribute": lambda editor, attr, gone: editor.set_attribute(attr.node, attr.name, attr.size - int(gone.sum())),
    "split": _cut_split,
    "member": lambda editor, member, gone: editor.set_shape(member[0], None),  # stale: ORT would reject it
}


def _apply_cuts(editor: _Editor, cuts: dict[tuple, tuple]) -> dict[str, tuple[int, int]]:
    """Shrink every place; returns the planned new shapes {value name: (axis, size)}."""
    planned = {}
    for key, (place, gone) in cuts.items():
        _CUTTERS[key[0]](editor, place, gone)
        if key[0] == "member":
            planned[key[1]] = (place[1].axis, place[1].size - int(gone.sum()))
    return planned


def _refuse_clashes(plans: list[tuple[ChannelGroup, np.ndarray]]) -> None:
    """Two groups may share a tensor on disjoint positions (the inputs of a Concat), never a position."""
    claims: dict[str, tuple[int, np.ndarray, ChannelGroup]] = {}
    for group, _ in plans:
        mine = {value.name: (axis.axis, axis.units_at(group.units) >= 0) for value, axis in group.members.items()}
        clash = next((claims[name][2] for name, (axis, held) in mine.items() if name in claims
                      and (claims[name][0] != axis or (claims[name][1] & held).any())), None)
        if clash is not None:
            group.reasons.append(f"overlaps the group of {clash.producers[0].target.node_name}")
            continue
        for name, (axis, held) in mine.items():
            claims[name] = (axis, held | claims[name][1] if name in claims else held, group)


def _apply_verified(model: ir.Model, before: dict, plans: list[tuple[ChannelGroup, np.ndarray]]) -> set:
    """Apply the plans and re-infer the shapes; a group whose tensors do not come out as planned is
    put back and refused. One inference when all is well; on a failure, bisection finds the bad
    groups (a broken group can leave the whole graph unresolvable). Every attempt cuts the groups
    accepted so far and the new batch together from the unpruned model, since groups share places.
    Returns the groups applied."""
    _refuse_clashes(plans)
    active = [(g, r) for g, r in plans if g.prunable and r.any()]
    applied = {g for g, r in plans if g.prunable and not r.any()}
    skip = set(model.graph.initializers)
    accepted: list[tuple[ChannelGroup, np.ndarray]] = []
    held: list[_Editor] = []  # the edits of `accepted`, while the model holds them

    def attempt(batch) -> list[str]:
        for editor in held:
            editor.rollback()
        held.clear()
        editor = _Editor(model)
        planned = _apply_cuts(editor, _cuts(accepted + batch))
        failed = _shape_mismatches(model, before, planned, skip)
        if failed:
            editor.rollback()
        else:
            accepted.extend(batch)
            held.append(editor)
        return failed

    def search(batch) -> None:
        failed = attempt(batch) if batch else []
        if failed and len(batch) == 1:
            batch[0][0].reasons.append(f"shapes after pruning differ from the plan ({', '.join(sorted(failed)[:3])})")
        elif failed:
            search(batch[:len(batch) // 2])
            search(batch[len(batch) // 2:])

    search(active)
    if accepted and not held:
        _apply_cuts(_Editor(model), _cuts(accepted))
    return applied | {group for group, _ in accepted}


def _shape_mismatches(model: ir.Model, before: dict, planned: dict, skip: set[str]) -> list[str]:
    try:
        after = static_shapes(model, getattr(before, "probe", None))
    except Exception as exc:  # noqa: BLE001
        return [f"shape inference failed: {exc}"]
    failed = []
    for name, old in before.items():
        if name in skip or None in old:
            continue
        if name not in after or None in after[name]:  # known before: an unresolvable shape is a failure
            failed.append(name)
            continue
        expected = list(old)
        if name in planned:
            axis, size = planned[name]
            expected[len(expected) + axis] = size
        if tuple(expected) != tuple(after[name]):
            failed.append(name)
    return failed


def _bias_slot(node: ir.Node) -> tuple[ir.Node, int] | None:
    """Where a consumer's bias lives: Gemm C / Conv and ConvTranspose B, or the constant of the Add
    after a MatMul or a bias-less convolution (paddle2onnx writes conv biases so: [1, O, 1, 1])."""
    convolution = node.op_type in CONVS
    if node.op_type == "Gemm" or convolution:
        if len(node.inputs) > 2 and const_tensor(node.inputs[2]) is not None:
            return node, 2
        if not convolution or (len(node.inputs) > 2 and node.inputs[2] is not None):
            return None
    uses = node.outputs[0].uses()
    if len(uses) == 1 and uses[0].node.op_type == "Add":
        add = uses[0].node
        for index, value in enumerate(add.inputs):
            constant = const_tensor(value) if value is not node.outputs[0] else None
            if constant is not None and (not convolution or _per_channel(constant.shape, node)):
                return add, index
    return None


def _per_channel(shape, node: ir.Node) -> bool:
    """Whether a constant of `shape` added to a convolution's output varies only along its channel axis."""
    rank = len(const_tensor(node.inputs[1]).shape)
    padded = (1,) * (rank - len(shape)) + tuple(shape)
    return len(padded) == rank and all(d == 1 for axis, d in enumerate(padded) if axis != 1)


def _apply_moves(model: ir.Model, moves: dict, kept_rows: dict[int, np.ndarray], add_bias: bool) -> bool:
    """Add each consumer's Δb to its bias (creating one if `add_bias`); True if all consumers took
    it. `kept_rows`: the output rows other groups left of each consumer (Δb was computed dense)."""
    editor = _Editor(model)
    all_moved = True
    for key, (target, delta) in moves.items():
        rows = kept_rows.get(key)
        delta = (delta if rows is None else delta[rows]).astype(np.float64)
        node = target.consumers[0].node
        slot = _bias_slot(node)
        if slot is not None:
            holder, index = slot
            if holder.op_type == "Gemm":
                delta = delta / holder.attributes.get_float("beta", 1.0)  # Gemm adds beta·C
            bias = const_tensor(holder.inputs[index]).numpy()
            if bias.size != delta.size:
                all_moved = False
                continue
            editor.set_input(holder, index, (bias.astype(np.float64) + delta.reshape(bias.shape)).astype(bias.dtype))
        elif add_bias and len(target.consumers) == 1:
            give_bias(target, delta)
        else:
            all_moved = False
    return all_moved


def _unread(model: ir.Model) -> tuple[set[ir.Node], set[str]]:
    """Constant/Identity nodes and initializers nothing reads."""
    graph = model.graph
    nodes = {node for node in graph if node.op_type in ("Constant", "Identity")
             and all(not o.uses() and not o.is_graph_output() for o in node.outputs)}
    inputs = set(graph.inputs)
    names = {name for name, value in graph.initializers.items()
             if not value.uses() and not value.is_graph_output() and value not in inputs}
    return nodes, names


def _remove_dead(model: ir.Model, before: tuple[set[ir.Node], set[str]]) -> None:
    """Drop what the edits left unread (replaced constants, deduplicated biases), nothing else."""
    while True:
        nodes, names = _unread(model)
        nodes -= before[0]
        if not nodes:
            break
        model.graph.remove(list(nodes), safe=True)
    for name in names - before[1]:
        model.graph.initializers.pop(name)


# ------------------------------------------------------------------------------------ pipeline


def prune_structured(model: ir.Model, options, samples, timer) -> StructuredReport:
    """`--pattern structured` (through `pipeline.prune_model`): plan, calibrate (one-shot, the
    consumers' inputs) when the method needs statistics, prune `model` in place."""
    from onnxprune.calibration import calibrate
    from onnxprune.validate import check_options, check_statistics, check_weights_finite, constant_warning

    method = structured_method(options.method)
    needs = METHOD_NEEDS[method]
    check_options(options, method, needs, takes_new_bias=method == "mama")
    if options.data_free or options.allocation != "uniform":
        flag = "--data-free" if options.data_free else f"--allocation {options.allocation}"
        raise UserError(f"{flag} is for per-weight pruning; structured {method} would ignore it: drop it")
    with timer.stage("discover"):
        plan = StructuredPlan(model, options.kinds or KINDS, options.include, options.exclude)
    if not any(g.prunable for g in plan.groups):
        reasons = "; ".join(f"{g.kind} {g.producers[0].target.node_name}: {g.reason}" for g in plan.groups[:3])
        raise UserError(f"no prunable channel group in {samples.model_path or 'the model'}"
                        + (f" ({reasons})" if reasons else ""))
    check_weights_finite({id(w.target): w.target for g in plan.groups if g.prunable
                          for w in g.weights}.values())
    stats, constant = None, []
    if needs:
        stats = samples.stats_file()
        if stats is None:
            with timer.stage("calibrate"):  # its load_data stage is timed apart
                stats = calibrate(model, [plan.consumers()], samples.samples(), needs, providers=samples.providers)
        constant = check_statistics(plan.consumers(), stats, method)
    with timer.stage("prune"):
        report = plan.prune(options.pattern.sparsity, method, stats, options.add_bias)
    report.notes += constant_warning(constant, method)
    report.seed = options.seed
    if options.method in ALIASES:
        report.notes.append(f"structured pruning ranks whole channels: -m {options.method} runs as "
                            f"{ALIASES[options.method]} (each channel's weight norm)")
    if not report.pruned:
        raise UserError(f"no channel group could be pruned: {report.refused[0].reason}")
    return report
