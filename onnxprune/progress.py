"""Progress on stderr, silent with -q: rich bars on a terminal; in a log (not a terminal), one
line per calibrated block with its stage times and the time left, since a bar redrawn in place
shows nothing there until the job ends."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from onnxprune.console import is_quiet

T = TypeVar("T")
_console = Console(stderr=True)


def progress_bar(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    items = list(items) if total is None and not hasattr(items, "__len__") else items
    total = total if total is not None else len(items)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=_console, transient=True, disable=not _console.is_terminal or is_quiet()) as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)


class BlockProgress:
    """Per-block progress of calibration: `step(calibrate_s, prune_s)` after each block."""

    def __init__(self, total: int, description: str = "calibrating blocks") -> None:
        self.total, self.done, self.start = total, 0, time.perf_counter()
        self._bar = None
        if _console.is_terminal and not is_quiet():
            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       TextColumn("{task.fields[stages]}"))
            self._bar = Progress(*columns, console=_console, transient=True)
            self._task = self._bar.add_task(description, total=total, stages="")
            self._bar.start()

    def step(self, calibrate_s: float, prune_s: float) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        stages = f"calibrate {calibrate_s:.1f} s, prune {prune_s:.1f} s, eta {format_duration(eta)}"
        if self._bar is not None:
            self._bar.update(self._task, advance=1, stages=stages)
        elif not is_quiet():
            print(f"block {self.done}/{self.total}: {stages}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def format_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
