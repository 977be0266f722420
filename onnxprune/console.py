"""What the CLI prints, by verbosity (git / polygraphy style).

- result lines (what the command computed): always on stdout;
- information (files written, tables around the result) and `note:` lines: hidden by -q;
- details (one line per layer, debug): only with -v, on stderr so stdout stays the result;
- `warning:` and `error:` lines: always on stderr.
With --json the result is one JSON document on stdout and no other line goes there.
"""

from __future__ import annotations

import json
import sys

from rich.console import Console

QUIET, NORMAL, VERBOSE = -1, 0, 1

_state = {"level": NORMAL, "json": False}
stdout = Console(width=None if sys.stdout.isatty() else 160)  # pipes and CI logs get wide tables


def configure(level: int | None = None, as_json: bool | None = None) -> None:
    if level is not None:
        _state["level"] = level
    if as_json is not None:
        _state["json"] = as_json


def is_quiet() -> bool:
    return _state["level"] <= QUIET


def is_verbose() -> bool:
    return _state["level"] >= VERBOSE


def json_mode() -> bool:
    return _state["json"]


def result(renderable) -> None:
    """The command's result; replaced by the JSON document with --json."""
    if not _state["json"]:
        _print(renderable)


def info(renderable) -> None:
    if not _state["json"] and not is_quiet():
        _print(renderable)


def _print(renderable) -> None:
    if isinstance(renderable, str):  # text as it is: no markup, no wrapping (generated text, Markdown tables)
        print(renderable)
    else:
        stdout.print(renderable)


def note(text: str) -> None:
    if not is_quiet():
        print(f"note: {text}", file=sys.stderr)


def warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr)


def detail(text: str) -> None:
    if is_verbose():
        print(text, file=sys.stderr)


def emit_json(document) -> None:
    """The --json result: the whole of stdout."""
    if _state["json"]:
        print(json.dumps(document, indent=2, default=str))
