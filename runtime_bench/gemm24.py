"""2:4 sparse GEMMs in torch on an NVIDIA GPU: what the model's own pruned weights gain.

onnxruntime's CPU and CUDA providers run zeros as dense math; the TensorRT provider may pick
sparse kernels. This backend measures the kernels directly: for every distinct [out, K] shape
among MODEL's 2:4-valid MatMul / Gemm weights (canonical `W[out, K]`, 2 zeros in every 4 along
K), `torch.nn.functional.linear(x, W)` dense vs with `W` converted by
`torch.sparse.to_sparse_semi_structured` (cuSPARSELt when torch has it, else CUTLASS), in fp16,
for x of [tokens = batch × seqlen, K]. Two modes: "eager" (F.linear called from Python, host
overhead included; torch's cuSPARSELt path plans the matmul on every call, which on an H100 costs
about a millisecond) and "graph" (the same call replayed from a CUDA graph: GPU time alone).
Each is timed with CUDA events around ten back-to-back calls, in alternating rounds
(latency.round_robin), and the sparse result is checked against the dense one. Needs a GPU of
compute capability 8.0+ (Ampere or later); anywhere else the result says why it is unavailable.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable

import numpy as np

from onnxprune.errors import first_line
from onnxprune.runtime_bench.latency import round_robin

GEMM_OPS = ("MatMul", "Gemm")
MODES = ("eager", "graph")
_INNER = 10  # calls per timed sample: one event pair around ten GEMMs hides launch jitter


def gemm_shapes(model_path: str | os.PathLike) -> tuple[list[dict], dict]:
    """The distinct 2:4-valid GEMM weights of the model: [{out, k, layers, names, weight}] (the first
    weight of each shape is kept as the one to time), and counts of what was left out."""
    from onnxprune.model_io import load_model
    from onnxprune.patterns import nm_valid
    from onnxprune.targets import discover_targets

    shapes: dict[tuple[int, int], dict] = {}
    left_out = {"not_gemm": 0, "not_2of4": 0}
    for target in discover_targets(load_model(model_path)):
        if target.op not in GEMM_OPS:
            left_out["not_gemm"] += 1
            continue
        weight = target.read()
        if not nm_valid(weight, 2, 4):
            left_out["not_2of4"] += 1
            continue
        entry = shapes.setdefault(weight.shape, {"out": weight.shape[0], "k": weight.shape[1], "layers": 0,
                                                 "names": [], "weight": weight})
        entry["layers"] += 1
        entry["names"].append(target.name)
    return list(shapes.values()), left_out


def unavailable_reason() -> str | None:
    """Why 2:4 semi-structured GEMMs cannot run here, or None when they can."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured"
    if not torch.cuda.is_available():
        return "no CUDA device"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return (f"{torch.cuda.get_device_name()} (compute capability {major}.{minor}) has no 2:4 sparse tensor "
                "cores; they need 8.0 or later (Ampere, Ada, Hopper, Blackwell)")
    if not torch.backends.cusparselt.is_available() and major != 8:
        return (f"torch {torch.__version__} has no cuSPARSELt, and its CUTLASS 2:4 kernels run only on compute "
                f"capability 8.x, not {major}.{minor}")
    return None


def bench_gemm24(model_path: str | os.PathLike, batches: list[int], seqlen: int, warmup: int = 5,
                 runs: int = 30) -> dict:
    """Dense vs 2:4 sparse fp16 linear for the model's distinct 2:4 GEMM shapes (see the module docstring)."""
    shapes, left_out = gemm_shapes(model_path)
    found = {"shapes": [{k: v for k, v in s.items() if k != "weight"} for s in shapes], **left_out}
    reason = unavailable_reason()
    if reason is None and not shapes:
        reason = "the model has no 2:4-valid MatMul/Gemm weight (prune it with --pattern 2:4 first)"
    if reason is not None:
        return {"status": "unavailable", "reason": reason, **found}
    import torch

    backend = "cuSPARSELt" if torch.backends.cusparselt.is_available() else "CUTLASS"
    tokens = [b * seqlen for b in batches]
    torch.manual_seed(0)
    with _backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "prototype stage" warning on every conversion
        rows = time_shapes(shapes, tokens, warmup, runs, "cuda", torch.float16, _semi_structured, _cuda_timer,
                           _cuda_graph)
    return {"status": "ok", "backend": backend, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "dtype": "float16", "seqlen": seqlen, "rows": rows, "totals": totals(rows, shapes), **found}


def time_shapes(shapes: list[dict], tokens: list[int], warmup: int, runs: int, device: str, dtype,
                sparsify: Callable, timer: Callable, capture: Callable | None = None) -> list[dict]:
    """One row per (shape, tokens): the sparse result's relative error against the dense one, and
    per mode p50 ms of the dense and the sparse linear and their ratio. Mode "eager" calls
    F.linear from Python, as a torch program does (host work included: cuSPARSELt plans every
    call); mode "graph" replays each call captured by `capture` in a CUDA graph (GPU work only,
    what a captured or compiled deployment gets). `sparsify`, `timer` and `capture` are the CUDA
    pieces (to_sparse_semi_structured, CUDA events, CUDA graphs); others (identity,
    latency.wall_timer, None) dry-run the same loop on a CPU."""
    import torch
    import torch.nn.functional as F

    rows = []
    for shape in shapes:
        weight = torch.from_numpy(shape["weight"]).to(device=device, dtype=dtype)
        try:
            sparse = sparsify(weight)
        except Exception as exc:  # shape constraints of the kernels (e.g. K a multiple of 64 for CUTLASS)
            rows += [{"out": shape["out"], "k": shape["k"], "tokens": n, "error": first_line(exc)} for n in tokens]
            continue
        for count in tokens:
            row = {"out": shape["out"], "k": shape["k"], "tokens": count}
            x = torch.randn(count, shape["k"], device=device, dtype=dtype)
            try:
                with torch.no_grad():
                    dense_out, sparse_out = F.linear(x, weight), F.linear(x, sparse)
                    row["rel_error"] = float((sparse_out.float() - dense_out.float()).norm()
                                             / dense_out.float().norm().clamp_min(1e-30))
                    calls = {"dense": lambda: F.linear(x, weight), "sparse": lambda: F.linear(x, sparse)}
                    graphs = _captured(calls, capture, row)
                    samples, _ = round_robin(calls | graphs, warmup, runs, timer=timer)
            except Exception as exc:
                rows.append({**row, "error": first_line(exc)})
                continue
            ms = {name: float(np.percentile(seconds, 50)) * 1e3 for name, seconds in samples.items()}
            for mode, prefix in (("eager", ""), ("graph", "graph ")):
                if f"{prefix}dense" in ms:
                    dense, sparse_ms = ms[f"{prefix}dense"], ms[f"{prefix}sparse"]
                    row[mode] = {"dense_ms": dense, "sparse_ms": sparse_ms, "speedup": _ratio(dense, sparse_ms)}
            rows.append(row)
    return rows


def totals(rows: list[dict], shapes: list[dict]) -> list[dict]:
    """Per token count and mode: all 2:4 layers together (each shape's time × how many layers have it)."""
    layers = {(s["out"], s["k"]): s["layers"] for s in shapes}
    out = []
    for count in dict.fromkeys(r["tokens"] for r in rows):
        for mode in MODES:
            timed = [r for r in rows if r["tokens"] == count and mode in r]
            if not timed:
                continue
            dense, sparse = (sum(r[mode][key] * layers[(r["out"], r["k"])] for r in timed)
                             for key in ("dense_ms", "sparse_ms"))
            out.append({"tokens": count, "mode": mode, "layers": sum(layers[(r["out"], r["k"])] for r in timed),
                        "dense_ms": dense, "sparse_ms": sparse, "speedup": _ratio(dense, sparse)})
    return out


def _captured(calls: dict[str, Callable], capture: Callable | None, row: dict) -> dict[str, Callable]:
    """'graph NAME': a replay of each call captured in a CUDA graph; a failed capture is noted in `row`."""
    if capture is None:
        return {}
    try:
        return {f"graph {name}": capture(fn) for name, fn in calls.items()}
    except Exception as exc:
        row["graph_error"] = first_line(exc)
        return {}


def _ratio(dense: float, sparse: float) -> float:
    return dense / sparse if sparse > 0 else float("inf")


def _semi_structured(weight):
    import torch

    return torch.sparse.to_sparse_semi_structured(weight)


@contextlib.contextmanager
def _backend(name: str):
    """to_sparse_semi_structured builds cuSPARSELt tensors unless _FORCE_CUTLASS is set; set it
    only for the duration of the benchmark, and only where cuSPARSELt is missing."""
    from torch.sparse import SparseSemiStructuredTensor

    saved = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = name == "CUTLASS"
    try:
        yield
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = saved


def _cuda_timer(fn: Callable) -> tuple[float, None]:
    """(seconds per call, None): CUDA events around _INNER back-to-back calls (GPU time, not launch time)."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(_INNER):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / _INNER, None


def _cuda_graph(fn: Callable) -> Callable:
    """fn captured in a CUDA graph; returns its replay. Warmed up on a side stream first, as
    torch.cuda.graphs asks (cuSPARSELt plans and workspaces are made before the capture)."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay
