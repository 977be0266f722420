"""The Python API: `import onnxprune` and prune, evaluate and save in three lines.

    result = onnxprune.prune("model.onnx", "wanda", 0.5, calib="calib.txt")
    onnxprune.evaluate(result, "test.txt")          # perplexity (or fidelity with reference=)
    result.save("pruned.onnx")

Every function takes a model as a path (a .onnx file or a folder holding model.onnx), an
`onnx.ModelProto`, an `onnx_ir.Model` or the `PruneResult` of an earlier call; none modifies
what it is given (a model in memory is cloned, its tensors shared until a pass replaces them).
The CLI calls the same functions underneath (`pipeline.prune_model`, `pipeline.save_pruned`).
Bad input raises `onnxprune.errors.UserError` with the message the CLI would print.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np
import onnx_ir as ir

from onnxprune import __version__
from onnxprune.errors import UserError
from onnxprune.model_io import check_output_path, load_model, resolve_model_path
from onnxprune.samples import CalibrationOptions

if TYPE_CHECKING:
    import onnx

    from onnxprune.evaluation import PerplexityResult
    from onnxprune.report import Report
    from onnxprune.structured import StructuredReport

ModelLike = Union[str, os.PathLike, "onnx.ModelProto", ir.Model, "PruneResult"]
# Calibration data: a data set name or file (as --calib takes), feed dicts, or token-id / input arrays.
CalibLike = Union[str, os.PathLike, Sequence[Mapping[str, np.ndarray]], Sequence[np.ndarray], np.ndarray,
                  Mapping[str, np.ndarray], None]


@dataclass
class PruneResult:
    """A pruned model in memory and its report (`report.to_dict()` is what `--report` writes)."""

    model: ir.Model
    report: Report | StructuredReport
    source: Path | None = None  # the file the model came from: its tokenizer and external data live beside it

    def to_onnx(self) -> onnx.ModelProto:
        return ir.to_proto(self.model)

    def save(self, path: str | os.PathLike, external_data: bool | None = None,
             report: str | os.PathLike | None = None) -> Path:
        """Write the model atomically (never over its source); `report=` also writes the JSON + Markdown report."""
        from onnxprune.pipeline import save_pruned

        output = check_output_path(self.source, path) if self.source else _onnx_suffix(path)
        saved = save_pruned(self.model, self.report, output, external_data)
        if report is not None:
            from onnxprune.report import write_report

            write_report(self.report, report)
        return saved

    def summary(self) -> str:
        if hasattr(self.report, "summary"):
            return self.report.summary()
        totals, report = self.report.totals, self.report
        return (f"pruned {totals['targets']} weights with {report.method} ({report.pattern}, sparsity "
                f"{report.sparsity:g}): {totals['zeros']:,} of {totals['params']:,} are zero "
                f"({totals['sparsity']:.2%}); {len(report.skipped)} left dense")

    def __repr__(self) -> str:
        return f"PruneResult({self.summary()})"


@dataclass
class Statistics:
    """Activation statistics of a dense model (one-shot), reusable by several `prune(..., stats=)`
    calls; `save` writes the file `onnxprune apply --stats` reads."""

    stats: dict[str, dict]
    record: dict = field(default_factory=dict)  # the calibration data and its hash

    def save(self, path: str | os.PathLike) -> Path:
        from onnxprune.stats_file import save_stats

        return save_stats(path, self.stats, self.record)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Statistics:
        from onnxprune.samples import stats_file_record
        from onnxprune.stats_file import load_stats

        stats, metadata = load_stats(path)
        return cls(stats, {**stats_file_record(path), "computed_from": metadata})


def prune(model: ModelLike, method: str = "wanda", sparsity: float | None = None, pattern: str | None = None,
          calib: CalibLike = None, *, stats: Statistics | str | os.PathLike | None = None,
          nsamples: int = 128, seqlen: int = 2048, tokenizer: str | os.PathLike | None = None,
          one_shot: bool = False, include: str | None = None, exclude: str | None = None, target: str = "dense",
          allocation: str = "uniform", strict: bool = False, data_free: bool = False,
          add_bias: bool = False, seed: int = 0, kinds: Sequence[str] | None = None, device: str = "auto",
          recipe=None) -> PruneResult:
    """Prune `model` and return it in memory with its report.

    `sparsity` defaults to 0.5 (an N:M `pattern` sets its own); `pattern` is "unstructured",
    "N:M" (e.g. "2:4") or "structured". `calib`: a data set name (wikitext2, c4, ptb), a .txt /
    .jsonl / .npz file, a list of feed dicts, or token-id windows [samples, seqlen]. `stats`: a
    `Statistics` from `calibrate` (or its .npz file) instead of `calib`. `kinds`: what structured
    pruning removes (ffn, heads, conv; default all). `recipe`: a recipe (path,
    dict or `Recipe`) run instead of the single method. The other options mean what the
    `onnxprune apply` options of the same names mean.
    """
    if recipe is not None:
        return run_recipe(recipe, model, calib=calib, tokenizer=tokenizer)
    from onnxprune.emit import default_pattern
    from onnxprune.patterns import parse_pattern
    from onnxprune.pipeline import PruneOptions, StageTimer, prune_model

    pattern = default_pattern(target, pattern, sparsity)
    if sparsity is None and (pattern is None or pattern.strip().lower() in ("unstructured", "structured")):
        sparsity = 0.5
    spec = parse_pattern(pattern, sparsity)
    if allocation not in ("uniform", "owl"):
        raise UserError(f"allocation must be uniform or owl, got {allocation!r}")
    stats_path = str(stats) if isinstance(stats, (str, os.PathLike)) else None
    calibration = CalibrationOptions(_calib_name(calib), nsamples, seqlen, _str(tokenizer), seed, not one_shot,
                                     stats_path)
    options = PruneOptions(method, spec, include, exclude, strict, seed, None, calibration, allocation,
                           data_free, add_bias, target, tuple(kinds) if kinds else None, device)
    loaded, source = _load(model)
    timer = StageTimer()
    report = prune_model(loaded, options, _calibration_source(loaded, source, calibration, calib, stats, timer), timer)
    report.input = str(source) if source else "<in memory>"
    return PruneResult(loaded, report, source)


def calibrate(model: ModelLike, calib: CalibLike, *, method: str | None = None, nsamples: int = 128,
              seqlen: int = 2048, tokenizer: str | os.PathLike | None = None, include: str | None = None,
              exclude: str | None = None, seed: int = 0) -> Statistics:
    """Statistics of the dense model's selected layers (what `method` needs; default: everything)."""
    from onnxprune.pipeline import StageTimer, calibrate_model

    loaded, source = _load(model)
    calibration = CalibrationOptions(_calib_name(calib), nsamples, seqlen, _str(tokenizer), seed, False)
    samples = _calibration_source(loaded, source, calibration, calib, None, StageTimer())
    stats = calibrate_model(loaded, samples, include, exclude, method)
    return Statistics(stats, {**samples.record(), "model": str(source) if source else "<in memory>"})


def evaluate(model: ModelLike, eval: str | os.PathLike = "wikitext2", *, seqlen: int = 2048,
             tokenizer: str | os.PathLike | None = None, max_windows: int | None = None,
             reference: ModelLike | None = None, inputs: str | os.PathLike | Mapping[str, np.ndarray] | None = None,
             providers: list[str] | None = None) -> PerplexityResult | dict:
    """Perplexity of a causal LM on `eval`'s test text (a `PerplexityResult`; `float()` of it is the
    perplexity), or, with `reference` and `inputs` (a .npz or a dict of arrays, first axis = samples),
    the output fidelity against the dense twin (cosine, relative error, top-1 agreement per output)."""
    from onnxprune.evaluation import open_session

    session = open_session(_runnable(model), providers)
    if reference is not None:
        from onnxprune.fidelity import fidelity

        if inputs is None:
            raise UserError("reference= needs inputs= (a .npz or a dict of arrays named after the model's inputs)")
        return fidelity(session, open_session(_runnable(reference), providers), inputs)
    from onnxprune.data import load_tokenizer
    from onnxprune.evaluation import perplexity

    return perplexity(session, load_tokenizer(_source_of(model), _str(tokenizer)), eval, seqlen,
                      max_windows=max_windows)


def inspect(model: ModelLike, patterns: Sequence[str] = ("2:4", "4:8"), include: str | None = None,
            exclude: str | None = None) -> dict:
    """What `onnxprune inspect --json` prints: every prunable weight, its sparsity and N:M validity."""
    from onnxprune.inspection import inspect_model
    from onnxprune.patterns import parse_pattern

    loaded, source = _load(model, clone=False)
    nm = [parse_pattern(p, None) for p in patterns]
    return inspect_model(loaded, [(p.n, p.m) for p in nm], include, exclude,
                         label=str(source) if source else "<in memory>")


def sweep(model: str | os.PathLike, output: str | os.PathLike, methods: Sequence[str] | None = None,
          levels: Sequence[float] | None = None, patterns: Sequence[str] = (), calib: str | os.PathLike | None = None,
          eval: str | os.PathLike = "wikitext2", *, nsamples: int = 128, seqlen: int = 2048,
          tokenizer: str | os.PathLike | None = None, prompt: str = "University is", max_new_tokens: int = 20,
          max_windows: int | None = None, one_shot: bool = False, keep_models: bool = False, seed: int = 0,
          ray: str | None = None, cell_cpus: float = 1.0, cell_gpus: float = 0.0, max_retries: int = 2,
          shared_storage: bool = False) -> list[dict]:
    """`onnxprune sweep`: every method × level (and N:M pattern) of the model file `model`, into the
    folder `output` (results.jsonl, table.md, timing.md, samples.md, the plot); returns the records.
    `methods` and `levels` default to the CLI's (magnitude, wanda, sparsegpt at 13 levels from 0.01
    to 0.99). Resumable like the CLI. `ray="auto"` (or a cluster's address) runs each cell as a
    Ray task reserving `cell_cpus` / `cell_gpus`."""
    from onnxprune.distributed import ClusterOptions
    from onnxprune.ray_sweep import ray_runner
    from onnxprune.sweeps import DEFAULT_LEVELS, DEFAULT_METHODS, SweepConfig, run_sweep

    path = resolve_model_path(model)
    if not path.is_file():
        raise UserError(f"model file not found: {path}")
    config = SweepConfig(list(methods or DEFAULT_METHODS), [float(v) for v in levels or DEFAULT_LEVELS],
                         list(patterns), _str(calib), str(eval), Path(output), nsamples, seqlen, _str(tokenizer), prompt, max_new_tokens, max_windows,
                         one_shot, keep_models, seed)
    runner = None if ray is None else ray_runner(ClusterOptions(ray, cell_cpus, cell_gpus, max_retries, shared_storage))
    return run_sweep(path, config, runner)


def run_recipe(recipe, model: ModelLike, *, calib: CalibLike = None, tokenizer: str | os.PathLike | None = None):
    """Run a recipe's stages (`onnxprune.recipe`) in order on `model`; a `PruneResult` whose report
    is a `RecipeReport`. `calib` replaces the recipe's calibration source."""
    from onnxprune.pipeline import CalibrationSource, StageTimer, prune_model
    from onnxprune.quantization import QuantizeOptions, quantize_model
    from onnxprune.recipe import RecipeReport, load_recipe, needs_data, prune_options
    from onnxprune.samples import calibration_metadata

    recipe = load_recipe(recipe)
    config = recipe.calibration
    source_name = str(calib) if isinstance(calib, (str, os.PathLike)) else config.source
    calibration = CalibrationOptions(source_name, config.nsamples, config.seqlen,
                                     str(tokenizer) if tokenizer else config.tokenizer, config.seed)
    current, source = _load(model)
    report = RecipeReport(__version__, str(source) if source else "<in memory>", "", recipe.to_dict(), recipe.sha256)
    started = time.perf_counter()
    in_memory = None if isinstance(calib, (str, os.PathLike)) else calib
    first = _calibration_source(current, source, calibration, in_memory, None, StageTimer())
    data_stages = [s for s in recipe.stages if needs_data(s)]
    samples = first.samples() if data_stages else None  # drawn once, shared by every stage
    report.calibration = first.record() if data_stages else {}
    for stage in recipe.stages:
        stage_start = time.perf_counter()
        if stage.kind == "prune":
            options = prune_options(stage.config, calibration if needs_data(stage) else None)  # data only where used
            timer = StageTimer()
            stage_source = CalibrationSource(source, current, calibration, timer, samples,
                                             record=report.calibration or None)
            result = prune_model(current, options, stage_source, timer)
            summary = PruneResult(current, result, source).summary()
            entry = {"name": stage.name, "kind": "prune", "summary": summary, "report": result.to_dict()}
        else:
            current, result = quantize_model(current, QuantizeOptions(**asdict(stage.config)), samples)
            summary = (f"{result['mode']}: {result['quantized_layers']} quantized weights, "
                       f"{result['zeros_before']:,} pruned zeros kept")
            entry = {"name": stage.name, "kind": "quantize", "summary": summary, "report": result}
        report.stages.append(entry)
        report.timings_s[stage.name] = round(time.perf_counter() - stage_start, 6)
    report.timings_s["total"] = round(time.perf_counter() - started, 6)
    current.metadata_props.update({"onnxprune.recipe": json.dumps(recipe.to_dict(), sort_keys=True),
                                   "onnxprune.recipe_sha256": recipe.sha256,
                                   **{f"onnxprune.{k}": v for k, v in calibration_metadata(report.calibration).items()}})
    return PruneResult(current, report, source)


# ------------------------------------------------------------------------------------ helpers


def _load(model: ModelLike, clone: bool = True) -> tuple[ir.Model, Path | None]:
    """(an onnx_ir model the caller may change, the file it came from)."""
    if isinstance(model, PruneResult):
        return (model.model.clone() if clone else model.model), model.source
    if isinstance(model, ir.Model):
        return (model.clone() if clone else model), None
    if isinstance(model, (str, os.PathLike)):
        return load_model(model), resolve_model_path(model)
    import onnx

    if isinstance(model, onnx.ModelProto):
        return ir.from_proto(model), None
    raise UserError(f"model must be a path, an onnx.ModelProto, an onnx_ir.Model or a PruneResult, "
                    f"got {type(model).__name__}")


def _runnable(model: ModelLike):
    """What `open_session` takes: a path, or the model in memory."""
    if isinstance(model, PruneResult):
        return model.model
    return resolve_model_path(model) if isinstance(model, (str, os.PathLike)) else model


def _source_of(model: ModelLike) -> Path | None:
    if isinstance(model, PruneResult):
        return model.source
    return resolve_model_path(model) if isinstance(model, (str, os.PathLike)) else None


def _calib_name(calib: CalibLike) -> str | None:
    return str(calib) if isinstance(calib, (str, os.PathLike)) else None


def _calibration_source(model: ir.Model, source: Path | None, calibration: CalibrationOptions, calib: CalibLike,
                        stats, timer):
    from onnxprune.pipeline import CalibrationSource, input_names
    from onnxprune.samples import samples_from_python

    samples = None
    if calib is not None and not isinstance(calib, (str, os.PathLike)):
        samples = samples_from_python(calib, input_names(model), calibration.nsamples)
    if isinstance(stats, Statistics):
        return CalibrationSource(source, model, calibration, timer, samples, stats.stats, stats.record)
    return CalibrationSource(source, model, calibration, timer, samples)


def _onnx_suffix(path: str | os.PathLike) -> Path:
    if Path(path).suffix != ".onnx":
        raise UserError(f"output path must end in .onnx: {path}")
    return Path(path)


def _str(path: str | os.PathLike | None) -> str | None:
    return None if path is None else str(path)
