"""The files that travel with a model: its tokenizer and Hugging Face configs.

`onnxprune export` writes them beside model.onnx and `eval` / `generate` look for them there, so a
pruned model written elsewhere gets copies beside it (never over a file already there), and its
metadata_props record the folder they came from for when only the .onnx is moved on.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from onnxprune.atomic import atomic_path
from onnxprune.model_io import load_model

# Tokenizer files of every tokenizers / sentencepiece flavour transformers reads, and the configs.
COMPANION_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "vocab.json", "vocab.txt", "merges.txt", "preprocessor_config.json",
                   "chat_template.jinja")
SOURCE_KEY = "onnxprune.companions_from"  # metadata_props: the folder the tokenizer / config came from


def companions_in(folder: str | os.PathLike | None) -> list[Path]:
    if folder is None or not Path(folder).is_dir():
        return []
    return [Path(folder) / name for name in COMPANION_FILES if (Path(folder) / name).is_file()]


def companion_source(model_path: str | os.PathLike | None, tokenizer_dir: str | os.PathLike | None) -> Path | None:
    """Where a pruned model's companions come from: beside the input, else the --tokenizer folder."""
    for folder in (None if model_path is None else Path(model_path).parent, tokenizer_dir):
        if companions_in(folder):
            return Path(folder).resolve()
    return None


def carry_companions(source: Path | None, output_dir: str | os.PathLike) -> list[str]:
    """Copy the companion files from `source` into `output_dir` (atomically each, skipping names
    already there: those are the user's); returns the names copied."""
    output_dir = Path(output_dir)
    if source is None or source == output_dir.resolve():
        return []
    copied = []
    for path in companions_in(source):
        target = output_dir / path.name
        if target.exists():
            continue
        with atomic_path(target) as staging:
            shutil.copyfile(path, staging)
        copied.append(path.name)
    return copied


def recorded_source(model_path: Path) -> Path | None:
    """The companions' folder recorded in the model's metadata_props, if it still exists."""
    if not model_path.is_file():
        return None
    recorded = load_model(model_path).metadata_props.get(SOURCE_KEY)
    return Path(recorded) if recorded and Path(recorded).is_dir() else None
