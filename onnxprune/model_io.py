"""Loading and saving ONNX models.

We build on onnx-ir: it keeps external-data tensors as lazy memory maps, so a model over 2 GB is
never read whole, and on save it streams untouched tensors straight from the input file. Saving
is atomic: files are written into a temporary folder next to the output and renamed into place,
weights first, so a reader never sees a half-written model and the input is never touched.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx_ir as ir

from onnxprune.atomic import staging_dir
from onnxprune.errors import UserError, first_line

# Protobuf refuses messages over 2 GiB; stay well below it before switching to external data.
EXTERNAL_DATA_THRESHOLD_BYTES = 1536 * 1024 * 1024


def load_model(path: str | os.PathLike) -> ir.Model:
    path = Path(path)
    if not path.exists():
        raise UserError(f"model file not found: {path}")
    if path.is_dir():
        candidate = path / "model.onnx"
        if not candidate.is_file():
            raise UserError(f"{path} is a directory without model.onnx; pass the .onnx file")
        path = candidate
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty (0 bytes), not an ONNX model; was it copied or exported completely?")
    try:
        model = ir.load(path)
    except Exception as exc:  # protobuf's DecodeError and friends: the file is not a model
        raise UserError(f"{path} is not a readable ONNX model ({first_line(exc)})") from None
    _check_external_data(model, path)
    return model


def _check_external_data(model: ir.Model, path: Path) -> None:
    """Weights kept in external files are read lazily: a missing or short file must fail here, not mid-run."""
    sizes: dict[Path, int | None] = {}
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        data = Path(tensor.base_dir) / tensor.location
        if data not in sizes:
            sizes[data] = data.stat().st_size if data.is_file() else None
        if sizes[data] is None:
            raise UserError(f"{path} keeps weight {value.name} in {tensor.location}, which is missing beside it "
                            f"({data}); copy the data file next to the model")
        end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
        if end > sizes[data]:
            raise UserError(f"{data} is {sizes[data]:,} bytes but weight {value.name} ends at byte {end:,}: the data "
                            "file is truncated or belongs to another model; copy it again")


def resolve_model_path(path: str | os.PathLike) -> Path:
    """The .onnx file a user meant: the path itself, or model.onnx inside a directory."""
    path = Path(path)
    return path / "model.onnx" if path.is_dir() else path


def initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def uses_external_data(model: ir.Model) -> bool:
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())


def check_output_path(input_path: str | os.PathLike, output_path: str | os.PathLike) -> Path:
    """Refuse an output that would overwrite the input model or its external data."""
    src = resolve_model_path(input_path).resolve()
    out = Path(output_path)
    if out.suffix != ".onnx":
        raise UserError(f"output path must end in .onnx: {out}")
    if out.resolve() == src:
        raise UserError(f"output path {out} is the input model; choose another -o")
    external = external_data_file(out).resolve()
    if external.exists() and external.parent == src.parent and external.name in external_files_of(src):
        raise UserError(f"output {out} would overwrite the input's external data {external.name}")
    return out


def save_model(model: ir.Model, output_path: str | os.PathLike, external_data: bool | None = None) -> Path:
    """Write `model` atomically; `external_data=None` chooses it for large or externally stored models."""
    out = Path(output_path)
    if external_data is None:
        external_data = uses_external_data(model) or initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES
    data_file = external_data_file(out)
    with staging_dir(out) as staging:
        staged_model = staging / out.name
        if external_data:
            ir.save(model, staged_model, external_data=data_file.name)
            os.replace(staging / data_file.name, data_file)
        else:
            # Tensors still read lazily from the input's external data would otherwise be saved as
            # references to a data file that is not beside the output: bring them inline.
            ir.external_data.load_to_model(model)
            ir.save(model, staged_model)
        os.replace(staged_model, out)
    return out


def external_data_file(model_path: Path) -> Path:
    return model_path.with_name(model_path.name + ".data")


def external_files_of(model_path: Path) -> set[str]:
    """Names of the external data files an existing model refers to (empty if unreadable)."""
    if not model_path.is_file():
        return set()
    try:
        import onnx

        proto = onnx.load(str(model_path), load_external_data=False)
    except Exception:
        return set()
    names = set()
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                names.add(entry.value)
    return names
