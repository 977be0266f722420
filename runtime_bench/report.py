"""Benchmark results as JSON + Markdown (bench.json, bench.md), written atomically."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from onnxprune.atomic import write_text_atomic
from onnxprune.report import markdown_table

HEADER = ["model", "provider", "batch", "p50 ms", "p90 ms", "throughput /s", "speed-up vs baseline",
          "outputs check", "cosine vs baseline"]


def write_bench(result: dict, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    json_path = write_text_atomic(out_dir / "bench.json", json.dumps(_finite(result), indent=2) + "\n")
    return json_path, write_text_atomic(out_dir / "bench.md", bench_markdown(result))


def bench_markdown(result: dict) -> str:
    labels = result["labels"]
    lines = [f"# onnxprune bench: {labels['model']}" + (f" vs {labels['baseline']}" if "baseline" in labels else ""),
             "",
             f"- inputs: {result['inputs']}",
             f"- {result['warmup']} warm-up runs, then up to {result['runs']} timed rounds"
             + (f" or {result['max_seconds']:g} s" if result["max_seconds"] else "")
             + " per cell; model and baseline interleaved; speed-up = baseline p50 / model p50",
             f"- onnxruntime {result['onnxruntime']}, {result['cpu_count']} CPU cores, intra-op threads "
             f"{result['threads'] or 'default'}" + ("" if result["spinning"] else " (thread spinning off)")
             + f"; outputs check: max |Δ| to the same model's CPU output "
             f"≤ {result['tolerance']:g} · max(1, max |CPU output|)",
             "",
             markdown_table(HEADER, results_rows(result))]
    if result["unavailable"]:
        lines += ["", "## Unavailable", ""]
        lines += [f"- {p['provider']}" + ("" if p["batch"] is None else f" (batch {p['batch']})") + f": {p['reason']}"
                  for p in result["unavailable"]]
    if result.get("gemm24"):
        lines += ["", gemm24_markdown(result["gemm24"])]
    return "\n".join(lines) + "\n"


def results_rows(result: dict) -> list[list[str]]:
    rows = []
    for row in result["rows"]:
        baseline = row["model"] == "baseline"
        speedup = "baseline" if baseline else (f"{row['speedup']:.2f}x" if "speedup" in row else "-")
        versus = f"{row['vs_baseline']['cosine']:.6f}" if "vs_baseline" in row else "-"
        rows.append([result["labels"][row["model"]], row["provider"], row["batch"], f"{row['p50_ms']:.3f}",
                     f"{row['p90_ms']:.3f}", f"{row['throughput']:.1f}", speedup, _check_cell(row["outputs_check"]),
                     versus])
    return rows


def gemm24_markdown(gemm: dict) -> str:
    lines = ["## 2:4 GEMMs in torch (dense vs semi-structured sparse, fp16)", ""]
    shapes = ", ".join(f"{s['out']}×{s['k']} ({s['layers']} layer{'s' * (s['layers'] != 1)})"
                       for s in gemm["shapes"]) or "none"
    lines.append(f"- 2:4-valid weight shapes [out × K]: {shapes}; not 2:4: {gemm['not_2of4']}, "
                 f"not MatMul/Gemm: {gemm['not_gemm']}")
    if gemm["status"] != "ok":
        return "\n".join(lines + [f"- unavailable: {gemm['reason']}"])
    lines += [f"- {gemm['device']}, torch {gemm['torch']}, backend {gemm['backend']}; tokens = batch × seqlen "
              f"({gemm['seqlen']}); p50 ms per call from CUDA events. eager: F.linear called from Python (host "
              "overhead included); graph: replayed from a CUDA graph (GPU time only)", ""]
    table = []
    for r in gemm["rows"]:
        cells = [f"{r['out']}×{r['k']}", r["tokens"]]
        if "error" in r:
            table.append(cells + ["-"] * 6 + [f"error: {r['error']}"])
        else:
            table.append(cells + _mode_cells(r.get("eager")) + _mode_cells(r.get("graph")) + [f"{r['rel_error']:.1e}"])
    for count in dict.fromkeys(t["tokens"] for t in gemm["totals"]):
        by_mode = {t["mode"]: t for t in gemm["totals"] if t["tokens"] == count}
        layers = next(iter(by_mode.values()))["layers"]
        table.append([f"all {layers} layers", count, *_mode_cells(by_mode.get("eager")),
                      *_mode_cells(by_mode.get("graph")), "-"])
    lines.append(markdown_table(["weight", "tokens", "dense ms", "2:4 ms", "speed-up", "dense ms (graph)",
                                 "2:4 ms (graph)", "speed-up (graph)", "rel. error"], table))
    return "\n".join(lines)


def _mode_cells(timing: dict | None) -> list[str]:
    if timing is None:
        return ["-", "-", "-"]
    return [f"{timing['dense_ms']:.4f}", f"{timing['sparse_ms']:.4f}", f"{timing['speedup']:.2f}x"]


def _check_cell(check: dict) -> str:
    if check["status"] == "reference":
        return "reference (CPU)"
    if not check["finite"]:
        return "MISMATCH (non-finite outputs)"
    detail = f"max |Δ| {check['max_abs_diff']:.2e}, cosine {check['cosine']:.6f}"
    return f"ok ({detail})" if check["passed"] else f"MISMATCH ({detail})"


def _finite(value):
    """JSON without NaN / Infinity (not JSON): non-finite numbers become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
