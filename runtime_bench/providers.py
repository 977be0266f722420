"""User provider names (cpu, cuda, tensorrt) → onnxruntime execution providers and sessions.

A provider that this onnxruntime build lacks, or whose session cannot be created, is
*unavailable*: the benchmark reports it with the reason and goes on with the others.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

from onnxprune.errors import UserError, first_line
from onnxprune.model_io import resolve_model_path

ORT_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
_INSTALL_HINT = {"cuda": "install onnxruntime-gpu (pip install -e '.[gpu]') on a machine with CUDA",
                 "tensorrt": "install onnxruntime-gpu and TensorRT (pip install -e '.[tensorrt]')"}


class ProviderUnavailable(Exception):
    """This provider cannot run here; the message is the one-line reason shown to the user."""


@dataclass(frozen=True)
class ProviderSettings:
    threads: int | None = None  # intra-op threads (None: onnxruntime's default, one per core)
    fp16: bool = False  # TensorRT may pick fp16 kernels (trt_fp16_enable)
    # onnxruntime's intra-op threads spin for a while after each run. With two sessions run in
    # turn (model and baseline), one's spinning threads compete with the other's work, so the
    # benchmark turns spinning off for both then.
    spin: bool = True


def parse_providers(text: str) -> list[str]:
    """'cpu,cuda' → ['cpu', 'cuda'] (order kept, duplicates dropped); unknown names are a UserError."""
    names = list(dict.fromkeys(p.strip().lower() for p in text.split(",") if p.strip()))
    unknown = [n for n in names if n not in ORT_NAMES]
    if unknown or not names:
        raise UserError(f"--providers: unknown provider {', '.join(unknown) or repr(text)}; "
                        f"use a comma-separated list of {', '.join(ORT_NAMES)}")
    return names


def provider_chain(name: str, settings: ProviderSettings) -> list:
    """What `InferenceSession(providers=...)` gets: the provider (with options), then fallbacks for
    the nodes it cannot run (CPU always last, as onnxruntime wants)."""
    if name == "tensorrt":
        options = {"trt_sparsity_enable": True, "trt_fp16_enable": settings.fp16}
        return [(ORT_NAMES["tensorrt"], options), ORT_NAMES["cuda"], ORT_NAMES["cpu"]]
    if name == "cuda":
        return [ORT_NAMES["cuda"], ORT_NAMES["cpu"]]
    return [ORT_NAMES["cpu"]]


def unavailable_reason(name: str) -> str | None:
    """Why this onnxruntime cannot use provider `name`, or None when it is built in."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if ORT_NAMES[name] in available:
        return None
    return (f"onnxruntime {ort.__version__} has no {ORT_NAMES[name]} (it has {', '.join(available)}); "
            f"{_INSTALL_HINT.get(name, '')}").rstrip("; ")


def open_provider_session(model_path: str | os.PathLike, name: str, settings: ProviderSettings):
    """An InferenceSession that really runs on provider `name`, or ProviderUnavailable saying why not.

    onnxruntime quietly falls back to CPU when a GPU provider is built in but cannot start (no
    driver, missing CUDA/TensorRT libraries); that is caught here, so no CPU timing is ever
    reported under a GPU provider's name.
    """
    import onnxruntime as ort

    reason = unavailable_reason(name)
    if reason:
        raise ProviderUnavailable(reason)
    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: fallbacks and failed runs are reported by the benchmark, in one line
    if settings.threads:
        options.intra_op_num_threads = settings.threads
    if not settings.spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    path = resolve_model_path(model_path)
    try:
        with warnings.catch_warnings():  # onnxruntime warns of the fallback in many lines; one reason is enough
            warnings.simplefilter("ignore")
            session = ort.InferenceSession(str(path), sess_options=options, providers=provider_chain(name, settings))
    except Exception as exc:
        raise ProviderUnavailable(f"session creation failed: {first_line(exc)}") from None
    if session.get_providers()[0] != ORT_NAMES[name]:
        raise ProviderUnavailable(f"onnxruntime fell back to {session.get_providers()[0]} "
                                  f"({ORT_NAMES[name]} could not start: driver or libraries missing?)")
    return session
