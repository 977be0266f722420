"""Calibration samples: one onnxruntime feed dict per sample, from text windows or a .npz file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxprune.data import calibration_windows, check_inputs_match, load_npz_inputs, load_tokenizer, model_feeds
from onnxprune.errors import UserError


@dataclass
class CalibrationOptions:
    source: str | None = None  # wikitext2 | c4 | ptb | .txt | .jsonl | .npz
    nsamples: int = 128
    seqlen: int = 2048
    tokenizer: str | None = None
    seed: int = 0
    sequential: bool = True
    stats_file: str | None = None  # precomputed statistics (one-shot) instead of calibrating


def calibration_samples(model_path, input_names: list[str], options: CalibrationOptions) -> list[dict[str, np.ndarray]]:
    if options.source is None:
        raise UserError("this method needs calibration data: pass --calib wikitext2|c4|ptb|FILE.txt|FILE.jsonl|FILE.npz "
                        "(or --stats from `onnxprune calibrate`)")
    if Path(options.source).suffix == ".npz":
        arrays = load_npz_inputs(options.source)
        check_inputs_match(input_names, arrays)
        count = min(len(a) for a in arrays.values())
        # The leading axis indexes samples; each runs as a batch of one, like the text windows.
        return [{name: a[i:i + 1] for name, a in arrays.items()} for i in range(min(count, options.nsamples))]
    tokenizer = load_tokenizer(model_path, options.tokenizer)
    windows = calibration_windows(tokenizer, options.source, options.nsamples, options.seqlen, options.seed)
    return [model_feeds(input_names, window[None]) for window in windows]
