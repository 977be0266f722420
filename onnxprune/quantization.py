"""Quantize a pruned model with onnxruntime's quantizer, keeping every pruned weight exactly zero.

Modes (onnxruntime.quantization):
  int8-static   QDQ, int8 weights per channel and int8 activations, both symmetric (what TensorRT
                takes), activation ranges calibrated (MinMax) on the same samples as pruning
  int8-dynamic  int8 weights (symmetric, per channel), activations quantized at run time
                (MatMulInteger / DynamicQuantizeMatMul): no calibration data
  int4          4-bit blockwise MatMulNBits for LLM MatMuls (MatMul4BitsQuantizer / MatMulNBitsQuantizer),
                symmetric blocks

Symmetric weight quantization maps 0.0 to code 0 (int8) or to the fixed zero point 8 (4-bit), so
pruned weights stay zero and an N:M pattern survives. That is checked, not assumed: the
quantized weights are read back in the quantized domain (`onnxprune.quantized`) and compared
layer by layer with the input (`layer_checks.survival_problems`); a lost zero fails the run
(`SparsityLost`, exit code 3) unless `check=False`.
"""

from __future__ import annotations

import logging
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxprune.errors import CheckFailed, UserError, first_line
from onnxprune.model_io import load_model, resolve_model_path, save_model

MODES = ("int8-static", "int8-dynamic", "int4")
WEIGHT_OPS = ("MatMul", "Gemm", "Conv")


class SparsityLost(CheckFailed):
    """Quantization changed a pruned (zero) weight."""


@dataclass
class QuantizeOptions:
    mode: str = "int8-static"
    per_channel: bool = True
    block_size: int = 128  # int4: weights per quantization block along K (a power of two, >= 16)
    compressed: bool = False  # store the int8 weights as bitmask + non-zeros (exporters/compressed.py)


def check_options(options: QuantizeOptions) -> None:
    if options.mode not in MODES:
        raise UserError(f"quantization mode must be one of {', '.join(MODES)}, got {options.mode!r}")
    if options.block_size < 16 or options.block_size & (options.block_size - 1):
        raise UserError(f"block_size must be a power of two >= 16, got {options.block_size}")
    if options.compressed and options.mode == "int4":
        raise UserError("compressed storage takes int8 weights; int4 MatMulNBits packs its own")


def quantize_model(model: ir.Model, options: QuantizeOptions, samples: list[dict[str, np.ndarray]] | None = None,
                   check: bool = True) -> tuple[ir.Model, dict]:
    """A quantized copy of `model` and its report: {mode, layers, zeros_before, zeros_after, problems, ...}."""
    from onnxprune.patterns import parse_pattern
    from onnxprune.layer_checks import layer_checks, survival_problems

    check_options(options)
    if options.mode == "int8-static" and not samples:
        raise UserError("int8-static quantization calibrates activation ranges: give calibration data "
                        "(--calib, or calib= in Python), or use int8-dynamic")
    recorded = model.metadata_props.get("onnxprune.pattern", "")
    pattern = parse_pattern(recorded, None) if ":" in recorded else None
    before = layer_checks(model, pattern)
    with tempfile.TemporaryDirectory(prefix="onnxprune-quantize-") as scratch:
        staged = Path(scratch) / "quantized.onnx"
        try:
            with _quiet_root_logger():  # the quantizer logs advice on every call through `logging`
                _QUANTIZERS[options.mode](ir.to_proto(model), staged, options, samples)
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"onnxruntime's quantizer failed ({options.mode}): {first_line(exc)}") from None
        quantized = load_model(staged)
        ir.external_data.load_to_model(quantized)  # the scratch folder goes away
    after = layer_checks(quantized, pattern)
    problems = survival_problems(before, after, options.mode)
    quantized.metadata_props.update({**model.metadata_props, "onnxprune.quantization": options.mode})
    report = {"mode": options.mode, "per_channel": options.per_channel,
              "block_size": options.block_size if options.mode == "int4" else None,
              "quantized_layers": sum(r.storage != "float" for r in after),
              "zeros_before": sum(r.zeros for r in before if r.zeros),
              "zeros_kept": not problems, "pattern": pattern.label if pattern else None,
              "pattern_layers_after": sum(bool(r.pattern_valid) for r in after), "problems": problems}
    if check and problems:
        raise SparsityLost(f"{options.mode} quantization did not keep the pruned weights zero: {problems[0]}"
                           + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    if options.compressed:
        from onnxprune.exporters.compressed import compress_quantized

        report["compressed"] = compress_quantized(quantized)["totals"]
    return quantized, report


def quantize_file(input_path, output_path, mode: str = "int8-static", samples=None, check: bool = True,
                  **options) -> dict:
    """`quantize_model` from one file into another (written atomically; the input is never touched)."""
    model = load_model(resolve_model_path(input_path))
    quantized, report = quantize_model(model, QuantizeOptions(mode, **options), samples, check)
    save_model(quantized, output_path)
    return report


@contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _static(proto, out: Path, options: QuantizeOptions, samples) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._samples = iter(samples)

        def get_next(self):
            return next(self._samples, None)

    quantize_static(proto, out, Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=list(WEIGHT_OPS),
                    per_channel=options.per_channel, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    extra_options={"WeightSymmetric": True, "ActivationSymmetric": True})


def _dynamic(proto, out: Path, options: QuantizeOptions, samples) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(proto, out, op_types_to_quantize=["MatMul", "Gemm"], per_channel=options.per_channel,
                     weight_type=QuantType.QInt8, extra_options={"WeightSymmetric": True})


def _int4(proto, out: Path, options: QuantizeOptions, samples) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(proto, bits=4, block_size=options.block_size, is_symmetric=True,
                                     op_types_to_quantize=("MatMul",))
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=False)


_QUANTIZERS = {"int8-static": _static, "int8-dynamic": _dynamic, "int4": _int4}
