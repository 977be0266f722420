"""Atomic file output: write to a staging file beside the target, rename it into place on success.

A reader never sees a half-written file, and a failure leaves the old file (or none) behind.
Staging names say whose they are (`.NAME.onnxprune-HOST-PID-xxxx`): the staging a signal
interrupts is removed on the way out, and one left by a SIGKILL (its process gone) is removed by
the next run that writes the same output.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from onnxprune.errors import os_user_error

_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"
_ABANDONED_AFTER_S = 24 * 3600  # another host's staging (or a reused pid's) counts as left behind after this


def staging_prefix(path: Path) -> str:
    return f".{path.name}.onnxprune-{_HOST}-{os.getpid()}-"


@contextmanager
def staging_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A fresh folder beside `path` for its files; removed afterwards, whatever happens."""
    path = Path(path)
    with _staged(path, lambda: Path(tempfile.mkdtemp(prefix=staging_prefix(path), dir=path.parent))) as staging:
        yield staging


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A staging path with `path`'s suffix (writers such as np.savez and savefig go by it)."""
    path = Path(path)

    def staging_file() -> Path:
        handle, staging = tempfile.mkstemp(prefix=staging_prefix(path), suffix=path.suffix, dir=path.parent)
        os.close(handle)
        return Path(staging)

    with _staged(path, staging_file) as staging:
        yield staging
        os.replace(staging, path)


@contextmanager
def _staged(path: Path, create: Callable[[], Path]) -> Iterator[Path]:
    with _writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(path)
        staging = create()
        try:
            yield staging
        finally:
            _remove(staging)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as staging:
        staging.write_text(text, encoding="utf-8")
    return Path(path)


def remove_stale_staging(path: Path) -> list[Path]:
    """Remove staging left beside `path` by a run that was killed: this host's whose process is
    gone, or anyone's untouched for a day. Returns what was removed."""
    pattern = re.compile(re.escape(f".{path.name}.onnxprune-") + r"(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-")
    removed = []
    for entry in path.parent.glob(f".{glob.escape(path.name)}.onnxprune-*"):
        match = pattern.match(entry.name)
        if match is None:
            continue
        mine = match["host"] == _HOST
        if (mine and not _alive(int(match["pid"]))) or time.time() - entry.lstat().st_mtime > _ABANDONED_AFTER_S:
            _remove(entry)
            removed.append(entry)
    return removed


def _remove(entry: Path) -> None:
    if entry.is_dir():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """A full disk, a read-only folder, a path under a file: one line naming the output and the fix."""
    try:
        yield
    except OSError as exc:
        error = os_user_error(exc, path)
        if error is None:
            raise
        raise error from None
