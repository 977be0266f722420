"""Optional dependencies: the core install prunes, inspects and benchmarks with numpy and
onnxruntime alone; everything heavier sits behind an extra, imported only where it is used.
A missing one ends the command with one line naming the extra that installs it."""

from __future__ import annotations

import importlib
from types import ModuleType

from onnxprune.errors import UserError, first_line

# Top-level module -> the pyproject extra that installs it.
EXTRA_OF = {"torch": "torch", "transformers": "hf", "tokenizers": "hf", "optimum": "hf", "datasets": "calib",
            "matplotlib": "plot", "ray": "ray", "onnxslim": "slim"}


class MissingExtra(UserError):
    """An optional dependency is not installed; the message names the extra."""


def missing_extra_message(module: str, purpose: str) -> str:
    extra = EXTRA_OF[module.partition(".")[0]]
    return f"{purpose} needs the [{extra}] extra: pip install 'onnxprune[{extra}]'"


def require(module: str, purpose: str) -> ModuleType:
    """Import `module` for `purpose` (e.g. "export"), or raise MissingExtra saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        message = missing_extra_message(module, purpose)
        missing = (exc.name or "").partition(".")[0]
        if missing not in EXTRA_OF:  # installed, but one of its own imports failed: say which
            message += f" (importing {module} failed: {first_line(exc)})"
        raise MissingExtra(message) from None


def is_available(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True

