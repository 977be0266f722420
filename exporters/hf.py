"""Hugging Face model (hub id or local directory) → ONNX, through optimum's exporter.

Causal LMs are exported without a KV cache by default: calibration, perplexity and pruning need
one full-sequence graph, and a cache adds inputs every later stage would have to feed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from onnxprune.atomic import staging_dir
from onnxprune.errors import UserError, first_line
from onnxprune.extras import require

# Architecture class suffix → optimum task, for local directories (optimum infers tasks from the hub only).
_TASK_BY_SUFFIX = [
    ("ForCausalLM", "text-generation"),
    ("LMHeadModel", "text-generation"),
    ("ForMaskedLM", "fill-mask"),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForMultipleChoice", "multiple-choice"),
    ("ForConditionalGeneration", "text2text-generation"),
    ("ForImageClassification", "image-classification"),
]


def infer_task(model: str) -> str:
    local = Path(model)
    if local.is_dir():
        config_file = local / "config.json"
        if not config_file.is_file():
            raise UserError(f"{model} has no config.json; is it a Hugging Face model directory?")
        architectures = json.loads(config_file.read_text()).get("architectures") or []
        for architecture in architectures:
            for suffix, task in _TASK_BY_SUFFIX:
                if architecture.endswith(suffix):
                    return task
        return "feature-extraction"
    from optimum.exporters.tasks import TasksManager

    try:
        return TasksManager.infer_task_from_model(model)
    except Exception as exc:
        raise UserError(f"cannot infer the task of {model} ({first_line(exc)}); pass --task") from None


def export_hf(model: str, out_dir: str | Path, task: str = "auto", with_past: bool = False,
              opset: int | None = None, dtype: str = "fp32", validate: bool = False) -> Path:
    """Export `model` into `out_dir`; returns the path of the main .onnx file."""
    onnx_exporter = require("optimum.exporters.onnx", "export")
    if _looks_like_path(model) and not Path(model).exists():
        raise UserError(f"model directory not found: {model}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output {out_dir} exists and is not a directory")
    task = infer_task(model) if task == "auto" else task
    if with_past and not task.endswith("-with-past"):
        task += "-with-past"
    with staging_dir(out_dir) as staging:  # a failed export leaves no partial folder behind
        try:
            onnx_exporter.main_export(model_name_or_path=model, output=staging, task=task, opset=opset, dtype=dtype,
                                      do_validation=validate)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            hint = "; try --dtype fp16 or fp32" if dtype != "fp32" else ""
            raise UserError(f"export of {model} with --dtype {dtype} failed: {first_line(exc)}{hint}") from None
        if not list(staging.glob("*.onnx")):
            raise UserError(f"export of {model} produced no .onnx file")
        out_dir.mkdir(parents=True, exist_ok=True)
        for entry in staging.iterdir():
            target = out_dir / entry.name
            if entry.is_dir() and target.is_dir():
                shutil.rmtree(target)
            os.replace(entry, target)
    onnx_files = sorted(out_dir.glob("*.onnx"))
    main = out_dir / "model.onnx"
    return main if main in onnx_files else onnx_files[0]


def _looks_like_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or Path(model).suffix != ""
