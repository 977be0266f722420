"""Perplexity of an ONNX causal LM through onnxruntime, by the Wanda / SparseGPT protocol.

The test text is tokenized once and cut into non-overlapping windows of `seqlen` tokens (the
tail shorter than a window is dropped). Each window runs alone; its loss is the mean
cross-entropy of the logits at positions 0..seqlen-2 against the tokens at 1..seqlen-1, as
`torch.nn.CrossEntropyLoss` computes it. Perplexity = exp(Σ loss·seqlen / (windows·seqlen)).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import numpy as np

from onnxprune.data import evaluation_ids, model_feeds
from onnxprune.errors import UserError, first_line
from onnxprune.model_io import resolve_model_path
from onnxprune.progress import progress_bar

_ROWS_PER_CHUNK = 256  # log-softmax rows converted to float64 at a time (bounds memory for large vocabularies)


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float    # natural-log loss per predicted token
    windows: int       # windows evaluated
    seqlen: int
    tokens: int        # tokens in the whole evaluation text
    seconds: float
    warnings: tuple[str, ...] = ()  # why the number may be meaningless (non-finite logits)

    def __float__(self) -> float:
        return self.perplexity

    def as_dict(self) -> dict:
        return {"perplexity": self.perplexity, "mean_nll": self.mean_nll, "windows": self.windows,
                "seqlen": self.seqlen, "tokens": self.tokens, "seconds": self.seconds,
                "warnings": list(self.warnings)}


def default_providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def open_session(model_path, providers: list[str] | None = None):
    """An onnxruntime session on the .onnx file (external data is found beside it); a session
    passed in is used as it is, so callers evaluating one model several ways load it once; a
    model in memory (onnx_ir.Model or onnx.ModelProto, under 2 GB) is serialized for onnxruntime."""
    import onnx
    import onnx_ir as ir
    import onnxruntime as ort

    if isinstance(model_path, ort.InferenceSession):
        return model_path
    if isinstance(model_path, (ir.Model, onnx.ModelProto)):
        proto = ir.to_proto(model_path) if isinstance(model_path, ir.Model) else model_path
        try:
            return ort.InferenceSession(proto.SerializeToString(), providers=providers or default_providers())
        except Exception as exc:
            raise UserError(f"onnxruntime cannot load the model in memory: {first_line(exc)} "
                            "(over 2 GB: save it and pass the path)") from None
    path = resolve_model_path(model_path)
    if not path.is_file():
        raise UserError(f"model file not found: {path}")
    try:
        return ort.InferenceSession(str(path), providers=providers or default_providers())
    except Exception as exc:
        raise UserError(f"onnxruntime cannot load {path}: {first_line(exc)}") from None


def perplexity(model_path: str | os.PathLike, tokenizer, source: str | os.PathLike, seqlen: int,
               providers: list[str] | None = None, max_windows: int | None = None) -> PerplexityResult:
    """Perplexity of the model at `model_path` on `source`'s test text (see the module docstring)."""
    if seqlen < 2:
        raise UserError(f"--seqlen must be at least 2 (got {seqlen})")
    ids = evaluation_ids(tokenizer, source, seqlen)
    return perplexity_of_ids(model_path, ids, seqlen, providers, max_windows)


def perplexity_of_ids(model_path, ids: np.ndarray, seqlen: int,
                      providers: list[str] | None = None, max_windows: int | None = None) -> PerplexityResult:
    """Perplexity over the non-overlapping `seqlen` windows of the token ids `ids` (1-D);
    `model_path` may also be an open session (see `open_session`)."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    windows = len(ids) // seqlen
    if windows == 0:
        raise UserError(f"the text has {len(ids)} tokens; one window needs {seqlen}")
    if max_windows is not None:
        windows = min(windows, max_windows)
    started = time.perf_counter()
    session = open_session(model_path, providers)
    input_names = [i.name for i in session.get_inputs()]
    logits_name = logits_output(session)
    nlls, broken = [], 0
    for k in progress_bar(range(windows), "perplexity"):
        window = ids[k * seqlen:(k + 1) * seqlen][None]
        feeds = model_feeds(input_names, window)
        try:
            (logits,) = session.run([logits_name], feeds)
        except Exception as exc:
            raise UserError(f"onnxruntime failed on window {k}: {first_line(exc)}") from None
        _check_logits(logits, window)
        broken += not np.isfinite(logits).all()
        nlls.append(window_loss(logits[0], window[0]) * seqlen)
    mean_nll = float(np.sum(nlls) / (windows * seqlen))
    warnings = (f"{broken} of {windows} windows gave NaN or Inf logits: the perplexity is meaningless",) if broken else ()
    return PerplexityResult(math.exp(mean_nll), mean_nll, windows, seqlen, len(ids), time.perf_counter() - started,
                            warnings)


def window_loss(logits: np.ndarray, ids: np.ndarray) -> float:
    """Mean next-token cross-entropy of one window: logits [seq, vocab] at 0..seq-2 vs ids at 1..seq-1."""
    targets = ids[1:]
    total = 0.0
    for start in range(0, len(targets), _ROWS_PER_CHUNK):
        rows = logits[start:start + _ROWS_PER_CHUNK].astype(np.float64)
        rows = rows[: len(targets) - start]
        peak = rows.max(axis=1, keepdims=True)
        log_norm = peak[:, 0] + np.log(np.exp(rows - peak).sum(axis=1))
        picked = rows[np.arange(len(rows)), targets[start:start + len(rows)]]
        total += float(np.sum(log_norm - picked))
    return total / len(targets)


def logits_output(session) -> str:
    """The output holding [batch, seq, vocab] logits: `logits` if present, else the first output."""
    outputs = session.get_outputs()
    chosen = next((o for o in outputs if o.name == "logits"), outputs[0])
    if len(chosen.shape) != 3:
        raise UserError(f"the model's output {chosen.name} has shape {chosen.shape}, not [batch, seq, vocab] logits; "
                        "perplexity needs a causal language model")
    return chosen.name


def _check_logits(logits: np.ndarray, window: np.ndarray) -> None:
    if logits.ndim != 3 or logits.shape[:2] != window.shape:
        raise UserError(f"the model returned logits of shape {list(logits.shape)} for a window of shape "
                        f"{list(window.shape)}; expected [batch, seq, vocab]")
    if int(window.max()) >= logits.shape[2]:
        raise UserError(f"token id {int(window.max())} is outside the model's vocabulary of {logits.shape[2]}; "
                        "does the tokenizer belong to this model?")
