"""onnxprune: prune neural networks as ONNX graphs.

The Python API (`onnxprune.api`) is imported on first use, so `import onnxprune` stays cheap:

    result = onnxprune.prune("model.onnx", "wanda", 0.5, calib="calib.txt")
    onnxprune.evaluate(result, "test.txt")
    result.save("pruned.onnx")
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

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
