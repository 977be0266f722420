"""onnxprune: prune neural networks as ONNX graphs.

The Python API (`onnxprune.api`) is imported on first use, so `import onnxprune` stays cheap:

    result = onnxprune.prune("model.onnx", "wanda", 0.5, calib="calib.txt")
    onnxprune.evaluate(result, "test.txt")
    result.save("pruned.onnx")
"""

from __future__ import annotations

import os

# OpenBLAS's idle threads spin for 2^28 cycles (~0.1 s) after each call before they sleep.
# Calibration alternates numpy's Gram accumulation with onnxruntime runs, which those spinning
# threads slowed 1.4x (Llama-shaped, 12 layers x 768, 32 x 512 tokens, 2 threads: the statistics
# runs 29.6 -> 20.8 s, the whole SparseGPT apply 86.7 -> 77.1 s). At 2^4 cycles they sleep at once.
# OpenBLAS reads it when numpy loads it: this holds where onnxprune is imported first (the CLI);
# a value the user set is kept.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from importlib.metadata import PackageNotFoundError, version  # noqa: E402  (after the environment default above)
from typing import TYPE_CHECKING  # noqa: E402

try:
    __version__ = version("onnxprune")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"

if TYPE_CHECKING:
    from onnxprune.api import PruneResult, Statistics, calibrate, evaluate, inspect, prune, run_recipe, sweep

__all__ = ["PruneResult", "Statistics", "calibrate", "evaluate", "inspect", "prune", "run_recipe", "sweep", "__version__"]


def __getattr__(name: str):
    if name in __all__:
        from onnxprune import api

        return getattr(api, name)
    raise AttributeError(f"module 'onnxprune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
