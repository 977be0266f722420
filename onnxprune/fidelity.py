"""How close a pruned model's outputs stay to its dense twin's, for any model (CNN, encoder, LM).

Per output tensor, over the last axis as the feature vector: mean cosine similarity, relative
error ‖a − b‖/‖b‖, and top-1 agreement (argmax over the last axis: classes, or vocabulary).

The metrics can fail, and say so: a zero row against a non-zero reference has cosine 0 (never the
1.0 a zero-norm guard would give), a NaN / Inf output makes all three NaN, a constant row has no
top-1 prediction; each such case is listed in the output's `warnings`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from onnxprune.data import load_sample_feeds, stacked_feeds
from onnxprune.errors import UserError, first_line
from onnxprune.evaluation import open_session
from onnxprune.progress import progress_bar

_BATCH = 16  # samples run at once


def fidelity(model_path, reference_path, inputs: str | os.PathLike | dict[str, np.ndarray],
             providers: list[str] | None = None) -> dict:
    """`model_path` / `reference_path`: anything `open_session` takes; `inputs`: a .npz (samples
    stacked on the first axis) or its arrays, or a directory of .npz files (one feed dict each)."""
    model, reference = open_session(model_path, providers), open_session(reference_path, providers)
    names = [i.name for i in model.get_inputs()]
    # A model exported for a fixed batch (often 1) takes the samples one at a time.
    batch = 1 if any(i.shape and isinstance(i.shape[0], int) for i in model.get_inputs()) else _BATCH
    batches = stacked_feeds(inputs, names, batch) if isinstance(inputs, dict) else load_sample_feeds(inputs, names, batch)
    outputs = [o.name for o in reference.get_outputs()]
    missing = [name for name in outputs if name not in {o.name for o in model.get_outputs()}]
    if missing:
        raise UserError(f"the model lacks the reference's outputs {', '.join(missing)}: is it the same network?")
    # A directory holds one sample per file (any shapes); stacked tensors, `batch` per feed dict.
    one_per_feed = not isinstance(inputs, dict) and Path(inputs).is_dir()
    count = len(batches) if one_per_feed else sum(min(map(len, feeds.values())) for feeds in batches)
    sums = {name: Agreement() for name in outputs}
    for feeds in progress_bar(batches, "fidelity"):
        got, want = _run(model, outputs, feeds), _run(reference, outputs, feeds)
        for name, a, b in zip(outputs, got, want):
            if a.shape != b.shape:
                raise UserError(f"output {name} has shape {list(a.shape)}, the reference's {list(b.shape)}")
            sums[name].add(a, b)
    return {"samples": count, "outputs": {name: s.result() for name, s in sums.items()}}


class Agreement:
    """Running sums of the three metrics over batches of (model, reference) rows, and what went wrong."""

    def __init__(self) -> None:
        self.rows = self.agree = 0
        self.cos = self.diff2 = self.ref2 = 0.0
        self.bad = {who: {"nonfinite": 0, "zero": 0, "constant": 0} for who in ("model", "reference")}

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        a = a.astype(np.float64).reshape(-1, a.shape[-1] if a.ndim else 1)
        b = b.astype(np.float64).reshape(a.shape)
        norm_a, norm_b = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            cos = (a * b).sum(1) / (norm_a * norm_b)  # NaN where either row is NaN / Inf
        cos = np.where((norm_a == 0) | (norm_b == 0), np.where(norm_a == norm_b, 1.0, 0.0), cos)
        cos = np.where(np.isfinite(norm_a) & np.isfinite(norm_b), cos, np.nan)
        wide = a.shape[1] > 1  # a single value per row is trivially constant
        constant_a, constant_b = (a.max(1) == a.min(1)) & wide, (b.max(1) == b.min(1)) & wide
        self.cos += float(cos.sum())
        self.agree += int(((a.argmax(1) == b.argmax(1)) & (constant_a == constant_b)).sum())
        self.diff2 += float(((a - b) ** 2).sum())
        self.ref2 += float((b ** 2).sum())
        self.rows += len(a)
        for who, rows, norms, constant in (("model", a, norm_a, constant_a), ("reference", b, norm_b, constant_b)):
            self.bad[who]["nonfinite"] += int((~np.isfinite(rows).all(1)).sum())
            self.bad[who]["zero"] += int((norms == 0).sum())
            self.bad[who]["constant"] += int(constant.sum())

    def result(self) -> dict:
        rows = max(self.rows, 1)
        nonfinite = any(bad["nonfinite"] for bad in self.bad.values())
        if nonfinite:
            relative = float("nan")
        elif self.ref2:
            relative = float(np.sqrt(self.diff2 / self.ref2))
        else:
            relative = 0.0 if self.diff2 == 0 else float("inf")
        return {"cosine": self.cos / rows, "relative_error": relative,
                "top1_agreement": float("nan") if nonfinite else self.agree / rows, "rows": self.rows,
                "warnings": self.warnings()}

    def warnings(self) -> list[str]:
        """What makes the numbers meaningless: dead, constant or non-finite outputs."""
        warnings = []
        for who, bad in self.bad.items():
            if bad["nonfinite"]:
                warnings.append(f"the {who}'s output is NaN or Inf in {bad['nonfinite']:,} of {self.rows:,} rows")
            if bad["zero"]:
                warnings.append(f"the {who}'s output is all zero in {bad['zero']:,} of {self.rows:,} rows"
                                + (" (a dead model)" if bad["zero"] == self.rows else ""))
            elif bad["constant"] == self.rows and self.rows:
                warnings.append(f"the {who}'s output is constant in every row (no top-1 prediction)")
        return warnings


def _run(session, outputs: list[str], feeds: dict) -> list[np.ndarray]:
    try:
        return session.run(outputs, feeds)
    except Exception as exc:
        raise UserError(f"onnxruntime failed: {first_line(exc)}") from None
