"""`sweep`: methods × sparsity levels (and N:M patterns) → the paper's tables and figure. (The
module is `sweeps` so that `onnxprune.sweep` stays the Python API's function.)

Every cell prunes the dense model, measures perplexity on the evaluation text and greedy-decodes
the prompt, then appends one line to results.jsonl; a re-run skips the cells already there. The
calibration windows and evaluation tokens are prepared once; with --one-shot the statistics too,
and every cell reuses them (sequential statistics depend on the pruned prefix, so each cell
gathers its own). A failing cell is recorded with its error and the sweep goes on.

Resuming is keyed by the whole configuration (`sweep_key`: model and data digests, nsamples,
seqlen, seed, evaluation and sample settings), stored as the first line of results.jsonl: a run
with another configuration in a directory holding results is refused. Each record is one write of
one line; a line torn by a kill is dropped (that cell runs again) and cut off before the next append.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxprune.atomic import atomic_path, write_text_atomic
from onnxprune.data import TOKENIZER_FILES, evaluation_ids, load_tokenizer
from onnxprune.errors import UserError, first_line
from onnxprune.extras import is_available
from onnxprune.evaluation import open_session, perplexity_of_ids
from onnxprune.generate import greedy_generate
from onnxprune.model_io import external_files_of, load_model, resolve_model_path
from onnxprune.passes import available
from onnxprune.patterns import parse_pattern
from onnxprune.pipeline import PruneOptions, apply, calibrate_to_file
from onnxprune.progress import progress_bar
from onnxprune.report import markdown_table
from onnxprune.samples import CalibrationOptions, calibration_samples

DENSE = "dense"
STATISTICS = "statistics"  # the one-shot statistics, computed once: a line of its own in results.jsonl
DEFAULT_METHODS = ("magnitude", "wanda", "sparsegpt")
DEFAULT_LEVELS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
CONFIG = "sweep_config"  # key of results.jsonl's first line: the configuration its cells belong to
SHARED_FILES = ("calibration.npz", "statistics.npz")  # computed once per configuration, reused by every cell
# Runs the given cells elsewhere: (model_path, config, todo, tokenizer, eval_ids, results_path) -> None.
CellRunner = Callable[[Path, "SweepConfig", list[tuple[str, str]], object, np.ndarray, Path], None]


@dataclass
class SweepConfig:
    methods: list[str]
    levels: list[float]
    patterns: list[str]
    calib: str | None
    eval_source: str
    out_dir: Path
    nsamples: int = 128
    seqlen: int = 2048
    tokenizer: str | None = None
    prompt: str = "University is"
    max_new_tokens: int = 20
    max_windows: int | None = None
    one_shot: bool = False
    keep_models: bool = False
    seed: int = 0

    def cells(self) -> list[tuple[str, str]]:
        labels = [f"{level:g}" for level in self.levels] + self.patterns
        return [(DENSE, "0")] + [(method, label) for method in self.methods for label in labels]


def validate(config: SweepConfig) -> None:
    unknown = [m for m in config.methods if m not in available()]
    if unknown:
        raise UserError(f"unknown method(s) {', '.join(unknown)}; available: {', '.join(available())}")
    for level in config.levels:
        parse_pattern(None, level)
    for pattern in config.patterns:
        parse_pattern(pattern, None)
    if not config.methods:
        raise UserError("--methods is empty")


def run_sweep(model_path: str | Path, config: SweepConfig, run_cells: CellRunner | None = None) -> list[dict]:
    """Run the cells not yet in results.jsonl, here one after the other, or by `run_cells` (a Ray
    cluster's: `ray_sweep.ray_runner`); either way this process alone appends their records."""
    validate(config)
    model_path = resolve_model_path(model_path)
    out = config.out_dir
    (out / "models").mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    done = {(r["method"], r["label"]) for r in open_results(results_path, sweep_key(model_path, config))}
    todo = [cell for cell in config.cells() if cell not in done]
    if todo:
        tokenizer = load_tokenizer(model_path, config.tokenizer)
        eval_ids = evaluation_ids(tokenizer, config.eval_source, config.seqlen)
        if run_cells is not None:
            run_cells(model_path, config, todo, tokenizer, eval_ids, results_path)
        else:
            shared = shared_calibration(model_path, config, todo, results_path)
            for method, label in progress_bar(todo, "sweep cells"):
                append_result(results_path, run_cell(model_path, config, method, label, tokenizer, eval_ids, shared))
    results = read_results(results_path)
    write_outputs(results, config)
    return results


def shared_calibration(model_path: Path, config: SweepConfig, todo: list[tuple[str, str]], results_path: Path,
                       compute_statistics: Callable[[Path, Path], dict] | None = None) -> dict:
    """Calibration windows written once as .npz feeds; with --one-shot also one statistics file,
    made by `compute_statistics(calibration file, statistics file)` (by default here)."""
    needs_data = any(method != DENSE and available()[method].needs for method, _ in todo)
    if not needs_data:
        return {}
    if config.calib is None:
        raise UserError("the methods need calibration data: pass --calib")
    calib_file = config.out_dir / "calibration.npz"
    if not calib_file.exists():
        inputs = [v.name for v in load_model(model_path).graph.inputs if not v.is_initializer()]
        samples = calibration_samples(model_path, inputs, CalibrationOptions(
            config.calib, config.nsamples, config.seqlen, config.tokenizer, config.seed))
        with atomic_path(calib_file) as staging:  # a kill mid-write must not leave a file resume would reuse
            np.savez(staging, **{name: np.concatenate([s[name] for s in samples]) for name in samples[0]})
    shared = {"calib": str(calib_file)}
    if config.one_shot:
        stats_file = config.out_dir / "statistics.npz"
        if not stats_file.exists():
            compute = compute_statistics or (lambda calib, stats: one_shot_statistics(model_path, calib, stats, config))
            summary = compute(calib_file, stats_file)
            append_result(results_path, {"method": STATISTICS, "label": "one-shot", "status": "ok",
                                         "seconds": summary["seconds"], "samples": summary["samples"]})
        shared["stats"] = str(stats_file)
    return shared


def one_shot_statistics(model_path: Path, calib_file: Path, stats_file: Path, config: SweepConfig) -> dict:
    """The dense model's statistics for every method, from the calibration windows, into `stats_file`."""
    return calibrate_to_file(model_path, stats_file, CalibrationOptions(str(calib_file), config.nsamples),
                             None, None, None)


def run_cell(model_path: Path, config: SweepConfig, method: str, label: str, tokenizer, eval_ids: np.ndarray,
             shared: dict) -> dict:
    """Prune, evaluate and sample one cell: its results.jsonl record (a failure is a record too).
    `shared` holds the calibration and statistics files, and where pruned models go ("models")."""
    record = cell_record(method, label)
    started = time.perf_counter()
    pruned_path = model_path
    try:
        if method != DENSE:
            pattern = parse_pattern(*_pattern_args(label))
            models_dir = Path(shared.get("models", config.out_dir / "models"))
            pruned_path = models_dir / f"{method}-{label.replace(':', 'of')}.onnx"
            calibration = CalibrationOptions(shared.get("calib"), config.nsamples, config.seqlen, config.tokenizer,
                                             config.seed, not config.one_shot, shared.get("stats"))
            if not available()[method].needs:  # data-free: the shared data is not for it (and would be refused)
                calibration = CalibrationOptions(seed=config.seed)
            report = apply(model_path, pruned_path, PruneOptions(method, pattern, seed=config.seed,
                                                                 calibration=calibration))
            timings = report.timings_s
            record.update({"sparsity": report.totals["sparsity"], "targets": report.totals["targets"],
                           "calibrate_s": timings.get("calibrate", 0.0) + timings.get("load_stats", 0.0),
                           "prune_s": timings.get("prune", 0.0),
                           "not_applicable": [s["node"] for s in report.skipped if "not applicable" in s["reason"]]})
        session = open_session(pruned_path)  # loaded once for perplexity and the sample
        ppl = perplexity_of_ids(session, eval_ids, config.seqlen, max_windows=config.max_windows)
        record["perplexity"] = ppl.perplexity
        if ppl.warnings:
            record["warnings"] = list(ppl.warnings)
        record["sample"] = greedy_generate(session, tokenizer, config.prompt, config.max_new_tokens)
        record["status"] = "ok"
    except UserError as exc:
        not_applicable = "not applicable" in str(exc)
        record.update({"status": "na" if not_applicable else "error", "error": str(exc)})
    except Exception as exc:  # a broken cell must not stop the sweep
        record.update({"status": "error", "error": f"{type(exc).__name__}: {first_line(exc)}"})
    finally:
        if pruned_path != model_path and not config.keep_models:
            pruned_path.unlink(missing_ok=True)
            pruned_path.with_name(pruned_path.name + ".data").unlink(missing_ok=True)
    record["seconds"] = time.perf_counter() - started
    return record


def cell_record(method: str, label: str) -> dict:
    """The fields every record of a cell starts with."""
    return {"method": method, "label": label, "level": parse_pattern(*_pattern_args(label)).sparsity}


def _pattern_args(label: str):
    return (label, None) if ":" in label else (None, float(label))


def sweep_key(model_path: Path, config: SweepConfig) -> dict:
    """Everything a cell's numbers depend on besides its method and level: results made under
    another key must not be reused."""
    model_path = resolve_model_path(model_path)
    tokenizer_dir = Path(config.tokenizer) if config.tokenizer else model_path.parent
    return {
        "model": _digest([model_path, *(model_path.parent / name for name in sorted(external_files_of(model_path)))]),
        "calib": _source_key(config.calib), "eval": _source_key(config.eval_source),
        "nsamples": config.nsamples, "seqlen": config.seqlen, "seed": config.seed,
        "tokenizer": _digest([tokenizer_dir / name for name in TOKENIZER_FILES if (tokenizer_dir / name).is_file()]),
        "one_shot": config.one_shot, "max_windows": config.max_windows, "prompt": config.prompt,
        "max_new_tokens": config.max_new_tokens,
    }


def open_results(path: Path, key: dict) -> list[dict]:
    """The records already in `path` for configuration `key`. Records of another configuration
    are refused; a file without records starts afresh with `key` as its first line; a torn last
    line is cut off so the next append starts a line of its own."""
    if path.exists():
        _cut_torn_tail(path)
    lines = read_lines(path)
    stored = lines[0].get(CONFIG) if lines else None
    records = lines[1:] if stored is not None else lines
    if records and stored != key:
        changed = ", ".join(k for k in key if stored.get(k) != key[k]) if stored else ""
        what = f"another configuration (different {changed})" if stored else "no configuration record"
        raise UserError(f"{path} holds a sweep with {what}; pass another --output directory, or remove "
                        f"{path} to start over")
    if stored != key:  # a new sweep, or one that finished no cell: its shared files may not be ours
        for name in SHARED_FILES:
            (path.parent / name).unlink(missing_ok=True)
        write_text_atomic(path, json.dumps({CONFIG: key}) + "\n")
    return records


def read_results(path: Path) -> list[dict]:
    """The cell records of `path`, without its configuration line."""
    return [record for record in read_lines(path) if CONFIG not in record]


def read_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill: that cell runs again
    return records


def append_result(path: Path, record: dict) -> None:
    """One record as a single write of one whole line, on disk before returning."""
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, (json.dumps(record) + "\n").encode())
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _cut_torn_tail(path: Path) -> None:
    """Drop a last line without its newline (a write cut short), so the next record starts a line."""
    with open(path, "rb+") as stream:
        data = stream.read()
        if data and not data.endswith(b"\n"):
            stream.truncate(data.rfind(b"\n") + 1)


def _source_key(source: str | None) -> str | None:
    """A data set by name; a local file by name and content."""
    if source is None or not Path(source).is_file():
        return source
    return f"{Path(source).name}:{_digest([Path(source)])}"


def _digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------- outputs


def write_outputs(results: list[dict], config: SweepConfig) -> None:
    by_cell = {(r["method"], r["label"]): r for r in results}
    labels = [f"{level:g}" for level in config.levels] + config.patterns
    dense = by_cell.get((DENSE, "0"))
    rows = [["0 (dense)"] + [_cell_text(dense)] * len(config.methods)] if dense else []
    rows += [[label] + [_cell_text(by_cell.get((m, label))) for m in config.methods] for label in labels]
    write_text_atomic(config.out_dir / "table.md", "# Perplexity by pruning level\n\n"
                      + markdown_table(["level"] + config.methods, rows) + "\n" + _notes(results))
    timing_rows = []
    for method in config.methods:
        cells = [by_cell[(method, label)] for label in labels if by_cell.get((method, label), {}).get("status") == "ok"]
        if cells:
            calibrate = np.mean([c["calibrate_s"] for c in cells])
            prune = np.mean([c["prune_s"] for c in cells])
            timing_rows.append([method, len(cells), f"{calibrate:.3f}", f"{prune:.3f}", f"{calibrate + prune:.3f}"])
        else:
            timing_rows.append([method, 0, "-", "-", "-"])
    shared_stats = by_cell.get((STATISTICS, "one-shot"))
    note = (f"\nOne-shot statistics were computed once in {shared_stats['seconds']:.3f} s and shared by every cell; "
            "calibration above is the time to load them.\n") if shared_stats else ""
    write_text_atomic(config.out_dir / "timing.md", "# Wall time per method (mean per cell, seconds)\n\n"
                      + markdown_table(["method", "cells", "calibration", "pruning", "total"], timing_rows) + "\n"
                      + note)
    sections = ["# Greedy samples", ""]
    for method in config.methods:
        sections += [f"## {method}", "", markdown_table(
            ["level", "perplexity", "text"],
            ([["0 (dense)", _ppl(dense), dense.get("sample", "")]] if dense else [])
            + [[label, _ppl(by_cell.get((method, label))), (by_cell.get((method, label)) or {}).get("sample", "")]
               for label in labels]), ""]
    write_text_atomic(config.out_dir / "samples.md", "\n".join(sections))
    _plot(by_cell, config)


def _cell_text(record: dict | None) -> str:
    if record is None:
        return "pending"
    if record["status"] == "ok":
        return _ppl(record)
    return "NA" if record["status"] == "na" else "error"


def _ppl(record: dict | None) -> str:
    if not record or "perplexity" not in record:
        return "-"
    value = record["perplexity"]
    return f"{value:.3f}" if math.isfinite(value) and value < 1e6 else f"{value:.3e}"


def _notes(results: list[dict]) -> str:
    notes = [f"- {r['method']} at {r['label']}: {r['status']}: {r.get('error', '')}" for r in results
             if r["status"] != "ok"]
    return ("\nCells without a perplexity:\n\n" + "\n".join(notes) + "\n") if notes else ""


def _plot(by_cell: dict, config: SweepConfig) -> None:
    if not is_available("matplotlib"):
        return  # the CLI said so up front: the tables are the results, the figure needs the [plot] extra
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for method in config.methods:
        points = [(lv, by_cell[(method, f"{lv:g}")]["perplexity"]) for lv in config.levels
                  if by_cell.get((method, f"{lv:g}"), {}).get("status") == "ok"]
        if points:
            axes.plot(*zip(*points), marker="o", label=method)
    dense = by_cell.get((DENSE, "0"))
    if dense and dense.get("status") == "ok":
        axes.axhline(dense["perplexity"], color="grey", linestyle="--", label="dense")
    axes.set_yscale("log")
    axes.set_xlabel("sparsity (fraction of weights pruned)")
    axes.set_ylabel("perplexity (log scale)")
    axes.legend()
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    with atomic_path(config.out_dir / "ppl_vs_level.png") as staging:
        figure.savefig(staging, dpi=120)
    plt.close(figure)
