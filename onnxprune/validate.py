"""Checks made before any work, so a run never fails late or succeeds on garbage.

Every path a run will write is checked writable up front; weights, calibration inputs and
activation statistics are checked for NaN / Inf and for degenerate statistics. What makes the
result meaningless raises a UserError naming the layer and the fix; what is suspicious but
sound to continue with comes back as a warning (stderr and the report's notes).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxprune.errors import UserError
from onnxprune.targets import Target

_EXCLUDE_FIX = "fix the model, or leave the layer dense with --exclude REGEX"


def check_writable(*paths: str | os.PathLike | None) -> None:
    """Each file path can be created or replaced: not a directory, and its nearest existing
    ancestor is a writable directory (missing folders are created later, by the writer)."""
    for path in filter(None, paths):
        path = Path(path)
        if path.is_dir():
            raise UserError(f"cannot write {path}: it is a directory; give a file path")
        _check_parent(path, path.parent)


def check_writable_dir(path: str | os.PathLike) -> None:
    """A directory a run fills with files: an existing writable one, or one that can be created."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"cannot write into {path}: it is a file, not a directory; choose another path")
    _check_parent(path, path if path.is_dir() else path.parent)


def _check_parent(path: Path, folder: Path) -> None:
    ancestor = folder.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"cannot write {path}: {ancestor} is a file, not a directory; choose another path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {path}: {ancestor} is not writable (permissions or a read-only file "
                        "system); choose another path")


def check_weights_finite(targets: Iterable[Target]) -> None:
    """NaN / Inf in a weight would flow through every method and into the output."""
    for target in targets:
        stored = target.value.const_value.numpy()
        bad = int(stored.size - np.count_nonzero(np.isfinite(stored)))
        if bad:
            raise UserError(f"{target.node_name}: weight {target.name} holds {bad:,} NaN/Inf values; "
                            f"{_EXCLUDE_FIX}")


def check_samples(model: ir.Model, samples: list[dict[str, np.ndarray]], source: str | None) -> None:
    """Calibration feeds fit the model's inputs (rank, fixed sizes, element type) and are finite.
    Every sample is checked: those of a directory of .npz files each have their own shapes."""
    where = source or "the calibration data"
    inputs = [v for v in model.graph.inputs if v.shape is not None]
    for index, sample in enumerate(samples):
        which = f" (sample {index})" if index else ""
        for value in inputs:
            array = sample.get(value.name)
            if array is None:
                continue
            expected = [_fixed_size(d) for d in value.shape.dims]
            if len(expected) != array.ndim or any(e is not None and e != a for e, a in zip(expected, array.shape)):
                shown = "[" + ", ".join("?" if e is None else str(e) for e in expected) + "]"
                raise UserError(f"{where}: input {value.name} has shape {list(array.shape)} per sample{which}, the "
                                f"model takes {shown}; give arrays of the model's input shape (first axis = samples)")
            if value.dtype is not None and array.dtype != value.dtype.numpy():
                raise UserError(f"{where}: input {value.name} is {array.dtype}{which}, the model takes "
                                f"{value.dtype.numpy()}; convert it (array.astype(np.{value.dtype.numpy()}))")
        for name, array in sample.items():
            if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
                raise UserError(f"{where}: input {name} holds NaN/Inf values (sample {index}); "
                                "calibrate on finite data")


def _fixed_size(dim: int | ir.SymbolicDim) -> int | None:
    """An input axis's required size, or None when any size is taken: a dim_param, no value, or a
    negative dim_value (paddle2onnx writes an unknown batch as -1, as onnxruntime reads it)."""
    return dim if isinstance(dim, int) and dim >= 0 else None


def check_statistics(targets: list[Target], stats: dict[str, dict], method: str) -> list[str]:
    """Statistics a method can trust: refused when non-finite or all zero (the method would prune
    from noise, e.g. SparseGPT zeroing the whole layer). Returns the layers whose activations are
    the same for every token: sound to continue, but worth a warning (`constant_warning`)."""
    constant = []
    for target in targets:
        entry = stats.get(target.name) or {}
        if "refused" in entry:  # calibration could not take this layer: it stays dense with the reason
            continue
        arrays = {key: np.asarray(entry[key]) for key in ("sq_sum", "gram", "sum") if key in entry}
        if not all(np.isfinite(a).all() for a in arrays.values()):
            raise UserError(f"{target.node_name}: the calibration activations reaching it are NaN/Inf (from the "
                            "data, or from NaN/Inf weights before it); calibrate on finite data and a finite model")
        # Σx² per input column ([groups, K] for grouped convolutions), or the Hessian's diagonal
        energy = arrays.get("sq_sum", np.diagonal(arrays["gram"], axis1=-2, axis2=-1) if "gram" in arrays else None)
        if energy is None:
            continue
        if not energy.any():
            raise UserError(f"{target.node_name}: the calibration activations reaching it are all zero, so {method} "
                            "has nothing to rank by (it would prune from noise); calibrate on data that exercises "
                            "the model, or use a data-free method such as magnitude")
        tokens = int(entry.get("tokens", 0))
        if "sum" in arrays and tokens > 1:
            variance = energy / tokens - (arrays["sum"] / tokens) ** 2
            if (variance <= 1e-6 * energy / tokens).all():
                constant.append(target.node_name)
    return constant


def constant_warning(layers: list[str], method: str) -> list[str]:
    if not layers:
        return []
    shown = ", ".join(layers[:3]) + (f" and {len(layers) - 3} more" if len(layers) > 3 else "")
    return [f"warning: the calibration activations are the same for every token at {shown} (constant data?): "
            f"{method} chose from what is in effect a single input"]


def check_options(options, method: str, needs: frozenset[str], takes_new_bias: bool) -> None:
    """Options the chosen method would silently ignore are refused, naming what to drop."""
    calib = options.calibration
    if not needs and options.allocation == "uniform":
        given = [flag for flag, used in (("--calib", calib.source), ("--stats", calib.stats_file),
                                         ("--one-shot", not calib.sequential), ("--tokenizer", calib.tokenizer))
                 if used]
        if given:
            raise UserError(f"{method} uses no calibration data: drop {', '.join(given)} (wanda, sparsegpt and mama "
                            "use it)")
    if options.add_bias and not takes_new_bias:
        raise UserError(f"--add-bias is for mama (a new bias takes the removed weights' mean); {method} would ignore "
                        "it: drop it or use -m mama")
