"""The tensors that cross from one calibration segment to the next, for every sample.

Held in memory up to a budget; past it, each new tensor is written to a temporary directory and
memory-mapped, so memory stays bounded by the block in flight and the statistics, not by the
number of samples (the references keep all of `inps`/`outs` in memory instead).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

# Default in-memory budget; ONNXPRUNE_CACHE_MB overrides it (0 keeps everything on disk).
DEFAULT_BUDGET_MB = 4096


class BoundaryCache:
    def __init__(self, samples: int, budget_bytes: int | None = None) -> None:
        if budget_bytes is None:
            budget_bytes = int(os.environ.get("ONNXPRUNE_CACHE_MB", DEFAULT_BUDGET_MB)) * 1024 * 1024
        self.samples = samples
        self.budget = budget_bytes
        self.in_memory = 0
        self._values: dict[str, list[np.ndarray | None]] = {}
        self._directory: Path | None = None
        self._files = 0

    def __contains__(self, name: str) -> bool:
        return name in self._values

    def get(self, name: str, sample: int) -> np.ndarray:
        return self._values[name][sample]

    def put(self, name: str, sample: int, array: np.ndarray) -> None:
        """Store one sample's tensor, replacing what `name` held for that sample."""
        slots = self._values.setdefault(name, [None] * self.samples)
        self._release(slots[sample])
        if self.in_memory + array.nbytes <= self.budget:
            self.in_memory += array.nbytes
            slots[sample] = array
        else:
            slots[sample] = self._spill(array)

    def keep_only(self, names: set[str]) -> None:
        for name in [n for n in self._values if n not in names]:
            for array in self._values.pop(name):
                self._release(array)

    def close(self) -> None:
        self._values.clear()
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None

    def _spill(self, array: np.ndarray) -> np.ndarray:
        if self._directory is None:
            self._directory = Path(tempfile.mkdtemp(prefix="onnxprune-cache-"))
        self._files += 1
        path = self._directory / f"{self._files}.npy"
        np.save(path, np.ascontiguousarray(array))
        return np.load(path, mmap_mode="r")

    def _release(self, array: np.ndarray | None) -> None:
        if array is None:
            return
        if isinstance(array, np.memmap):
            Path(array.filename).unlink(missing_ok=True)
        else:
            self.in_memory -= array.nbytes
