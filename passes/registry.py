"""Method registry: each module in this package registers its passes with `@register`."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from onnxprune.errors import UserError
from onnxprune.passes.base import PruningPass

_PASSES: dict[str, type[PruningPass]] = {}


def register(cls: type[PruningPass]) -> type[PruningPass]:
    if cls.name in _PASSES and _PASSES[cls.name] is not cls:
        raise RuntimeError(f"two passes are registered as {cls.name!r}")
    _PASSES[cls.name] = cls
    return cls


def _load_all() -> None:
    package = importlib.import_module("onnxprune.passes")
    for module in pkgutil.iter_modules(package.__path__):
        if module.name not in ("base", "registry"):
            importlib.import_module(f"onnxprune.passes.{module.name}")


def available() -> dict[str, type[PruningPass]]:
    _load_all()
    return dict(sorted(_PASSES.items()))


def takes_option(name: str, option: str) -> bool:
    """Whether the method `name` has a constructor option `option` (e.g. device)."""
    cls = available().get(name)
    return cls is not None and option in inspect.signature(cls.__init__).parameters


def get_pass(name: str, **options) -> PruningPass:
    """An instance of the method `name`; `options` (e.g. data_free=True) go to its constructor."""
    passes = available()
    if name not in passes:
        raise UserError(f"unknown method {name!r}; available: {', '.join(passes)}")
    cls = passes[name]
    accepted = inspect.signature(cls.__init__).parameters
    refused = [key for key in options if key not in accepted]
    if refused:
        raise UserError(f"method {name!r} takes no option {', '.join('--' + k.replace('_', '-') for k in refused)}")
    return cls(**options)
