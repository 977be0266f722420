"""Calibration samples: one onnxruntime feed dict per sample, from text windows or a .npz file;
and the record of which data a run used, with its hash, so a report alone reproduces the run."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxprune.data import (calibration_windows, check_inputs_match, is_tensor_source, load_sample_feeds, load_tokenizer,
                            model_feeds, stacked_feeds)
from onnxprune.errors import UserError


@dataclass
class CalibrationOptions:
    source: str | None = None  # wikitext2 | c4 | ptb | .txt | .jsonl | .npz | directory of .npz
    nsamples: int = 128
    seqlen: int = 2048
    tokenizer: str | None = None
    seed: int = 0
    sequential: bool = True
    stats_file: str | None = None  # precomputed statistics (one-shot) instead of calibrating


def calibration_samples(model_path, input_names: list[str], options: CalibrationOptions) -> list[dict[str, np.ndarray]]:
    if options.source is None:
        raise UserError("this method needs calibration data: pass --calib wikitext2|c4|ptb|FILE.txt|FILE.jsonl|FILE.npz|DIR-of-npz "
                        "(or --stats from `onnxprune calibrate`)")
    if is_tensor_source(options.source):  # each sample runs as it comes (a batch of one), like the text windows
        return load_sample_feeds(options.source, input_names, limit=options.nsamples)
    tokenizer = load_tokenizer(model_path, options.tokenizer)
    windows = calibration_windows(tokenizer, options.source, options.nsamples, options.seqlen, options.seed)
    return [model_feeds(input_names, window[None]) for window in windows]


def samples_from_python(calib, input_names: list[str], nsamples: int) -> list[dict[str, np.ndarray]]:
    """Samples given from Python, at most `nsamples`, each run as its own batch:
    - a dict of arrays named after the inputs, first axis = samples (what a .npz holds);
    - an array whose first axis is samples: token-id windows [samples, seqlen] for a text model
      (attention mask and positions filled in), else the tensors of a one-input model;
    - a list of feed dicts {input name: array}, or of arrays as the list of such an array's rows."""
    if isinstance(calib, dict):
        return stacked_feeds(calib, input_names, limit=nsamples)
    items = list(calib)[:nsamples]
    if not items:
        raise UserError("calib= holds no samples")
    if all(isinstance(item, dict) for item in items):
        for item in items:
            check_inputs_match(input_names, item)
        return [{name: np.asarray(a) for name, a in item.items()} for item in items]
    rows = [np.asarray(item)[None] for item in items]
    if "input_ids" in input_names and all(row.dtype.kind in "iu" for row in rows):
        return [model_feeds(input_names, row.reshape(1, -1)) for row in rows]
    if len(input_names) == 1:
        return [{input_names[0]: row} for row in rows]
    raise UserError(f"calib= arrays fit a one-input model or token ids for input_ids; this model takes "
                    f"{', '.join(input_names)}: pass feed dicts {{name: array}} instead")


def calibration_record(options: CalibrationOptions, nsamples: int) -> dict:
    """The source and how it was drawn, with a sha256: of the file for a local file, of the data
    set name and drawing parameters for a named data set (whose content the hub versions)."""
    record = {"source": str(options.source), "nsamples": nsamples, "seqlen": options.seqlen, "seed": options.seed,
              "sequential": options.sequential}
    if options.tokenizer:
        record["tokenizer"] = str(options.tokenizer)
    path = Path(str(options.source))
    if path.is_file():
        record.update(sha256=file_sha256(path), hash_of="file")
    elif path.is_dir():  # a directory of .npz samples: every file's name and content
        digest = hashlib.sha256()
        for file in sorted(path.glob("*.npz")):
            digest.update(f"{file.name}:{file_sha256(file)}".encode())
        record.update(sha256=digest.hexdigest(), hash_of="files")
    else:
        drawn = {key: record[key] for key in ("source", "nsamples", "seqlen", "seed")}
        record.update(sha256=hashlib.sha256(json.dumps(drawn, sort_keys=True).encode()).hexdigest(),
                      hash_of="data set name and parameters")
    return record


def samples_record(samples: list[dict[str, np.ndarray]], options: CalibrationOptions) -> dict:
    """Samples given in memory: their count and a sha256 over every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for sample in samples:
        for name in sorted(sample):
            array = np.ascontiguousarray(sample[name])
            digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
            digest.update(array.tobytes())
    return {"source": "in-memory samples", "nsamples": len(samples), "sequential": options.sequential,
            "sha256": digest.hexdigest(), "hash_of": "tensors"}


def stats_file_record(path) -> dict:
    return {"source": "statistics file", "stats_file": str(path), "sha256": file_sha256(Path(path)), "hash_of": "file"}


def calibration_metadata(record: dict) -> dict[str, str]:
    """The calibration record as one metadata_props entry (JSON), when calibration data was used."""
    return {"calibration": json.dumps(record, sort_keys=True)} if record else {}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
