"""The `onnxprune` command line. Bad input ends in one line on stderr and exit code 2."""

from __future__ import annotations

import functools
import inspect as signatures
import json
import os
import signal
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from onnxprune import __version__, console
from onnxprune.console import detail, emit_json, info, note, warn
from onnxprune.errors import CheckFailed, UserError, first_line, os_user_error
from onnxprune.validate import check_writable, check_writable_dir

try:  # typer >= 0.20 parses with its own copy of click, whose exceptions are not click's
    from typer._click import exceptions as _click_exceptions
except ImportError:  # older typer runs on click itself
    from click import exceptions as _click_exceptions
_USAGE_ERRORS = (_click_exceptions.UsageError,)
_CLICK_ERRORS = (_click_exceptions.ClickException,)
_ABORTS = (getattr(_click_exceptions, "Abort", typer.Abort), typer.Abort)

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Prune neural networks as ONNX graphs.",
                  epilog="Run `onnxprune COMMAND -h` for a command's options and examples.")


def _print_version(value: bool) -> None:
    if value:
        print(f"onnxprune {__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only the result line, warnings and errors."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also one line per layer, and tracebacks of internal errors."),
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
) -> None:
    _set_verbosity(quiet, verbose)


def _set_verbosity(quiet: bool, verbose: bool) -> None:
    if (quiet or console.is_quiet()) and (verbose or console.is_verbose()):  # before or after the command name
        raise UserError("--quiet and --verbose contradict each other; pass one")
    if quiet or verbose:
        console.configure(console.QUIET if quiet else console.VERBOSE)


# -q / -v (and --json where a command has results) work after the command name too, as in git.
_COMMON_OPTIONS = {
    "quiet": typer.Option(False, "--quiet", "-q", help="Only the result line, warnings and errors."),
    "verbose": typer.Option(False, "--verbose", "-v", help="Also one line per layer."),
}
_JSON_OPTION = typer.Option(False, "--json", help="Print the result as one JSON document on stdout (nothing else goes there).")


def command(name: str | None = None, *, examples: str, json_result: bool = True):
    """`@app.command` plus the common options and an Examples section in `--help`."""
    def decorate(func):
        extra = {**_COMMON_OPTIONS, **({"as_json": _JSON_OPTION} if json_result else {})}

        @functools.wraps(func)
        def run(*args, quiet: bool = False, verbose: bool = False, as_json: bool = False, **kwargs):
            _set_verbosity(quiet, verbose)
            console.configure(as_json=as_json)
            return func(*args, **kwargs)

        own = signatures.signature(func, eval_str=True)
        run.__signature__ = own.replace(parameters=[
            *own.parameters.values(),
            *(signatures.Parameter(key, signatures.Parameter.KEYWORD_ONLY, default=option, annotation=bool)
              for key, option in extra.items())])
        run.__annotations__ = {**{k: v.annotation for k, v in own.parameters.items()},
                               **{key: bool for key in extra}, "return": None}
        epilog = "Examples:\n\n\b\n" + "\n".join("  " + line for line in examples.strip().splitlines())
        return app.command(name, epilog=epilog)(run)
    return decorate

CALIB_OPTION = typer.Option(None, "--calib", help="Calibration data: wikitext2, c4, ptb, a .txt/.jsonl file, a .npz of input tensors (first axis = samples), or a directory of .npz files (one feed dict per sample).")
NSAMPLES_OPTION = typer.Option(128, "--nsamples", help=(
    "Calibration windows (samples), default 128 as in the Wanda/SparseGPT papers. Cost grows linearly: about two "
    "forward passes of the model over nsamples × seqlen tokens, and nsamples × seqlen × hidden × 4 bytes of "
    "block-boundary activations (in memory up to ONNXPRUNE_CACHE_MB, default 4096, then on disk). 32 is often "
    "enough for a first try at a quarter of the time."))
SEQLEN_OPTION = typer.Option(None, "--seqlen", help="Tokens per calibration window (default: min(2048, the model's max positions from config.json or its position table)).")
TOKENIZER_OPTION = typer.Option(None, "--tokenizer", help="Tokenizer directory (default: beside the model).")
RAY_OPTION = typer.Option(None, "--ray", help="Run on a Ray cluster: 'auto' (the one `ray start` runs here, else a new local one) or its ADDRESS (host:6379, ray://host:10001). Needs pip install 'onnxprune[ray]'.")
SHARED_STORAGE_OPTION = typer.Option(False, "--shared-storage", help="With --ray: the nodes read the model (and OUT) at the same paths instead of copies through Ray's object store.")


@command(examples="""
onnxprune apply model.onnx -m magnitude -s 0.5 -o pruned.onnx
onnxprune apply model.onnx -m magnitude -p 2:4 -o pruned-2of4.onnx --report report.json
onnxprune apply model.onnx -m wanda -s 0.5 --calib corpus.txt --nsamples 64 --seqlen 128 -o wanda.onnx
onnxprune apply model.onnx -p structured -s 0.5 -m l1 -o smaller.onnx
onnxprune -q apply model.onnx -m magnitude -s 0.5 -o pruned.onnx --json > report.json
""")
def apply(
    model: Path = typer.Argument(..., help="ONNX model (.onnx file, or a directory holding model.onnx)."),
method: Optional[str] = typer.Option(None, "--method", "-m", help="Pruning method (default: magnitude; l1 for structured); `onnxprune methods` lists them."),
    sparsity: Optional[float] = typer.Option(None, "--sparsity", "-s", help="Fraction of weights to zero, in [0, 1)."),
    pattern: Optional[str] = typer.Option(None, "--pattern", "-p", help="'unstructured' (default), N:M, e.g. 2:4 = 2 zeros in every 4 along K, or 'structured' (remove whole neurons/heads/channels: l1, wanda, mama)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output .onnx (default: beside the input)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write a JSON report here (and a .md twin)."),
    include: Optional[str] = typer.Option(None, "--include", help="Regex on initializer or node names: prune exactly the matching layers."),
    exclude: Optional[str] = typer.Option(None, "--exclude", help="Regex on initializer or node names: leave these layers dense."),
    strict: bool = typer.Option(False, "--strict", help="With N:M, fail on a layer whose K (input channels) is not divisible by M instead of leaving it dense."),
    skip_incompatible: bool = typer.Option(False, "--skip-incompatible", hidden=True, help="Deprecated: leaving such layers dense is the default now."),
    seed: int = typer.Option(0, "--seed", help="Seed for random methods."),
    external_data: Optional[bool] = typer.Option(None, "--external-data/--no-external-data", help="Store weights beside the model (default: when the input does or the model is large)."),
    calib: Optional[str] = CALIB_OPTION,
    nsamples: int = NSAMPLES_OPTION,
    seqlen: Optional[int] = SEQLEN_OPTION,
    tokenizer: Optional[Path] = TOKENIZER_OPTION,
    one_shot: bool = typer.Option(False, "--one-shot", help="Gather all statistics on the dense model instead of block by block."),
    stats: Optional[Path] = typer.Option(None, "--stats", help="Statistics from `onnxprune calibrate` (one-shot) instead of --calib."),
    allocation: str = typer.Option("uniform", "--allocation", help="uniform, or owl: per-block sparsity from outlier Wanda scores (needs --calib or --stats)."),
    data_free: bool = typer.Option(False, "--data-free", help="mama: choose the mask from |W| alone (the move still uses calibration statistics)."),
    add_bias: bool = typer.Option(False, "--add-bias", help="mama: add a bias where a layer has none, to take the removed weights' mean."),
    target: str = typer.Option("dense", "--target", help="dense (zeros in place), compressed (smaller file, same weights), tensorrt (2:4 + eligibility report), cpu (structured shrinking)."),
    device: str = typer.Option("auto", "--device", help="auto (cuda when torch sees a GPU), cpu or cuda: sparsegpt/mama solves in torch on the GPU, calibration on onnxruntime's CUDA provider when onnxruntime-gpu is installed."),
) -> None:
    """Prune MODEL's weights and write a new ONNX model."""
    from onnxprune.emit import default_pattern
    from onnxprune.patterns import parse_pattern
    from onnxprune.pipeline import PruneOptions
    from onnxprune.pipeline import apply as run_apply
    from onnxprune.report import write_report
    from onnxprune.samples import CalibrationOptions

    spec = parse_pattern(default_pattern(target, pattern, sparsity), sparsity)
    method = method or ("l1" if spec.structured else "magnitude")
    output = output or _default_output(model, method, spec.label, spec.sparsity)
    replaced = [str(path) for path in (output, report) if path is not None and Path(path).exists()]
    calibration = CalibrationOptions(calib, nsamples, _seqlen(model, seqlen, calib), _optional_str(tokenizer), seed,
                                     not one_shot, _optional_str(stats))
    if allocation not in ("uniform", "owl"):
        raise UserError(f"--allocation must be uniform or owl, got {allocation!r}")
    if skip_incompatible:
        if strict:
            raise UserError("--skip-incompatible contradicts --strict; drop one of them")
        note("--skip-incompatible is deprecated: leaving layers that cannot hold N:M dense is the default now")
    if report:
        check_writable(report, report.with_suffix(".md"))  # before any work, not after the model is written
    result = run_apply(model, output, PruneOptions(method, spec, include, exclude, strict, seed,
                                                   external_data, calibration, allocation, data_free, add_bias,
                                                   target, device=device))
    for text in result.notes:  # warnings from validate.py come as "warning: ..." notes
        warn(text.removeprefix("warning: ")) if text.startswith("warning: ") else note(text)
    if report:
        write_report(result, report)
    emit_json(result.to_dict())
    totals = result.totals
    if spec.structured:
        for group in result.groups:
            detail(f"{group.kind} {', '.join(group.producers)}: " + (
                f"{group.units_before} -> {group.units_after} {group.unit}" if group.reason is None
                else f"refused: {group.reason}"))
        console.result(result.summary())
    else:
        for target in result.targets:
            valid = "" if target.nm_valid is None else f", {result.pattern} {'valid' if target.nm_valid else 'NOT valid'}"
            detail(f"{target.node}: {target.op} {'×'.join(map(str, target.shape))}, sparsity {target.sparsity:.4f}{valid}")
        for skipped in result.skipped:
            detail(f"{skipped['node']}: left dense: {skipped['reason']}")
        console.result(f"pruned {totals['targets']} weights with {result.method} ({result.pattern}, sparsity "
                       f"{result.sparsity:g}): {totals['zeros']:,} of {totals['params']:,} are zero "
                       f"({totals['sparsity']:.2%}); {len(result.skipped)} left dense")
    info(f"wrote {result.output}" + (f" and {report}" if report else "")
         + f" in {result.timings_s['total']:.2f} s" + (f" (replaced the existing {', '.join(replaced)})" if replaced else ""))
    if result.companions:
        info(f"copied {', '.join(result.companions)} beside it (eval and generate find them there)")


@command(examples="""
onnxprune inspect model.onnx
onnxprune inspect model.onnx --patterns 2:4,4:8,8:16 --json
onnxprune inspect model.onnx --include 'mlp' --exclude 'layers\\.0\\.'
""")
def inspect(
    model: Path = typer.Argument(..., help="ONNX model."),
    patterns: str = typer.Option("2:4,4:8", "--patterns", help="N:M patterns to check validity for, comma-separated."),
    include: Optional[str] = typer.Option(None, "--include", help="Regex: what apply --include would select."),
    exclude: Optional[str] = typer.Option(None, "--exclude", help="Regex: what apply --exclude would leave out."),
) -> None:
    """List MODEL's prunable weights: shape, block, sparsity, N:M validity, and totals."""
    from onnxprune.inspection import inspect_model
    from onnxprune.patterns import parse_pattern

    nm = [parse_pattern(p, None) for p in patterns.split(",") if p.strip()]
    report = inspect_model(model, [(p.n, p.m) for p in nm], include, exclude)
    emit_json(report)
    table = Table(title=report["model"])
    for column in ["target", "op", "shape", "block", "selected", "sparsity", *(f"{p.n}:{p.m}" for p in nm)]:
        table.add_column(column, overflow="fold")
    for row in report["targets"]:
        selected = "yes" if row["selected"] else f"no: {row['note']}"
        if row["calibration"]:
            selected += f" (calibrated methods: no, {row['calibration']})"
        table.add_row(row["node"], row["op"], "×".join(map(str, row["shape"])), row["block"] or "-", selected,
                      f"{row['sparsity']:.4f}", *("yes" if ok else "no" for ok in row["nm_valid"].values()))
    for row in report["unsupported"]:
        table.add_row(row["node"], row["op"], "×".join(map(str, row["shape"])), "-", f"no: {row['reason']}", "-",
                      *("-" for _ in nm))
    info(table)
    totals = report["totals"]
    console.result(f"{totals['candidates']} prunable weights in {totals['blocks']} blocks, {totals['params']:,} parameters; "
                   f"{totals['selected']} selected by default ({totals['selected_params']:,} parameters); "
                   f"current sparsity {totals['sparsity']:.2%}"
                   + (f"; {totals['unsupported']} weights ({totals['unsupported_params']:,} parameters) in forms "
                      "that cannot be pruned" if totals["unsupported"] else ""))


@command(examples="""
onnxprune export facebook/opt-125m opt125m/
onnxprune export ./my-hf-model/ onnx-out/ --task feature-extraction --dtype fp16
onnxprune export meta-llama/Llama-3.2-1B llama/ --with-past
""")
def export(
    model: str = typer.Argument(..., help="Hugging Face hub id or local model directory."),
    out_dir: Path = typer.Argument(..., help="Directory for model.onnx, config and tokenizer."),
    task: str = typer.Option("auto", "--task", help="optimum task (text-generation, feature-extraction, ...)."),
    with_past: bool = typer.Option(False, "--with-past", help="Export a KV-cache decoder (not usable for calibration)."),
    opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset (default: optimum's choice)."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, fp16 or bf16."),
    validate: bool = typer.Option(False, "--validate", help="Compare ONNX outputs with PyTorch after export."),
) -> None:
    """Export a Hugging Face model to ONNX through optimum (works offline from a local directory)."""
    from onnxprune.exporters.hf import export_hf
    from onnxprune.model_io import load_model
    from onnxprune.targets import discover_targets, select_targets

    path = export_hf(model, out_dir, task, with_past, opset, dtype, validate)
    targets = discover_targets(load_model(path))
    selected = select_targets(targets)
    emit_json({"model": str(path), "prunable": len(targets), "selected": len(selected)})
    console.result(f"wrote {path}: {len(targets)} prunable weights, {len(selected)} selected by default")


@command(examples="""
onnxprune calibrate model.onnx --calib corpus.txt --nsamples 64 --seqlen 128 -o stats.npz
onnxprune calibrate model.onnx --calib inputs.npz -m wanda -o stats.npz
""")
def calibrate(
    model: Path = typer.Argument(..., help="ONNX model."),
    output: Path = typer.Option(..., "--output", "-o", help="Statistics file (.npz) to write."),
    calib: Optional[str] = CALIB_OPTION,
    nsamples: int = NSAMPLES_OPTION,
    seqlen: Optional[int] = SEQLEN_OPTION,
    tokenizer: Optional[Path] = TOKENIZER_OPTION,
    include: Optional[str] = typer.Option(None, "--include", help="Regex: calibrate exactly these layers."),
    exclude: Optional[str] = typer.Option(None, "--exclude", help="Regex: skip these layers."),
    method: Optional[str] = typer.Option(None, "--method", "-m", help="Gather only what this method needs (default: everything)."),
) -> None:
    """Gather activation statistics on the dense model once, for `apply --stats` (one-shot)."""
    from onnxprune.pipeline import calibrate_to_file
    from onnxprune.samples import CalibrationOptions

    if output.suffix != ".npz":
        raise UserError(f"statistics file must end in .npz: {output}")
    check_writable(output)
    summary = calibrate_to_file(model, output, CalibrationOptions(calib, nsamples, _seqlen(model, seqlen, calib),
                                                                   _optional_str(tokenizer)),
                                include, exclude, method)
    emit_json({"output": str(output), **summary})
    console.result(f"wrote {output}: statistics of {summary['targets']} weights from {summary['samples']} samples "
                 f"in {summary['seconds']:.2f} s")
    for name, reason in summary["refused"].items():
        note(f"{name}: {reason} (apply leaves it dense)")


@command(examples="""
onnxprune sweep model.onnx -o sweep/ --methods magnitude,wanda --levels 0.5,0.7 --patterns 2:4 \\
    --calib train.txt --eval test.txt --nsamples 32 --seqlen 128
onnxprune sweep model.onnx -o sweep/ --methods wanda,sparsegpt --levels 0.5 --calib train.txt --eval test.txt \\
    --one-shot --ray head-node:6379 --cell-cpus 4
""")
def sweep(
    model: Path = typer.Argument(..., help="Dense ONNX causal LM."),
    out_dir: Path = typer.Option(..., "--output", "-o", help="Directory for results.jsonl, table.md, timing.md, samples.md, ppl_vs_level.png."),
    methods: str = typer.Option("magnitude,wanda,sparsegpt", "--methods", help="Comma-separated methods."),
    levels: str = typer.Option("0.01,0.05,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,0.95,0.99", "--levels", help="Comma-separated unstructured sparsities."),
    patterns: str = typer.Option("", "--patterns", help="Comma-separated N:M patterns, e.g. 2:4,4:8."),
    calib: Optional[str] = CALIB_OPTION,
    eval_source: str = typer.Option("wikitext2", "--eval", help="Perplexity text: wikitext2, c4, ptb, or a .txt / .jsonl file."),
    nsamples: int = NSAMPLES_OPTION,
    seqlen: Optional[int] = SEQLEN_OPTION,
    tokenizer: Optional[Path] = TOKENIZER_OPTION,
    prompt: str = typer.Option("University is", "--prompt", help="Prompt for the greedy samples."),
    max_new_tokens: int = typer.Option(20, "--max-new-tokens", min=0, help="Tokens per sample."),
    max_windows: Optional[int] = typer.Option(None, "--max-windows", min=1, help="Evaluate only the first N windows."),
    one_shot: bool = typer.Option(False, "--one-shot", help="Dense statistics computed once and shared by every cell."),
    keep_models: bool = typer.Option(False, "--keep-models", help="Keep every pruned model in OUT/models."),
    ray: Optional[str] = RAY_OPTION,
    cell_cpus: float = typer.Option(1.0, "--cell-cpus", min=0, help="With --ray: CPUs each cell's task reserves."),
    cell_gpus: float = typer.Option(0.0, "--cell-gpus", min=0, help="With --ray: GPUs each cell's task reserves (fractions share a GPU)."),
    max_retries: int = typer.Option(2, "--max-retries", min=0, help="With --ray: re-runs of a cell whose worker or node died, before it is recorded as failed."),
    shared_storage: bool = SHARED_STORAGE_OPTION,
) -> None:
    """Methods × levels (and N:M patterns): perplexity table, timing, samples and a plot; resumable."""
    from onnxprune.distributed import ClusterOptions
    from onnxprune.extras import is_available, missing_extra_message
    from onnxprune.ray_sweep import ray_runner
    from onnxprune.sweeps import SweepConfig, run_sweep

    if not is_available("matplotlib"):
        note(f"no ppl_vs_level.png: {missing_extra_message('matplotlib', 'the plot')}")
    config = SweepConfig(_split(methods), [_float(v, "--levels") for v in _split(levels)], _split(patterns), calib,
                         eval_source, out_dir, nsamples, _seqlen(model, seqlen, calib), _optional_str(tokenizer),
                         prompt, max_new_tokens,
                         max_windows, one_shot, keep_models)
    runner = None if ray is None else ray_runner(ClusterOptions(ray, cell_cpus, cell_gpus, max_retries, shared_storage))
    check_writable_dir(out_dir)
    results = run_sweep(_existing_model(model), config, runner)
    failed = [r for r in results if r["status"] == "error"]
    emit_json({"output": str(out_dir), "cells": results})
    console.result(f"{len(results)} cells in {out_dir}/results.jsonl ({len(failed)} failed); tables in "
                 f"{out_dir}/table.md, timing.md, samples.md; plot {out_dir}/ppl_vs_level.png")


@command(examples="""
onnxprune bench pruned.onnx --baseline dense.onnx --batch 1,8 --seqlen 128
onnxprune bench pruned.onnx --baseline dense.onnx --providers cpu,cuda,tensorrt -o bench/
onnxprune bench pruned.onnx --inputs inputs.npz --runs 100 --json
onnxprune bench pruned.onnx --baseline dense.onnx --providers cpu,cuda --ray auto --nodes GPU -o bench/
""")
def bench(
    model: Path = typer.Argument(..., help="ONNX model (.onnx file, or a directory holding model.onnx)."),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="Dense twin: speed-up = its p50 / MODEL's p50, measured in the same rounds."),
    providers: str = typer.Option("cpu", "--providers", help="Comma-separated: cpu, cuda, tensorrt (missing ones are reported, not fatal)."),
    batch: str = typer.Option("1", "--batch", help="Comma-separated batch sizes, e.g. 1,8."),
    seqlen: int = typer.Option(128, "--seqlen", min=1, help="Length of sequence-like input dimensions."),
    warmup: int = typer.Option(5, "--warmup", min=0, help="Untimed runs per model before timing."),
    runs: int = typer.Option(30, "--runs", min=1, help="Timed runs per model."),
    max_seconds: Optional[float] = typer.Option(None, "--max-seconds", min=0, help="Stop timing a cell after this long (at least one run)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="onnxruntime intra-op threads (default: one per core)."),
    inputs: Optional[Path] = typer.Option(None, "--inputs", help="Real input tensors (.npz named after the model's inputs, first axis = samples)."),
    fp16: bool = typer.Option(False, "--fp16", help="TensorRT: allow fp16 kernels (trt_fp16_enable)."),
    tolerance: Optional[float] = typer.Option(None, "--tolerance", min=0, help="Outputs check vs CPU: max |diff| <= tolerance * max(1, max |CPU output|) (default 1e-3, 1e-2 with --fp16)."),
    gemm24: bool = typer.Option(False, "--gemm24", help="Also time MODEL's 2:4 weights as torch semi-structured sparse GEMMs (CUDA only)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Directory for bench.json and bench.md (with --ray also bench.png)."),
    ray: Optional[str] = RAY_OPTION,
    nodes: str = typer.Option("", "--nodes", help="With --ray: only the nodes that have all these comma-separated Ray resources, e.g. GPU or trt (default: every node)."),
    shared_storage: bool = SHARED_STORAGE_OPTION,
) -> None:
    """Latency per execution provider and batch size: p50/p90, throughput, speed-up vs a dense baseline;
    with --ray, on every node of a cluster: one table node × provider × batch."""
    from onnxprune.runtime_bench.latency import BenchOptions, parse_batches, run_bench
    from onnxprune.runtime_bench.providers import ProviderSettings, parse_providers
    from onnxprune.runtime_bench.report import bench_markdown, write_bench

    options = BenchOptions(parse_providers(providers), parse_batches(batch), seqlen, warmup, runs, max_seconds,
                           ProviderSettings(threads, fp16), _optional_str(inputs), tolerance)
    path = _existing_model(model)
    if output:
        check_writable_dir(output)
    baseline_path = None if baseline is None else _existing_model(baseline)
    if ray is not None:
        _bench_on_ray(path, baseline_path, options, ray, _split(nodes), shared_storage, gemm24, output)
        return
    if nodes or shared_storage:
        raise UserError("--nodes and --shared-storage choose Ray nodes: add --ray auto (or --ray ADDRESS)")
    result = run_bench(path, baseline_path, options)
    if gemm24:
        from onnxprune.runtime_bench.gemm24 import bench_gemm24

        result["gemm24"] = bench_gemm24(path, options.batches, seqlen, warmup, runs)
    emit_json(result)
    console.result(bench_markdown(result).rstrip("\n"))
    if output:
        json_path, md_path = write_bench(result, output)
        info(f"wrote {json_path} and {md_path}")


def _bench_on_ray(path: Path, baseline: Path | None, options, address: str, nodes: list[str], shared_storage: bool,
                  gemm24: bool, output: Path | None) -> None:
    from onnxprune.distributed import ClusterOptions
    from onnxprune.runtime_bench.ray_bench import bench_on_ray
    from onnxprune.runtime_bench.report import cluster_markdown, cluster_table, write_cluster_bench

    if options.inputs is not None and not Path(options.inputs).is_file():
        raise UserError(f"--inputs file not found: {options.inputs}")
    cluster = bench_on_ray(path, baseline, options, ClusterOptions(address, shared_storage=shared_storage), nodes,
                           gemm24)
    emit_json(cluster | {"table": cluster_table(cluster)})
    console.result(cluster_markdown(cluster).rstrip("\n"))
    if output:
        info("wrote " + ", ".join(map(str, write_cluster_bench(cluster, output))))


@command(examples="""
onnxprune verify pruned.onnx --pattern 2:4
onnxprune verify pruned-int8.onnx --pattern 2:4 --after ort-opt,fp16,quantize,int4,onnxslim
onnxprune verify pruned.onnx --pattern 2:4 --include 'layers\\.' --json
""")
def verify(
    model: Path = typer.Argument(..., help="ONNX model (.onnx file, or a directory holding model.onnx)."),
    pattern: Optional[str] = typer.Option(None, "--pattern", "-p", help="N:M pattern the pruned layers must hold, e.g. 2:4."),
    after: str = typer.Option("", "--after", help="Comma-separated steps to re-check after: ort-opt, fp16, quantize, int4, onnxslim."),
    include: Optional[str] = typer.Option(None, "--include", help="Regex: exactly these layers must hold the pattern."),
    exclude: Optional[str] = typer.Option(None, "--exclude", help="Regex: these layers need not hold it."),
) -> None:
    """Re-check MODEL's sparsity and N:M pattern per layer (quantized weights in the quantized
    domain), and whether they survive onnxruntime's optimizations, fp16, quantization, onnxslim.
    Exit code 3 when a pattern, a zero or a layer is lost."""
    from onnxprune.patterns import parse_pattern
    from onnxprune.verification import verify_model

    if pattern is not None and ":" not in pattern:
        raise UserError(f"--pattern must be N:M such as 2:4 (verify checks N:M patterns), got {pattern!r}")
    spec = parse_pattern(pattern, None) if pattern else None
    result = verify_model(_existing_model(model), spec, _split(after), include, exclude)
    emit_json(result)
    for step in result["steps"]:
        totals = step["totals"]
        held = f", {totals['pattern_valid']} hold {result['pattern']}" if result["pattern"] else ""
        console.result(f"{step['step']}: {'ok' if step['ok'] else 'FAILED'} - {totals['layers']} layers{held}, "
                       f"{totals['required']} required; sparsity {totals['sparsity']:.2%}")
        for problem in step["problems"]:
            console.result(f"  {problem}")
        for row in step["layers"]:
            detail(f"  {row['name']} ({row['op']}, {row['storage']}): sparsity {row['sparsity']:.4f}"
                   + ("" if row["pattern_valid"] is None else f", {result['pattern']} {'ok' if row['pattern_valid'] else 'broken'}"))
    if not result["ok"]:
        problems = [f"{s['step']}: {p}" for s in result["steps"] for p in s["problems"]]
        raise CheckFailed(problems[0] + (f" (+{len(problems) - 1} more on stdout)" if len(problems) > 1 else ""))


@command(examples="""
onnxprune quantize pruned.onnx -o pruned-int8.onnx --calib calib.npz
onnxprune quantize pruned.onnx -o pruned-int8.onnx --mode int8-dynamic --compressed
onnxprune quantize pruned-llm.onnx -o pruned-int4.onnx --mode int4 --block-size 128 --report q.json
""")
def quantize(
    model: Path = typer.Argument(..., help="ONNX model (pruned, or not)."),
    output: Path = typer.Option(..., "--output", "-o", help="Quantized .onnx to write."),
    mode: str = typer.Option("int8-static", "--mode", help="int8-static (QDQ, calibrated), int8-dynamic, or int4 (MatMulNBits)."),
    calib: Optional[str] = CALIB_OPTION,
    nsamples: int = NSAMPLES_OPTION,
    seqlen: Optional[int] = SEQLEN_OPTION,
    tokenizer: Optional[Path] = TOKENIZER_OPTION,
    block_size: int = typer.Option(128, "--block-size", help="int4: weights per quantization block."),
    compressed: bool = typer.Option(False, "--compressed", help="Store int8 weights as bitmask + non-zeros."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write the quantization report (JSON) here."),
) -> None:
    """Quantize with onnxruntime's quantizer, weights symmetric so pruned weights stay zero
    (read back and checked: exit code 3 if a zero is lost)."""
    from onnxprune.atomic import write_text_atomic
    from onnxprune.model_io import check_output_path, load_model, save_model
    from onnxprune.pipeline import CalibrationSource, StageTimer
    from onnxprune.quantization import QuantizeOptions, check_options, quantize_model
    from onnxprune.samples import CalibrationOptions

    options = QuantizeOptions(mode, block_size=block_size, compressed=compressed)
    check_options(options)
    path = _existing_model(model)
    out = check_output_path(path, output)
    loaded = load_model(path)
    samples = None
    if mode == "int8-static":
        calibration = CalibrationOptions(calib, nsamples, _seqlen(path, seqlen, calib), _optional_str(tokenizer))
        samples = CalibrationSource(path, loaded, calibration, StageTimer()).samples()
    quantized, result = quantize_model(loaded, options, samples)
    save_model(quantized, out)
    result["output"] = str(out)
    if report:
        write_text_atomic(report, json.dumps(result, indent=2) + "\n")
    emit_json(result)
    console.result(f"wrote {out}: {mode}, {result['quantized_layers']} quantized weights, all "
                   f"{result['zeros_before']:,} pruned zeros kept" + (f"; {result['pattern']} holds in "
                   f"{result['pattern_layers_after']} layers" if result["pattern"] else ""))

@command(examples="""
onnxprune run recipe.yaml model.onnx -o pruned-int8.onnx --report report.json
onnxprune run recipe.yaml model.onnx -o out.onnx --calib corpus.txt --json > report.json
""")
def run(
    recipe: Path = typer.Argument(..., help="Recipe (YAML): calibration and stages (prune: / quantize:), run in order."),
    model: Path = typer.Argument(..., help="ONNX model (.onnx file, or a directory holding model.onnx)."),
    output: Path = typer.Option(..., "--output", "-o", help="Output .onnx."),
    calib: Optional[str] = typer.Option(None, "--calib", help="Calibration data, replacing the recipe's calibration source."),
    tokenizer: Optional[Path] = TOKENIZER_OPTION,
    report: Optional[Path] = typer.Option(None, "--report", help="Write the JSON report here (and a .md twin)."),
) -> None:
    """Run a recipe's stages on MODEL (e.g. structured FFN neurons -> SparseGPT 2:4 -> int8); the
    report and the output's metadata record the recipe and the calibration data with their hashes."""
    from onnxprune.api import run_recipe
    from onnxprune.model_io import check_output_path
    from onnxprune.recipe import load_recipe
    from onnxprune.report import write_report

    parsed = load_recipe(recipe)  # every stage validated before the model is read
    path = _existing_model(model)
    check_output_path(path, output)
    result = run_recipe(parsed, path, calib=calib, tokenizer=tokenizer)
    result.save(output, report=report)
    emit_json(result.report.to_dict())
    for stage in result.report.stages:
        info(f"{stage['name']}: {stage['summary']}")
    console.result(f"wrote {output}" + (f" and {report}" if report else "")
                   + f": {len(result.report.stages)} stages in {result.report.timings_s['total']:.2f} s")


def _split(values: str) -> list[str]:
    return [v.strip() for v in values.split(",") if v.strip()]


def _float(value: str, option: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise UserError(f"{option}: {value!r} is not a number") from None


@command(examples="""
onnxprune methods
onnxprune methods --json
""")
def methods() -> None:
    """List the pruning methods."""
    from onnxprune.passes import available

    emit_json([{"name": name, "summary": cls.summary, "needs": sorted(cls.needs)} for name, cls in available().items()])
    for name, cls in available().items():
        needs = f" (needs {', '.join(sorted(cls.needs))})" if cls.needs else ""
        console.result(f"{name:20s} {cls.summary}{needs}")


@command(examples="onnxprune version\nonnxprune --version", json_result=False)
def version() -> None:
    """Print onnxprune's version (as `onnxprune --version` does)."""
    console.result(__version__)


@command("eval", examples="""
onnxprune eval pruned.onnx --eval wikitext2 --seqlen 2048
onnxprune eval pruned.onnx --eval test.txt --seqlen 128 --max-windows 20 -o ppl.json
onnxprune eval pruned.onnx --reference dense.onnx --inputs inputs.npz --json
""")
def evaluate(
    model: Path = typer.Argument(..., help="ONNX model (.onnx file, or a directory holding model.onnx)."),
    eval_source: str = typer.Option("wikitext2", "--eval", help="Perplexity text: wikitext2, c4, ptb, or a .txt / .jsonl file."),
    seqlen: Optional[int] = typer.Option(None, "--seqlen", min=2, help="Tokens per window (default: min(2048, the model's max positions))."),
    tokenizer_dir: Optional[Path] = TOKENIZER_OPTION,
    max_windows: Optional[int] = typer.Option(None, "--max-windows", min=1, help="Evaluate only the first N windows."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="Dense twin: measure output fidelity instead of perplexity."),
    inputs: Optional[Path] = typer.Option(None, "--inputs", help="Input tensors for --reference: a .npz (first axis = samples) or a directory of .npz files (one feed dict per sample)."),
    json_out: Optional[Path] = typer.Option(None, "--output", "-o", help="Also write the result as JSON to this file."),
) -> None:
    """Perplexity of a causal LM through onnxruntime (as Wanda and SparseGPT measure it), or, with
    --reference, output fidelity of any model against its dense twin."""
    from onnxprune.atomic import write_text_atomic

    path = _existing_model(model)
    check_writable(json_out)
    if reference is not None:
        from onnxprune.fidelity import fidelity

        if inputs is None:
            raise UserError("--reference needs --inputs X.npz or DIR (input tensors named after the model's inputs)")
        reference_path = _existing_model(reference)
        result = {"model": str(path), "reference": str(reference_path), "inputs": str(inputs),
                  **fidelity(path, reference_path, inputs)}
        for name, metrics in result["outputs"].items():
            console.result(f"{name}: cosine {metrics['cosine']:.6f}, relative error {metrics['relative_error']:.6f}, "
                         f"top-1 agreement {metrics['top1_agreement']:.4f} ({metrics['rows']:,} rows, "
                         f"{result['samples']} samples)")
            for warning in metrics["warnings"]:
                warn(f"{name}: {warning}")
    else:
        from onnxprune.data import load_tokenizer, window_length
        from onnxprune.evaluation import perplexity

        seqlen = window_length(path, seqlen)
        ppl = perplexity(path, load_tokenizer(path, tokenizer_dir), eval_source, seqlen, max_windows=max_windows)
        result = {"model": str(path), "eval": eval_source, **ppl.as_dict()}
        console.result(f"perplexity {ppl.perplexity:.4f} on {eval_source}: {ppl.windows} windows of {seqlen} tokens "
                     f"({ppl.windows * seqlen:,} of {ppl.tokens:,} tokens) in {ppl.seconds:.2f} s")
        for warning in ppl.warnings:
            warn(warning)
    emit_json(result)
    if json_out:
        write_text_atomic(json_out, json.dumps(result, indent=2) + "\n")
        info(f"wrote {json_out}")


@command(examples="""
onnxprune generate pruned.onnx --prompt "University is" --max-new-tokens 20
onnxprune generate pruned.onnx --prompt "def main(" --tokenizer hf-model/ --json
""")
def generate(
    model: Path = typer.Argument(..., help="ONNX causal LM."),
    prompt: str = typer.Option("University is", "--prompt", help="Text to continue."),
    max_new_tokens: int = typer.Option(20, "--max-new-tokens", min=0, help="Tokens to generate."),
    tokenizer_dir: Optional[Path] = TOKENIZER_OPTION,
) -> None:
    """Greedy decoding through onnxruntime."""
    from onnxprune.data import load_tokenizer
    from onnxprune.generate import greedy_generate

    path = _existing_model(model)
    text = greedy_generate(path, load_tokenizer(path, tokenizer_dir), prompt, max_new_tokens)
    emit_json({"model": str(path), "prompt": prompt, "max_new_tokens": max_new_tokens, "text": text})
    console.result(text)


def _existing_model(model: Path) -> Path:
    from onnxprune.model_io import resolve_model_path

    path = resolve_model_path(model)
    if not path.is_file():
        raise UserError(f"model file not found: {path}")
    return path


def _seqlen(model: Path, requested: int | None, calib: str | None) -> int:
    """The calibration window for MODEL (a .npz brings its own shapes: nothing to check)."""
    if calib is not None and calib.endswith(".npz"):
        return requested or 2048
    from onnxprune.data import window_length

    return window_length(model, requested)


def _optional_str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _default_output(model: Path, method: str, pattern: str, sparsity: float) -> Path:
    from onnxprune.model_io import resolve_model_path

    source = resolve_model_path(model)
    tag = pattern.replace(":", "of") if ":" in pattern else f"s{sparsity:g}"
    return source.with_name(f"{source.stem}.{method}-{tag}.onnx")


def main(argv: list[str] | None = None) -> None:
    group = typer.main.get_command(app)
    if not (sys.argv[1:] if argv is None else argv):
        argv = ["--help"]  # bare `onnxprune` shows the commands, as no_args_is_help means
    console.configure(console.NORMAL, as_json=False)  # tests call main() many times in one process
    try:
        with _signals_as_exceptions():
            result = group.main(args=argv, prog_name="onnxprune", standalone_mode=False)
    except UserError as exc:
        _fail(str(exc), 2)
    except Terminated as exc:  # staging was removed on the way out (atomic.py)
        _fail(f"stopped by {exc.signal_name}; nothing half-written was left behind", 128 + exc.signal_number)
    except CheckFailed as exc:  # a requested check did not pass (verify, quantization keeping zeros)
        _fail(str(exc), exc.exit_code)
    except _USAGE_ERRORS as exc:
        _fail(exc.format_message().splitlines()[0], 2)
    except _CLICK_ERRORS as exc:
        _fail(exc.format_message().splitlines()[0], exc.exit_code)
    except _ABORTS:
        _fail("aborted", 130)
    except Exception as exc:
        if os.environ.get("ONNXPRUNE_DEBUG"):
            raise
        if isinstance(exc, OSError) and os_user_error(exc) is not None:
            _fail(str(os_user_error(exc)), 2)
        if console.is_verbose():
            traceback.print_exc()
        _fail(f"internal error: {type(exc).__name__}: {first_line(exc)} (rerun with -v or ONNXPRUNE_DEBUG=1 for a traceback)", 1)
    sys.exit(result if isinstance(result, int) else 0)


class Terminated(BaseException):
    """SIGINT / SIGTERM / SIGHUP raised as an exception, so `finally` blocks remove staging, and the
    run ends with one line (exit 128 + signal number) instead of a traceback or silence."""

    def __init__(self, number: int) -> None:
        super().__init__(number)
        self.signal_number, self.signal_name = number, signal.Signals(number).name


@contextmanager
def _signals_as_exceptions():
    def terminate(number, _frame):
        raise Terminated(number)

    previous = {}
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        try:
            previous[number] = signal.signal(number, terminate)
        except ValueError:  # not the main thread (e.g. called from a worker): leave signals alone
            pass
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _fail(message: str, code: int) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)
