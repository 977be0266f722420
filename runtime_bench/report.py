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
    lines = [_title(result["labels"]), "", *_protocol_lines(result),
             f"- onnxruntime {result['onnxruntime']}, {result['cpu_count']} CPU cores, intra-op threads "
             f"{result['threads'] or 'default'}" + ("" if result["spinning"] else " (thread spinning off)"),
             "",
             markdown_table(HEADER, results_rows(result))]
    if result["unavailable"]:
        lines += ["", "## Unavailable", ""]
        lines += [f"- {_unavailable(p)}" for p in result["unavailable"]]
    if result.get("gemm24"):
        lines += ["", gemm24_markdown(result["gemm24"])]
    return "\n".join(lines) + "\n"


def _unavailable(problem: dict) -> str:
    return (problem["provider"] + ("" if problem["batch"] is None else f" (batch {problem['batch']})")
            + f": {problem['reason']}")


def _title(labels: dict, where: str = "") -> str:
    return (f"# onnxprune bench{where}: {labels['model']}"
            + (f" vs {labels['baseline']}" if "baseline" in labels else ""))


def _protocol_lines(result: dict) -> list[str]:
    return [f"- inputs: {result['inputs']}",
            f"- {result['warmup']} warm-up runs, then up to {result['runs']} timed rounds"
            + (f" or {result['max_seconds']:g} s" if result["max_seconds"] else "")
            + " per cell; model and baseline interleaved; speed-up = baseline p50 / model p50",
            f"- outputs check: max |Δ| to the same model's CPU output ≤ {result['tolerance']:g} · "
            "max(1, max |CPU output|)"]


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


# ------------------------------------------------------------------ across the nodes of a Ray cluster

CLUSTER_HEADER = ["node", "provider", "batch", "p50 ms", "p90 ms", "throughput /s", "baseline p50 ms",
                  "speed-up vs baseline", "outputs check"]


def cluster_table(cluster: dict) -> list[dict]:
    """node × provider × batch: the model's p50 / p90 / throughput and its speed-up over the
    baseline measured on the same node in the same rounds."""
    table = []
    for entry in cluster["nodes"]:
        rows = entry.get("bench", {}).get("rows", [])
        baseline = {(r["provider"], r["batch"]): r for r in rows if r["model"] == "baseline"}
        for row in (r for r in rows if r["model"] == "model"):
            base = baseline.get((row["provider"], row["batch"]))
            table.append({"node": entry["node"], "provider": row["provider"], "batch": row["batch"],
                          "p50_ms": row["p50_ms"], "p90_ms": row["p90_ms"], "throughput": row["throughput"],
                          "baseline_p50_ms": base["p50_ms"] if base else None, "speedup": row.get("speedup"),
                          "outputs_check": row["outputs_check"]})
    return table


def cluster_markdown(cluster: dict) -> str:
    measured = [e for e in cluster["nodes"] if "bench" in e]
    lines = [_title(cluster["labels"], " across a Ray cluster"), "",
             f"- {len(cluster['nodes'])} node(s)" + (f" with {', '.join(cluster['node_resources'])}"
                                                    if cluster["node_resources"] else "")
             + "; each measures the model and the baseline on itself, reserving all its CPUs and GPUs",
             *_protocol_lines(measured[0]["bench"]), "", "## Nodes", ""]
    node_rows = []
    for entry in cluster["nodes"]:
        hw = entry.get("hardware", {})
        gpus = ", ".join(f"{g['name']} (driver {g['driver']}, {g['memory']})" for g in hw.get("gpus", [])) or "-"
        resources = ", ".join(f"{k} {v:g}" for k, v in sorted(entry["resources"].items()))
        node_rows.append([entry["node"], hw.get("cpu_model", "-"), hw.get("cpu_cores", "-"), gpus,
                          hw.get("onnxruntime", "-"), ", ".join(hw.get("providers", [])) or "-", resources])
    lines += [markdown_table(["node", "CPU", "cores", "GPUs", "onnxruntime", "providers", "Ray resources"],
                             node_rows), "", "## Latency", ""]
    rows = [[r["node"], r["provider"], r["batch"], f"{r['p50_ms']:.3f}", f"{r['p90_ms']:.3f}",
             f"{r['throughput']:.1f}", "-" if r["baseline_p50_ms"] is None else f"{r['baseline_p50_ms']:.3f}",
             "-" if r["speedup"] is None else f"{r['speedup']:.2f}x", _check_cell(r["outputs_check"])]
            for r in cluster_table(cluster)]
    lines.append(markdown_table(CLUSTER_HEADER, rows))
    problems = [f"- {e['node']}: {e['error']}" for e in cluster["nodes"] if "error" in e]
    problems += [f"- {e['node']}, {_unavailable(p)}" for e in measured for p in e["bench"]["unavailable"]]
    if problems:
        lines += ["", "## Unavailable", "", *problems]
    for entry in measured:
        if entry["bench"].get("gemm24"):
            lines += ["", f"### {entry['node']}", "", gemm24_markdown(entry["bench"]["gemm24"])]
    return "\n".join(lines) + "\n"


def write_cluster_bench(cluster: dict, out_dir: str | os.PathLike) -> list[Path]:
    """bench.json (every node's full result and the cross-node table), bench.md, and bench.png."""
    out_dir = Path(out_dir)
    document = {**cluster, "table": cluster_table(cluster)}
    written = [write_text_atomic(out_dir / "bench.json", json.dumps(_finite(document), indent=2) + "\n"),
               write_text_atomic(out_dir / "bench.md", cluster_markdown(cluster))]
    return written + [_cluster_chart(document["table"], "baseline" in cluster["labels"], out_dir / "bench.png")]


def _cluster_chart(table: list[dict], with_baseline: bool, path: Path) -> Path:
    """p50 per node × provider × batch as bars, the baseline's beside the model's, speed-up on top."""
    from onnxprune.extras import require

    matplotlib = require("matplotlib", "the bench chart")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from onnxprune.atomic import atomic_path

    names = [f"{r['node']}\n{r['provider']}, batch {r['batch']}" for r in table]
    x = np.arange(len(table))
    width = 0.4 if with_baseline else 0.6
    figure, axes = plt.subplots(figsize=(max(6.0, 1.4 * len(table) + 2), 4.5))
    model_bars = axes.bar(x - (width / 2 if with_baseline else 0), [r["p50_ms"] for r in table], width, label="model")
    if with_baseline:
        axes.bar(x + width / 2, [r["baseline_p50_ms"] or 0 for r in table], width, label="baseline")
        for bar, row in zip(model_bars, table):
            if row["speedup"] is not None:
                axes.annotate(f"{row['speedup']:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                              ha="center", va="bottom", fontsize=8)
    axes.set_xticks(x, names, fontsize=8)
    axes.set_ylabel("p50 latency (ms)")
    axes.set_title("latency per node (speed-up vs the baseline on the same node)" if with_baseline
                   else "latency per node")
    axes.legend()
    axes.grid(True, axis="y", alpha=0.3)
    figure.tight_layout()
    with atomic_path(path) as staging:
        figure.savefig(staging, dpi=120)
    plt.close(figure)
    return path
