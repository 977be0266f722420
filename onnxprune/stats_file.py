"""Saving calibration statistics once (`onnxprune calibrate`) for reuse (`apply --stats`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from onnxprune.atomic import atomic_path
from onnxprune.errors import UserError

_INDEX = "__index__"


def save_stats(path: str | os.PathLike, stats: dict[str, dict], metadata: dict) -> Path:
    """One entry per distinct statistics dict (targets sharing an input share it), written atomically."""
    path = Path(path)
    slots: dict[int, int] = {}
    arrays: dict[str, np.ndarray] = {}
    index = {"metadata": metadata, "targets": {}}
    for name, entry in stats.items():
        slot = slots.setdefault(id(entry), len(slots))
        index["targets"][name] = slot
        for key, value in entry.items():
            arrays[f"s{slot}.{key}"] = np.asarray(value)
    arrays[_INDEX] = np.array(json.dumps(index))
    with atomic_path(path) as staging:
        np.savez(staging, **arrays)
    return path


def load_stats(path: str | os.PathLike) -> tuple[dict[str, dict], dict]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"statistics file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            index = json.loads(str(archive[_INDEX]))
            by_slot: dict[int, dict] = {}
            for key in archive.files:
                if key != _INDEX:
                    slot, stat = key.split(".", 1)
                    value = archive[key]
                    by_slot.setdefault(int(slot[1:]), {})[stat] = value.item() if value.ndim == 0 else value
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{path} is not an onnxprune statistics file ({exc})") from None
    return {name: by_slot[slot] for name, slot in index["targets"].items()}, index["metadata"]
