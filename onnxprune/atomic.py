"""Atomic file output: write to a staging file beside the target, rename it into place on success.

A reader never sees a half-written file, and a failure leaves the old file (or none) behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A staging path with `path`'s suffix (writers such as np.savez and savefig go by it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(handle)
    try:
        yield Path(staging)
        os.replace(staging, path)
    finally:
        Path(staging).unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as staging:
        staging.write_text(text, encoding="utf-8")
    return Path(path)
