"""`--device`: where the solver passes compute (torch on a GPU, or the CPU) and which onnxruntime
execution provider calibrates. `auto` takes CUDA when torch sees a GPU; an explicit `cuda` without
one is an error. Calibration follows onto onnxruntime's CUDA provider when onnxruntime-gpu is
installed, else it stays on the CPU and says so once (the solves still run on the GPU)."""

from __future__ import annotations

from dataclasses import dataclass

from onnxprune.errors import UserError
from onnxprune.extras import is_available

DEVICES = ("auto", "cpu", "cuda")
CPU_PROVIDERS = ("CPUExecutionProvider",)


@dataclass(frozen=True)
class Placement:
    device: str  # cpu | cuda: where torch solves run
    providers: tuple[str, ...]  # onnxruntime providers for calibration, best first
    note: str | None = None  # said once when calibration cannot follow the solves onto the GPU


def torch_sees_cuda() -> bool:
    if not is_available("torch"):
        return False
    import torch

    return bool(torch.cuda.is_available())


def place(device: str = "auto", solves: bool = True, calibrates: bool = True) -> Placement:
    """Where a method computes; `solves`: it has torch solves (sparsegpt, mama); `calibrates`: it
    runs calibration. Without solves, `auto` looks at onnxruntime's providers only, so a
    data-free or numpy method never imports torch."""
    if device not in DEVICES:
        raise UserError(f"--device must be one of {', '.join(DEVICES)}, not {device!r}")
    if device == "cpu" or not (solves or calibrates):
        return Placement("cpu", CPU_PROVIDERS)
    import onnxruntime as ort

    ort_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if solves and not torch_sees_cuda():
        if device == "cuda":
            reason = "torch is not installed" if not is_available("torch") else "torch sees no CUDA GPU"
            raise UserError(f"--device cuda: {reason} (the GPU solves run in torch: install a CUDA build of "
                            "torch, or use --device cpu)")
        return Placement("cpu", CPU_PROVIDERS)
    if not solves and device == "auto" and not ort_cuda:
        return Placement("cpu", CPU_PROVIDERS)
    if ort_cuda:
        return Placement("cuda", ("CUDAExecutionProvider", *CPU_PROVIDERS))
    return Placement("cuda", CPU_PROVIDERS,
                     "calibration runs on onnxruntime's CPU provider (this onnxruntime has no CUDA provider: "
                     "pip uninstall -y onnxruntime && pip install 'onnxprune[gpu]')"
                     + ("; the solves run on the GPU" if solves else ""))
