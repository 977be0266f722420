"""`--device`: where the solver passes run and which onnxruntime provider calibrates. On a machine
without a GPU the choices are checked by faking what torch and onnxruntime report; the GPU run
itself is compared with the CPU one when a GPU is present."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from conftest import assert_user_error, cli
from graphs import Dense, chain_model, save

import onnxprune.device as device_module
from onnxprune.device import place
from onnxprune.errors import UserError

CPU = ("CPUExecutionProvider",)


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(device_module, "torch_sees_cuda", lambda: False)


@pytest.fixture
def gpu_without_ort_cuda(monkeypatch):
    monkeypatch.setattr(device_module, "torch_sees_cuda", lambda: True)
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(CPU))


@pytest.fixture
def chain(tmp_path):
    model = save(chain_model([Dense("Gemm", 32, 48, True, bias=True), Dense("Gemm", 48, 24, True)]),
                 tmp_path / "chain.onnx")
    np.savez(tmp_path / "calib.npz", X=np.random.default_rng(0).standard_normal((16, 32)).astype(np.float32))
    return model, tmp_path / "calib.npz"


def test_cpu_and_auto_without_a_gpu(no_gpu):
    assert place("cpu") == place("auto") == place("auto", solves=False) == place("cuda", False, False)
    assert place("auto").device == "cpu" and place("auto").providers == CPU and place("auto").note is None


def test_cuda_without_a_gpu_is_an_error_for_the_solver_methods(no_gpu, chain, tmp_path):
    with pytest.raises(UserError, match="--device cuda"):
        place("cuda", solves=True)
    model, calib = chain
    line = assert_user_error(cli("apply", model, "-m", "sparsegpt", "-s", 0.5, "--calib", calib, "--device", "cuda",
                                 "-o", tmp_path / "out.onnx"))
    assert "--device cuda" in line and "--device cpu" in line
    assert not (tmp_path / "out.onnx").exists()
    assert "--device must be one of" in assert_user_error(cli("apply", model, "-s", 0.5, "--device", "tpu",
                                                               "-o", tmp_path / "out.onnx"))


def test_gpu_solves_with_calibration_left_on_the_cpu_say_so(gpu_without_ort_cuda):
    placement = place("auto")
    assert placement.device == "cuda" and placement.providers == CPU
    assert "onnxprune[gpu]" in placement.note
    # a method without torch solves does not take the GPU unless onnxruntime can
    assert place("auto", solves=False).device == "cpu"


def test_cuda_provider_first_when_onnxruntime_has_it(monkeypatch):
    monkeypatch.setattr(device_module, "torch_sees_cuda", lambda: True)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *CPU])
    placement = place("auto")
    assert placement.providers == ("CUDAExecutionProvider", *CPU) and placement.note is None


def test_the_placement_reaches_the_solves_and_calibration(gpu_without_ort_cuda, monkeypatch, chain, tmp_path):
    """apply hands the device to the solver pass and the providers to every calibration session."""
    import onnxprune.calibration as calibration
    import onnxprune.passes.sparsegpt as sparsegpt
    from onnxprune.array_backend import NUMPY

    devices, providers = [], []
    monkeypatch.setattr(sparsegpt, "backend", lambda name, purpose, device: devices.append(device) or NUMPY)
    monkeypatch.setattr("onnxprune.pipeline.place", lambda *a, **k: device_module.Placement(
        "cuda", ("CUDAExecutionProvider", *CPU), "calibration note"))
    real_session = calibration.ort.InferenceSession

    def session(*args, **kwargs):
        providers.append(kwargs["providers"])
        return real_session(*args, **{**kwargs, "providers": list(CPU)})

    monkeypatch.setattr(calibration.ort, "InferenceSession", session)
    model, calib = chain
    result = cli("apply", model, "-m", "sparsegpt", "-s", 0.5, "--calib", calib, "-o", tmp_path / "out.onnx").ok()
    assert devices and set(devices) == {"cuda"}
    assert providers and all(p[0] == "CUDAExecutionProvider" for p in providers)
    assert "calibration note" in result.out + result.err


@pytest.mark.skipif(not device_module.torch_sees_cuda(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["sparsegpt", "mama"])
def test_gpu_solves_match_the_cpu(chain, tmp_path, method):
    from conftest import initializers

    model, calib = chain
    for device in ("cpu", "cuda"):
        cli("apply", model, "-m", method, "-s", 0.5, "--calib", calib, "--device", device, "-o", tmp_path / f"{device}.onnx").ok()
    cpu, gpu = initializers(tmp_path / "cpu.onnx"), initializers(tmp_path / "cuda.onnx")
    for name in cpu:
        np.testing.assert_allclose(gpu[name], cpu[name], rtol=1e-3, atol=1e-4)
