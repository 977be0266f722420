"""Grouped and depthwise convolutions of real models: every group in one batched solve vs one solve
per group (what `apply` did before), SparseGPT / MAMA / Wanda, same layers and statistics.

    python benchmarks/grouped_solvers.py [--models cls,det,rec] [--methods sparsegpt,mama,wanda] [--rounds 2]

Statistics come from one-shot calibration of the dense model on 4 realistic inputs
(benchmarks/real_models.py); every grouped Conv the default selection prunes is pruned at 50%
(and 2:4 where its K allows). Each round runs batched, then looped (A B A B ...), so that a load
change on the machine hits both; the table gives every round's seconds and the largest
difference between the two results' weights.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace

import numpy as np
import onnx_ir as ir
from real_models import MODELS, model_inputs, package_file

from onnxprune.passes import Layer, get_pass
from onnxprune.patterns import Pattern
from onnxprune.pipeline import CalibrationSource, StageTimer, calibrate_model
from onnxprune.samples import CalibrationOptions
from onnxprune.targets import discover, select_targets

PATTERNS = {"50%": Pattern(0.5), "2:4": Pattern(0.5, 2, 4)}


def grouped_layers(key: str, method: str) -> list[Layer]:
    """The grouped convs of model `key` as Layers with their calibration statistics."""
    path = package_file(*MODELS[key][:2])
    model = ir.load(str(path))
    source = CalibrationSource(None, model, CalibrationOptions(), StageTimer(), samples=model_inputs(key, 4, seed=0))
    stats = calibrate_model(model, source, None, None, method)
    targets = select_targets(discover(model).targets, None, None)
    return [Layer(t.name, t.read(), t.read_bias(), np.random.default_rng(0), stats[t.name])
            for t in targets if int(stats.get(t.name, {}).get("groups", 1)) > 1]


def batched(method, layers: list[Layer], pattern: Pattern) -> list[np.ndarray]:
    return [method.prune(replace(layer, weight=layer.weight.copy()), pattern).weight for layer in layers]


def looped(method, layers: list[Layer], pattern: Pattern) -> list[np.ndarray]:
    return [np.concatenate([method.prune(layer.group(j), pattern).weight for j in range(layer.groups)])
            for layer in layers]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cls,det,rec")
    parser.add_argument("--methods", default="sparsegpt,mama,wanda")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
    print("| model | method | pattern | grouped convs (groups) | batched s (each round) | looped s (each round) "
          "| looped/batched (fastest) | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for key in args.models.split(","):
        if package_file(*MODELS[key][:2]) is None:
            print(f"skip {key}: {MODELS[key][0]} is not installed")
            continue
        for name in args.methods.split(","):
            layers = grouped_layers(key, name)
            method = get_pass(name)
            for label, pattern in PATTERNS.items():
                fits = [layer for layer in layers if not pattern.is_nm or layer.weight.shape[1] % pattern.m == 0]
                if not fits:
                    continue
                seconds: dict[str, list[float]] = {"batched": [], "looped": []}
                weights = {}
                for _ in range(args.rounds):
                    for mode, run in (("batched", batched), ("looped", looped)):
                        start = time.perf_counter()
                        weights[mode] = run(method, fits, pattern)
                        seconds[mode].append(time.perf_counter() - start)
                diff = max(float(np.abs(a - b).max()) for a, b in zip(weights["batched"], weights["looped"]))
                rounds = {mode: " ".join(f"{s:.2f}" for s in values) for mode, values in seconds.items()}
                print(f"| {MODELS[key][2]} | {name} | {label} | {len(fits)} ({sum(f.groups for f in fits)}) | "
                      f"{rounds['batched']} | {rounds['looped']} | "
                      f"{min(seconds['looped']) / min(seconds['batched']):.1f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
