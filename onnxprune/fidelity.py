"""How close a pruned model's outputs stay to its dense twin's, for any model (CNN, encoder, LM).

Per output tensor, over the last axis as the feature vector: mean cosine similarity, relative
error ‖a − b‖/‖b‖, and top-1 agreement (argmax over the last axis: classes, or vocabulary).
"""

from __future__ import annotations

import os

import numpy as np

from onnxprune.data import check_inputs_match, load_npz_inputs
from onnxprune.errors import UserError, first_line
from onnxprune.evaluate import open_session
from onnxprune.progress import progress_bar

_BATCH = 16  # samples run at once


def fidelity(model_path: str | os.PathLike, reference_path: str | os.PathLike, inputs_path: str | os.PathLike,
             providers: list[str] | None = None) -> dict:
    arrays = load_npz_inputs(inputs_path)
    model, reference = open_session(model_path, providers), open_session(reference_path, providers)
    names = [i.name for i in model.get_inputs()]
    check_inputs_match(names, arrays)
    outputs = [o.name for o in reference.get_outputs()]
    missing = [name for name in outputs if name not in {o.name for o in model.get_outputs()}]
    if missing:
        raise UserError(f"the model lacks the reference's outputs {', '.join(missing)}: is it the same network?")
    count = min(len(a) for a in arrays.values())
    sums = {name: {"cos": 0.0, "rows": 0, "diff2": 0.0, "ref2": 0.0, "agree": 0} for name in outputs}
    for start in progress_bar(range(0, count, _BATCH), "fidelity"):
        feeds = {name: a[start:start + _BATCH] for name, a in arrays.items()}
        got, want = _run(model, outputs, feeds), _run(reference, outputs, feeds)
        for name, a, b in zip(outputs, got, want):
            if a.shape != b.shape:
                raise UserError(f"output {name} has shape {list(a.shape)}, the reference's {list(b.shape)}")
            _accumulate(sums[name], a, b)
    return {"samples": count, "outputs": {name: _finish(s) for name, s in sums.items()}}


def _accumulate(total: dict, a: np.ndarray, b: np.ndarray) -> None:
    a = a.astype(np.float64).reshape(-1, a.shape[-1] if a.ndim else 1)
    b = b.astype(np.float64).reshape(a.shape)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(norms > 0, (a * b).sum(1) / np.where(norms > 0, norms, 1), 1.0)
    total["cos"] += float(cos.sum())
    total["rows"] += len(a)
    total["diff2"] += float(((a - b) ** 2).sum())
    total["ref2"] += float((b ** 2).sum())
    total["agree"] += int((a.argmax(1) == b.argmax(1)).sum())


def _finish(total: dict) -> dict:
    rows = max(total["rows"], 1)
    return {"cosine": total["cos"] / rows,
            "relative_error": float(np.sqrt(total["diff2"] / total["ref2"])) if total["ref2"] else 0.0,
            "top1_agreement": total["agree"] / rows, "rows": total["rows"]}


def _run(session, outputs: list[str], feeds: dict) -> list[np.ndarray]:
    try:
        return session.run(outputs, feeds)
    except Exception as exc:
        raise UserError(f"onnxruntime failed: {first_line(exc)}") from None
