"""MAMA's solvers, batched Cholesky (exact) and masked conjugate gradients, preconditioned by the kept
block of the system's inverse (the default) or on the Jacobi scaling alone: time and accuracy.

    python benchmarks/mama_solvers.py [--threads 1] [--rounds 3]
    python benchmarks/mama_solvers.py --model minilm/model.onnx --stats stats.npz [--pattern 2:4]

Without --model: synthetic layers [4K, K] for K = 16 ... 512 with heavy-tailed correlated
activations (the ones of benchmarks/solver_backends.py), where the crossover of the two solvers
shows (what `Mama.direct_max_kept` is set from). With --model and --stats (from `onnxprune
calibrate -m mama`): the model's real layers and statistics. Each layer runs Cholesky, CG,
Jacobi-only CG, Cholesky, ... (--rounds times each, the fastest kept) at 50% (or --pattern);
"excess" is a CG's output error above the exact solve's, as a share of MAMA's gain over Wanda's
mask alone, on the calibration statistics: 1e-4 means CG got 99.99% of the improvement.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np

from onnxprune.passes.base import Layer
from onnxprune.passes.mama import Mama
from onnxprune.patterns import Pattern, parse_pattern
from solver_backends import statistics


def synthetic_layers():
    for k in (16, 32, 64, 128, 256, 512):
        weight = np.random.default_rng(k).normal(size=(4 * k, k)).astype(np.float32)
        yield f"synthetic K={k}", weight, statistics(k, 4096, seed=k)


def model_layers(model: str, stats_path: str):
    import onnx_ir as ir

    from onnxprune.stats_file import load_stats
    from onnxprune.targets import discover_targets

    stats, _ = load_stats(stats_path)
    for target in discover_targets(ir.load(model)):
        if target.name in stats:
            yield target.name, target.read(), stats[target.name]


def output_error(weight: np.ndarray, pruned: np.ndarray, stats: dict) -> float:
    """Σ over rows of E((w − ŵ)·x)² on the centred statistics (the layer has a bias to take the mean)."""
    tokens = stats["tokens"]
    cov = np.asarray(stats["gram"], np.float64) / tokens - np.outer(stats["sum"], stats["sum"]) / tokens**2
    diff = weight.astype(np.float64) - pruned
    return float(np.einsum("rk,kl,rl->", diff, cov, diff))


SOLVERS = {"Cholesky": (1 << 30, False), "CG": (0, True), "Jacobi CG": (0, False)}  # direct_max_kept, precondition


def solve(weight: np.ndarray, stats: dict, pattern: Pattern, solver: str) -> tuple[float, np.ndarray, int]:
    method = Mama()
    method.direct_max_kept, method.precondition = SOLVERS[solver]
    layer = Layer("bench", weight.copy(), np.zeros(len(weight), np.float32), np.random.default_rng(0), stats)
    start = time.perf_counter()
    pruned = method.prune(layer, pattern).weight
    return time.perf_counter() - start, pruned, method.last_solve["iterations"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--stats")
    parser.add_argument("--pattern", default="0.5", help="a sparsity (0.5) or N:M (2:4)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # a capped CG warns; its excess shows it anyway
    pattern = parse_pattern(args.pattern, None) if ":" in args.pattern else Pattern(float(args.pattern))
    layers = model_layers(args.model, args.stats) if args.model else synthetic_layers()
    print(f"load average {os.getloadavg()[0]:.1f}, {args.threads} thread(s), pattern {pattern.label}")
    print("| layer | W [out, K] | Cholesky s | CG s | CG iterations | CG excess | Jacobi CG s | Jacobi CG iterations "
          "| Jacobi CG excess |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, weight, stats in layers:
        seconds, results = {solver: [] for solver in SOLVERS}, {}
        for _ in range(args.rounds):
            for solver in SOLVERS:
                took, *results[solver] = solve(weight, stats, pattern, solver)
                seconds[solver].append(took)
        exact = results["Cholesky"][0]
        wanda = output_error(weight, np.where(exact == 0, 0.0, weight), stats)
        best = output_error(weight, exact, stats)
        cells = [f"{min(seconds['Cholesky']):.4f}"]
        for solver in ("CG", "Jacobi CG"):
            pruned, iterations = results[solver]
            excess = (output_error(weight, pruned, stats) - best) / (wanda - best)
            cells += [f"{min(seconds[solver]):.4f}", str(iterations), f"{excess:.0e}"]
        print(f"| {name} | {weight.shape[0]}x{weight.shape[1]} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
