"""Pruned weights of external-data models live on disk, memory-mapped, not in private memory.

An external-data model is never read whole: its weights are memory maps of the input's data file
(file-backed pages, which the kernel drops and re-reads at will). A pruned weight replaces one of
them; kept as an in-memory tensor it would stay in private memory until the model is saved, so
memory would grow with every pruned layer. Instead it is written to a file of its own and
replaced by an `ir.ExternalTensor` on that file: reads map it, and the save copies it file to
file (onnx-ir's `tofile`), never whole in memory. A weight that was in memory (a model without
external data) stays in memory, as before.

Where: inside `spilling_beside(output)` (apply), a staging folder beside the output, on the disk
that must hold the pruned model anyway, removed when the block ends; elsewhere (the Python API,
whose output is not known yet) a folder in TMPDIR, each file removed when its tensor is garbage
collected and the folder at exit. A signal the CLI turns into an exception exits normally; a
folder a SIGKILL left behind is removed by the next run (atomic.py's staging names say whose).
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx_ir as ir

from onnxprune.atomic import remove_stale_staging, staging_dir, staging_prefix

_local = threading.local()  # .folders: the spilling_beside folders open in this thread, innermost last
_lock = threading.Lock()
_process_folder: Path | None = None
_names = itertools.count()


def replacement(previous: ir.TensorProtocol | None, tensor: ir.Tensor) -> ir.TensorProtocol:
    """What replaces `previous` in the IR: `tensor` spilled to disk when `previous` was read from
    external data (or was spilled itself), else `tensor` as it is."""
    return spill(tensor) if isinstance(previous, ir.ExternalTensor) else tensor


def spill(tensor: ir.Tensor) -> ir.ExternalTensor:
    """`tensor` written to a file of its own, as a file-backed tensor on it (the file goes with it)."""
    folder = _folder()
    location = f"{next(_names)}.bin"
    path = folder / location
    with open(path, "wb") as file:
        tensor.tofile(file)  # little-endian, sub-byte types packed: what ExternalTensor reads back
    mapped = ir.ExternalTensor(location, 0, tensor.nbytes, tensor.dtype, shape=tensor.shape, name=tensor.name,
                               base_dir=str(folder))
    weakref.finalize(mapped, path.unlink, missing_ok=True)
    return mapped


@contextmanager
def spilling_beside(path: str | os.PathLike) -> Iterator[Path]:
    """Spill into a staging folder beside `path` while the block runs; the folder (and every
    tensor spilled into it) is gone afterwards, so save the model inside the block."""
    folders = _local.__dict__.setdefault("folders", [])
    with staging_dir(path) as folder:
        folders.append(folder)
        try:
            yield folder
        finally:
            folders.remove(folder)


def _folder() -> Path:
    folders = getattr(_local, "folders", None)
    if folders:
        return folders[-1]
    global _process_folder
    with _lock:
        if _process_folder is None or not _process_folder.is_dir():
            anchor = Path(tempfile.gettempdir()) / "onnxprune-weights"
            remove_stale_staging(anchor)
            _process_folder = Path(tempfile.mkdtemp(prefix=staging_prefix(anchor), dir=anchor.parent))
            atexit.register(shutil.rmtree, _process_folder, ignore_errors=True)
        return _process_folder
