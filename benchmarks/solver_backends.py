"""SparseGPT and MAMA on the numpy backend vs the torch backend, on CPU, same layers and statistics.

    python benchmarks/solver_backends.py [--rounds 2] [--tokens 2048]

Layers W[out, K] of 768x768 and 3072x768 (SparseGPT unstructured 50% and 2:4; 768x3072 at 50%,
where factoring the 3072² Hessian dominates) and 768x768 (MAMA 50%: the batched Cholesky of each
row's kept block, and the CG branch), random weights and correlated heavy-tailed activations.
SparseGPT's `torch` factors H on torch and sweeps the columns on numpy, as it does on a CPU. Each case runs numpy, torch, numpy, torch, ... (`--rounds`
times each) so that a load change on the machine hits both; the table gives every round's seconds,
the fastest per backend and the largest relative difference between the two backends' weights.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from onnxprune.passes import Layer
from onnxprune.passes.mama import Mama
from onnxprune.passes.sparsegpt import SparseGPT
from onnxprune.patterns import Pattern


def statistics(k: int, tokens: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    x = rng.standard_t(df=4, size=(tokens, k)) @ (np.eye(k) + rng.normal(size=(k, k)) / np.sqrt(k))
    x += rng.normal(size=k)
    return {"gram": x.T @ x, "sq_sum": (x**2).sum(0), "sum": x.sum(0), "tokens": tokens, "samples": tokens // 128}


def timed(method, weight: np.ndarray, stats: dict, pattern: Pattern) -> tuple[float, np.ndarray]:
    layer = Layer("bench", weight.copy(), None, np.random.default_rng(0), stats)
    start = time.perf_counter()
    pruned = method.prune(layer, pattern)
    return time.perf_counter() - start, pruned.weight


def cg_mama(backend: str) -> Mama:
    method = Mama(backend=backend)
    method.direct_max_kept = 0
    return method


CASES = [  # label, (out, K), method per backend, pattern
    ("sparsegpt 50%", (768, 768), lambda b: SparseGPT(backend=b), Pattern(0.5)),
    ("sparsegpt 2:4", (768, 768), lambda b: SparseGPT(backend=b), Pattern(0.5, 2, 4)),
    ("sparsegpt 50%", (3072, 768), lambda b: SparseGPT(backend=b), Pattern(0.5)),
    ("sparsegpt 2:4", (3072, 768), lambda b: SparseGPT(backend=b), Pattern(0.5, 2, 4)),
    ("sparsegpt 50%", (768, 3072), lambda b: SparseGPT(backend=b), Pattern(0.5)),  # K = 3072: H⁻¹ dominates
    ("mama 50% cholesky", (768, 768), lambda b: Mama(backend=b), Pattern(0.5)),
    ("mama 50% cg", (768, 768), cg_mama, Pattern(0.5)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=2048)
    args = parser.parse_args()
    import torch

    print(f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), numpy {np.__version__}")
    print("| case | W [out, K] | numpy s (each round) | torch s (each round) | numpy/torch (fastest) | max rel diff |")
    print("|---|---|---|---|---|---|")
    for label, (out, k), make, pattern in CASES:
        weight = np.random.default_rng(out + k).normal(size=(out, k)).astype(np.float32)
        stats = statistics(k, args.tokens, seed=k)
        seconds: dict[str, list[float]] = {"numpy": [], "torch": []}
        weights = {}
        for _ in range(args.rounds):
            for backend in seconds:
                took, weights[backend] = timed(make(backend), weight, stats, pattern)
                seconds[backend].append(took)
        diff = np.abs(weights["numpy"] - weights["torch"]).max() / np.abs(weights["torch"]).max()
        rounds = {b: " ".join(f"{s:.2f}" for s in v) for b, v in seconds.items()}
        print(f"| {label} | {out}x{k} | {rounds['numpy']} | {rounds['torch']} | "
              f"{min(seconds['numpy']) / min(seconds['torch']):.2f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
