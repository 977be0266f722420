"""`apply`: load → discover → select → prune → save, timing every stage."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxprune import __version__
from onnxprune.allocation import outlier_ratio, owl_sparsities
from onnxprune.calibration import calibrate, group_by_block
from onnxprune.companions import SOURCE_KEY, carry_companions, companion_source
from onnxprune.device import place
from onnxprune.emit import check_target, emit
from onnxprune.errors import UserError
from onnxprune.model_io import (check_output_path, external_data_file, load_model, resolve_model_path,
                                save_model)
from onnxprune.passes import Layer, NotApplicable, Pruned, PruningPass, available, get_pass, takes_option
from onnxprune.patterns import Pattern, nm_valid, sparsity_of
from onnxprune.progress import progress_bar
from onnxprune.report import Report, TargetRecord
from onnxprune.samples import (CalibrationOptions, calibration_record, calibration_samples, samples_record,
                               stats_file_record)
from onnxprune.spilled import replacement, spilling_beside
from onnxprune.stats_file import load_stats, save_stats
from onnxprune.statistics import STAT_KEYS, per_row, statistics_width
from onnxprune.targets import FLOAT_TYPES, Discovery, Target, add_bias, discover, select_targets, untouched_weights
from onnxprune.validate import (check_options, check_samples, check_statistics, check_weights_finite,
                                check_writable, constant_warning)


@dataclass
class PruneOptions:
    method: str
    pattern: Pattern
    include: str | None = None
    exclude: str | None = None
    strict: bool = False  # N:M: a layer that cannot hold the pattern is an error, not left dense
    seed: int = 0
    external_data: bool | None = None
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    allocation: str = "uniform"  # or "owl"
    data_free: bool = False  # methods that offer it choose their mask without activation statistics
    add_bias: bool = False  # let bias-compensating methods add a bias where a layer has none
    target: str = "dense"  # hardware emitter: dense | compressed | tensorrt | cpu (onnxprune.emit)
    kinds: tuple[str, ...] | None = None  # structured: which channel groups (ffn, heads, conv); None: all
    device: str = "auto"  # auto | cpu | cuda: solver passes in torch on the GPU, calibration on ORT's CUDA EP


class StageTimer:
    """Wall time per stage. A stage opened inside another counts only for itself: the outer stage
    gets its own time (calibrate excludes the data loading and pruning it triggers), so the stages
    add up to the total."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._inner: list[float] = []  # time spent in nested stages, per open stage

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            own = elapsed - self._inner.pop()
            self.seconds[name] = round(self.seconds.get(name, 0.0) + own, 6)
            if self._inner:
                self._inner[-1] += elapsed

    def totals(self) -> dict[str, float]:
        return {**self.seconds, "total": round(sum(self.seconds.values()), 6)}


def apply(model_path: str | Path, output_path: str | Path, options: PruneOptions) -> Report:
    """Prune the model at `model_path` into `output_path`; the input file is never modified."""
    output = check_output_path(model_path, output_path)
    check_writable(output, external_data_file(output))
    timer = StageTimer()
    with timer.stage("load"):
        model = load_model(model_path)
    with spilling_beside(output):  # pruned weights of an external-data model wait on disk for the save
        report = prune_model(model, options, CalibrationSource(model_path, model, options.calibration, timer), timer)
        report.input = str(resolve_model_path(model_path))
        save_pruned(model, report, output, options.external_data)
    return report


def prune_model(model: ir.Model, options: PruneOptions, samples: CalibrationSource | None = None,
                timer: StageTimer | None = None) -> Report:
    """Prune `model` in place (the one implementation behind `apply` and `onnxprune.prune`);
    `samples` supplies calibration data or precomputed statistics when the method needs them."""
    timer = timer or StageTimer()
    samples = samples or CalibrationSource(None, model, options.calibration, timer)
    method_needs = getattr(available().get(options.method), "needs", ())
    solves = takes_option(options.method, "device")  # the other methods compute in numpy
    placement = place(options.device, solves=solves, calibrates=bool(method_needs) or options.allocation == "owl")
    samples.providers = list(placement.providers)
    note = check_target(options.target, options.pattern, options.pattern.structured)
    if options.pattern.structured:  # whole channels out: a smaller dense graph (onnxprune.structured)
        from onnxprune.structured import prune_structured

        report = prune_structured(model, options, samples, timer)
    else:
        report = _prune_weights(model, options, samples, timer, placement.device if solves else "cpu")
        report.notes += [note] if note else []
    report.notes += [placement.note] if placement.note else []
    report.calibration = samples.record()
    stamp_provenance(model, report.method, report.pattern, report.sparsity, **report.provenance())
    report.timings_s = timer.totals()
    return report


def save_pruned(model: ir.Model, report, output: str | Path, external_data: bool | None = None) -> Path:
    """The saving step of `apply` (and of `PruneResult.save`): atomic, its time added to the report's;
    the input's tokenizer and config files are copied beside the output (onnxprune.companions)."""
    start = time.perf_counter()
    source = companion_source(report.input if Path(report.input).is_file() else None,
                              report.calibration.get("tokenizer"))
    if source is not None:
        model.metadata_props[SOURCE_KEY] = str(source)
    path = save_model(model, output, external_data)
    report.companions = carry_companions(source, path.parent)
    seconds = {stage: value for stage, value in report.timings_s.items() if stage != "total"}
    seconds["save"] = round(seconds.get("save", 0.0) + time.perf_counter() - start, 6)
    report.output, report.timings_s = str(path), {**seconds, "total": round(sum(seconds.values()), 6)}
    return path


def _prune_weights(model: ir.Model, options: PruneOptions, samples: CalibrationSource, timer: StageTimer,
                   device: str = "cpu") -> Report:
    method = get_pass(options.method, **({"data_free": True} if options.data_free else {}),
                      **({"device": device} if device != "cpu" else {}))
    check_options(options, method.name, method.needs, method.takes_new_bias)
    with timer.stage("discover"):
        discovery = discover(model)
        selected = select_targets(discovery.targets, options.include, options.exclude)
        if not selected:
            raise UserError(_nothing_selected_message(samples.model_path or "the model", discovery))
        selected, skipped = split_nm_incompatible(selected, options.pattern, options.strict)
        check_weights_finite(selected)
        nm_skipped = len(skipped)
        if method.needs or options.allocation == "owl":
            selected, refused = split_uncalibrated(selected)
            skipped += refused
    report = Report(__version__, "", "", method.name, options.pattern.label, options.pattern.sparsity, options.seed,
                    skipped=skipped, untouched=untouched_weights(discovery, options.include, options.exclude))
    if nm_skipped:
        report.notes.append(f"{nm_skipped} layer(s) cannot hold {options.pattern.label} and stay dense "
                            f"(e.g. {skipped[0]['node']}: {skipped[0]['reason']}); --strict makes this an error")
    report.notes += untouched_notes(report.untouched)
    patterns = None
    if options.allocation == "owl":
        with timer.stage("allocate"):
            report.allocation = owl_allocation(model, selected, options, samples)
        patterns = {t.name: Pattern(report.allocation[_block_key(t)]) for t in selected}
    constant: list[str] = []  # layers whose calibration activations are the same for every token

    def prune(group: list[Target], stats: dict[str, dict] | None = None) -> list[TargetRecord]:
        if stats is not None:
            constant.extend(check_statistics(group, stats, method.name))
        with timer.stage("prune"):
            return prune_targets(group, method, options.pattern, options.seed, stats, seed_index[id(group[0])],
                                 patterns, report.skipped, options.add_bias)

    seed_index = {id(t): index for index, t in enumerate(selected)}
    if method.needs:
        report.targets = _calibrate_and_prune(model, selected, method.needs, options.calibration, timer, samples,
                                              prune)
    else:
        report.targets = prune(selected)
    if not report.targets:
        raise UserError(f"{method.name} is not applicable to any selected layer: {report.skipped[0]['reason']}")
    report.notes += constant_warning(constant, method.name)
    with timer.stage("emit"):
        pruned = {record.name for record in report.targets}
        report.emit = emit(model, options.target, [t for t in selected if t.name in pruned])
    return report


class CalibrationSource:
    """Calibration samples or statistics, loaded once and only if something asks: from the
    options' source (a data set, a file) or given in memory (`samples`, `stats`)."""

    def __init__(self, model_path, model: ir.Model, calib: CalibrationOptions, timer: StageTimer,
                 samples: list[dict[str, np.ndarray]] | None = None, stats: dict[str, dict] | None = None,
                 stats_record: dict | None = None, record: dict | None = None) -> None:
        self.model_path, self.model, self.calib, self.timer = model_path, model, calib, timer
        self._samples, self._stats, self._stats_record = samples, stats, stats_record
        self._used: dict | None = record  # samples drawn elsewhere from a known source (recipes)
        self.providers: list[str] | None = None  # onnxruntime's, for calibration (onnxprune.device)

    def samples(self) -> list[dict[str, np.ndarray]]:
        if self._samples is None:
            with self.timer.stage("load_data"):
                self._samples = calibration_samples(self.model_path, input_names(self.model), self.calib)
                check_samples(self.model, self._samples, self.calib.source)
            self._used = calibration_record(self.calib, nsamples=len(self._samples))
        elif self._used is None:
            check_samples(self.model, self._samples, "the calibration samples")
            self._used = samples_record(self._samples, self.calib)
        return self._samples

    def stats_file(self) -> dict[str, dict] | None:
        """Precomputed (one-shot) statistics: `--stats FILE` or a `Statistics` object; None if neither."""
        if self._stats is None and self.calib.stats_file:
            with self.timer.stage("load_stats"):
                self._stats, metadata = load_stats(self.calib.stats_file)
            self._stats_record = {**stats_file_record(self.calib.stats_file), "computed_from": metadata}
        if self._stats is not None:
            self._used = self._stats_record or {"statistics": "in memory"}
        return self._stats

    def record(self) -> dict:
        """What calibration data this run used and its hash (empty when it used none)."""
        return self._used or {}


def owl_allocation(model: ir.Model, targets: list[Target], options: PruneOptions, samples: CalibrationSource) -> dict[str, float]:
    """OWL's per-block sparsity from dense-model Wanda scores."""
    if options.pattern.is_nm:
        raise UserError("--allocation owl sets a sparsity per block; it needs unstructured --sparsity, not N:M")
    stats = samples.stats_file() or calibrate(model, [targets], samples.samples(), frozenset({"sq_sum"}),
                                                 providers=samples.providers)
    check_statistics(targets, stats, "owl")
    scores: dict[str, list[np.ndarray]] = {}
    for target in targets:
        entry = stats.get(target.name, {})
        if "refused" in entry:
            continue  # left dense later, with the reason
        if "sq_sum" not in entry:
            raise UserError(f"{options.calibration.stats_file or 'the statistics'} lacks sq_sum for {target.node_name}")
        weight = np.abs(target.read())
        scores.setdefault(_block_key(target), []).append(weight * np.sqrt(per_row(entry, "sq_sum", len(weight))))
    return owl_sparsities({block: outlier_ratio(s) for block, s in scores.items()}, options.pattern.sparsity)


def _block_key(target: Target) -> str:
    return target.block if target.block is not None else target.name


def _calibrate_and_prune(model: ir.Model, targets: list[Target], needs: frozenset[str], calib: CalibrationOptions,
                         timer: StageTimer, samples: CalibrationSource,
                         prune: Callable[..., list[TargetRecord]]) -> list[TargetRecord]:
    """Statistics from a file, or gathered in onnxruntime (sequentially by default), then `prune`."""
    stats = samples.stats_file()
    if stats is not None:
        for target in targets:
            entry = stats.get(target.name, {})
            if "refused" in entry:
                continue
            missing = needs - set(entry)
            if missing:
                raise UserError(f"{calib.stats_file or 'the statistics'} lacks {', '.join(sorted(missing))} for {target.node_name}; "
                                f"recompute it with `onnxprune calibrate` for this model")
            widths = {statistics_width(entry, key) for key in needs if np.ndim(entry[key])}
            if widths - {target.layout.in_features}:
                raise UserError(f"{calib.stats_file or 'the statistics'} has statistics of K={widths.pop()} for {target.node_name}, "
                                f"whose weight has K={target.layout.in_features}: it was computed for another model")
        return prune(targets, stats)
    records: list[TargetRecord] = []
    groups = group_by_block(targets) if calib.sequential else [targets]
    with timer.stage("calibrate"):  # its load_data and prune stages are timed apart
        calibrate(model, groups, samples.samples(), needs | {"sum"},  # sum: to tell constant activations
                  lambda group, stats: records.extend(prune(group, stats)), providers=samples.providers)
    return records


def calibrate_to_file(model_path, output, calib: CalibrationOptions, include: str | None, exclude: str | None,
                      method_name: str | None) -> dict:
    """One-shot statistics of the selected targets, saved for `apply --stats`."""
    start = time.perf_counter()
    model = load_model(model_path)
    source = CalibrationSource(model_path, model, calib, StageTimer())
    stats = calibrate_model(model, source, include, exclude, method_name)
    save_stats(output, stats, {"model": str(resolve_model_path(model_path)), **source.record(),
                               "onnxprune_version": __version__})
    refused = {name: entry["refused"] for name, entry in stats.items() if "refused" in entry}
    return {"targets": len(stats) - len(refused), "refused": refused, "samples": len(source.samples()),
            "seconds": time.perf_counter() - start}


def calibrate_model(model: ir.Model, samples: CalibrationSource, include: str | None, exclude: str | None,
                    method_name: str | None) -> dict[str, dict]:
    """One-shot statistics of the selected targets of the dense `model` (what `method_name` needs, or all)."""
    needs = get_pass(method_name).needs if method_name else STAT_KEYS
    if not needs:
        raise UserError(f"method {method_name!r} needs no calibration")
    discovery = discover(model)
    targets = select_targets(discovery.targets, include, exclude)
    if not targets:
        raise UserError(_nothing_selected_message(samples.model_path or "the model", discovery))
    targets, _ = split_uncalibrated(targets)
    return calibrate(model, [targets], samples.samples(), frozenset(needs), providers=samples.providers)


def split_uncalibrated(targets: list[Target]) -> tuple[list[Target], list[dict]]:
    """Calibrated methods leave alone, layer by layer, the weights whose activations cannot be
    captured (the reason goes to the report); only when none is left is it an error."""
    kept = [t for t in targets if t.calibration_reason is None]
    skipped = [{"name": t.name, "node": t.node_name, "reason": f"calibration: {t.calibration_reason}"}
               for t in targets if t.calibration_reason is not None]
    if not kept:
        raise UserError(f"no selected layer can be calibrated: {skipped[0]['node']}: {skipped[0]['reason']}"
                        + (f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else "")
                        + "; data-free methods (magnitude, ...) can prune them")
    return kept, skipped


def untouched_notes(untouched: list[dict]) -> list[str]:
    """One line per reason: how many weights (and parameters) were left untouched for it."""
    by_reason: dict[str, list[dict]] = {}
    for record in untouched:
        by_reason.setdefault(record["reason"], []).append(record)
    return [f"left untouched: {len(records)} weight{'s' * (len(records) > 1)} "
            f"({sum(r['params'] for r in records):,} parameters): {reason}"
            for reason, records in sorted(by_reason.items(), key=lambda item: -len(item[1]))]


def split_nm_incompatible(targets: list[Target], pattern: Pattern, strict: bool) -> tuple[list[Target], list[dict]]:
    """N:M needs the grouped axis divisible by M. Layers that are not (a CNN's stem with 3 input
    channels, a depthwise conv) stay dense and are listed; with `strict`, the first is an error."""
    if not pattern.is_nm:
        return targets, []
    kept, skipped = [], []
    for target in targets:
        extent = target.layout.nm_group_extent
        if extent % pattern.m == 0:
            kept.append(target)
            continue
        axis = "input channels" if target.layout.is_conv else "K"
        reason = f"{axis}={extent} is not divisible by M={pattern.m}"
        if strict:
            raise UserError(f"{target.node_name}: {reason}; without --strict such layers are left dense")
        skipped.append({"name": target.name, "node": target.node_name, "reason": reason})
    if not kept:
        raise UserError(f"no selected layer can take {pattern.label}: {skipped[0]['node']}: {skipped[0]['reason']}"
                        + (f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""))
    return kept, skipped


def prune_targets(targets: list[Target], method: PruningPass, pattern: Pattern, seed: int,
                  stats: dict[str, dict] | None = None, first_index: int = 0,
                  patterns: dict[str, Pattern] | None = None, skipped: list[dict] | None = None,
                  add_bias: bool = False) -> list[TargetRecord]:
    """Run `method` on each target (with its own pattern from `patterns`, if given); layers the
    method cannot handle go to `skipped` with the reason. `first_index` keeps per-target seeds
    stable across groups."""
    records = []
    for index, target in enumerate(progress_bar(targets, f"{method.name} {pattern.label}"), start=first_index):
        own_stats = stats.get(target.name) if stats else None
        if own_stats is not None and "refused" in own_stats:
            if skipped is None:
                raise UserError(f"{target.node_name}: {own_stats['refused']}")
            skipped.append({"name": target.name, "node": target.node_name, "reason": own_stats["refused"]})
            continue
        layer = Layer(target.name, target.read(), target.read_bias(), np.random.default_rng([seed, index]), own_stats,
                      allow_new_bias=add_bias and target.can_take_bias)
        own_pattern = patterns[target.name] if patterns else pattern
        try:
            pruned = method.prune(layer, own_pattern)  # a grouped conv's groups in one call
        except NotApplicable as reason:
            if skipped is None:
                raise
            skipped.append({"name": target.name, "node": target.node_name, "reason": f"not applicable: {reason}"})
            continue
        target.write(pruned.weight)
        if pruned.bias is not None:
            _write_bias(target, pruned.bias)
        # Integer codes re-round the kept weights too (a tiny one may become zero): count what is stored.
        stored = pruned.weight if target.stored_dtype in FLOAT_TYPES else target.read()
        records.append(record_of(target, stored, own_pattern, bias_changed=pruned.bias is not None))
    return records


def record_of(target: Target, canonical: np.ndarray, pattern: Pattern | None, bias_changed: bool = False) -> TargetRecord:
    return TargetRecord(
        name=target.name, node=target.node_name, op=target.op, shape=list(target.stored_shape),
        block=target.block, params=int(canonical.size), zeros=int((canonical == 0).sum()),
        sparsity=sparsity_of(canonical),
        nm_valid=nm_valid(canonical, pattern.n, pattern.m) if pattern is not None and pattern.is_nm else None,
        bias_changed=bias_changed,
    )


def _write_bias(target: Target, bias: np.ndarray) -> None:
    if target.bias is None:
        add_bias(target, bias)
        return
    dtype = target.bias.const_value.dtype.numpy()
    target.bias.const_value = replacement(target.bias.const_value, ir.Tensor(bias.astype(dtype), name=target.bias.name))


def stamp_provenance(model: ir.Model, method: str, pattern: str, sparsity: float, **extra: object) -> None:
    """Record in the model's metadata_props what made it (onnxprune.version, .method, .pattern, ...)."""
    model.metadata_props.update({f"onnxprune.{key}": str(value) for key, value in {
        "version": __version__, "method": method, "pattern": pattern, "sparsity": f"{sparsity:g}", **extra}.items()})



def input_names(model: ir.Model) -> list[str]:
    return [v.name for v in model.graph.inputs if not v.is_initializer()]


def _nothing_selected_message(model_path, discovery: Discovery) -> str:
    targets = discovery.targets
    if not targets and discovery.untouched:
        reasons = sorted({u["reason"] for u in discovery.untouched})
        return (f"no prunable weights in {model_path}: {len(discovery.untouched)} weights found, all in forms that "
                f"cannot be pruned ({'; '.join(reasons)[:200]})")
    if not targets:
        return (f"no prunable weights found in {model_path} (no MatMul/Gemm/Conv/Einsum/recurrent/Attention "
                f"weight stored as a constant)")
    reasons = sorted({t.skip_reason or t.default_reason for t in targets if t.skip_reason or t.default_reason})
    return (f"no prunable weights selected in {model_path}: {len(targets)} candidates all left out "
            f"({'; '.join(reasons)[:200]}); use --include REGEX to choose layers")
