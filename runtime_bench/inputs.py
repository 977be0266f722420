"""Inputs for the benchmark: synthetic ones made from the model's input signature, or real ones
from a .npz file (first axis = samples).

Synthetic: token inputs get input_ids in [0, vocab), attention_mask ones, position_ids
0..seq-1 and token_type_ids zeros (as `onnxprune.data.model_feeds` fills them); float inputs
are random normal. Symbolic dimensions are resolved by name: batch-like ones (batch,
batch_size, N) take --batch, sequence-like ones (sequence_length, seq_len, tokens, …) take
--seqlen; any other symbolic dimension cannot be guessed and is an error naming the input.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxprune.data import check_inputs_match, load_npz_inputs, model_feeds
from onnxprune.errors import UserError
from onnxprune.model_io import resolve_model_path

DEFAULT_VOCAB = 100
TEXT_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")
_BATCH_DIM = re.compile(r"batch|^[nb]$", re.IGNORECASE)
_SEQ_DIM = re.compile(r"seq|length|^len|tokens|^time|^positions?$", re.IGNORECASE)
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
           "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
           "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple  # ints (fixed), strings (symbolic) or None (unnamed)
    dtype: type

    @classmethod
    def of(cls, arg) -> "InputSpec":
        """From an onnxruntime NodeArg (session.get_inputs())."""
        if arg.type not in _DTYPES:
            raise UserError(f"input {arg.name} has type {arg.type}, which the benchmark cannot fill; "
                            "pass --inputs X.npz")
        return cls(arg.name, tuple(arg.shape), _DTYPES[arg.type])

    def signature(self) -> str:
        """'name: dtype[dims]' with symbolic dimensions as '?' (their names may differ between twins)."""
        dims = ", ".join(str(d) if isinstance(d, int) else "?" for d in self.shape)
        return f"{self.name}: {np.dtype(self.dtype).name}[{dims}]"


def resolve_dim(dim, axis: int, spec: InputSpec, batch: int, seqlen: int) -> int:
    """One dimension of `spec` as a number (see the module docstring)."""
    if isinstance(dim, int) and dim >= 0:
        return dim
    name = dim if isinstance(dim, str) else ""
    if _BATCH_DIM.search(name) or (not name and axis == 0):
        return batch
    if ("past" not in name.lower() and _SEQ_DIM.search(name)) or (not name and axis == 1 and spec.name in TEXT_INPUTS):
        return seqlen
    if "past" in name.lower():
        raise UserError(f"input {spec.name} has the KV-cache dimension {name!r}; benchmark a model exported without "
                        "--with-past, or pass all inputs with --inputs X.npz")
    raise UserError(f"input {spec.name} has the symbolic dimension {name or f'#{axis}'!r}, which is neither batch- nor "
                    "sequence-like; pass its tensors with --inputs X.npz")


def model_vocab(model_path: str | os.PathLike, session) -> int:
    """Token ids must stay below this: the logits' last dimension, else the first dimension of the
    embedding table a Gather reads input_ids from (else of the smallest Gather table), else 100."""
    for out in session.get_outputs():
        if out.name == "logits" and out.shape and isinstance(out.shape[-1], int):
            return out.shape[-1]
    import onnx

    graph = onnx.load(str(resolve_model_path(model_path)), load_external_data=False).graph
    tables = {init.name: int(init.dims[0]) for init in graph.initializer if len(init.dims) == 2}
    gathers = [node for node in graph.node if node.op_type == "Gather" and node.input[0] in tables]
    direct = [tables[node.input[0]] for node in gathers if node.input[1] == "input_ids"]
    sizes = direct or [tables[node.input[0]] for node in gathers]
    return min(sizes) if sizes else DEFAULT_VOCAB


class InputMaker:
    """Feeds for one model signature at any batch size: `feeds(batch)` (the same arrays every time)."""

    def __init__(self, model_path: str | os.PathLike, session, seqlen: int, npz: str | os.PathLike | None = None,
                 seed: int = 0):
        self.specs = [InputSpec.of(arg) for arg in session.get_inputs()]
        self.seqlen, self.seed = seqlen, seed
        self.arrays = None
        if npz is not None:
            self.arrays = load_npz_inputs(npz)
            check_inputs_match([s.name for s in self.specs], self.arrays)
            self.source = f"{Path(npz).name} (first axis = samples, repeated to fill a batch)"
        else:
            self.vocab = model_vocab(model_path, session) if any(s.name == "input_ids" for s in self.specs) else None
            vocab = f", input_ids in [0, {self.vocab})" if self.vocab else ""
            self.source = f"synthetic (seqlen {seqlen}{vocab})"
        self._cache: dict[int, dict[str, np.ndarray]] = {}

    def check_signature(self, session, label: str) -> None:
        """The baseline must take the same inputs (names, types, ranks, fixed sizes): it gets the same feeds."""
        theirs = sorted(InputSpec.of(arg).signature() for arg in session.get_inputs())
        ours = sorted(spec.signature() for spec in self.specs)
        if theirs != ours:
            raise UserError(f"{label} takes inputs {'; '.join(theirs)}, the model {'; '.join(ours)}: "
                            "is it the same network?")

    def feeds(self, batch: int) -> dict[str, np.ndarray]:
        if batch not in self._cache:
            self._cache[batch] = self._from_npz(batch) if self.arrays is not None else self._synthetic(batch)
        return self._cache[batch]

    def _from_npz(self, batch: int) -> dict[str, np.ndarray]:
        feeds = {}
        for spec in self.specs:
            array = self.arrays[spec.name]
            if array.ndim == 0 or len(array) == 0:
                raise UserError(f"--inputs: {spec.name} has shape {list(array.shape)}; "
                                "its first axis must hold samples")
            fixed = spec.shape[0] if spec.shape else None
            if isinstance(fixed, int) and fixed != batch:
                raise UserError(f"input {spec.name} has a fixed first dimension of {fixed}; use --batch {fixed}")
            feeds[spec.name] = np.ascontiguousarray(np.take(array, np.arange(batch) % len(array), axis=0))
        return feeds

    def _synthetic(self, batch: int) -> dict[str, np.ndarray]:
        shapes = {s.name: [resolve_dim(d, axis, s, batch, self.seqlen) for axis, d in enumerate(s.shape)]
                  for s in self.specs}
        symbolic_batch = any(not isinstance(s.shape[0], int) for s in self.specs if s.shape)
        if not symbolic_batch and batch != 1:
            raise UserError(f"the model's inputs have fixed shapes ({self.specs[0].signature()}) and no batch "
                            "dimension; use --batch 1")
        rng = np.random.default_rng(self.seed)
        feeds = {}
        text = [s.name for s in self.specs if s.name in TEXT_INPUTS]
        if "input_ids" in text:
            ids = rng.integers(0, self.vocab, size=shapes["input_ids"], dtype=np.int64)
            feeds.update(model_feeds(text, ids))
        for spec in self.specs:
            shape = shapes[spec.name]
            if spec.name in feeds:
                value = feeds[spec.name]
            elif np.issubdtype(spec.dtype, np.floating):
                value = rng.standard_normal(shape)
            elif spec.name == "attention_mask" or spec.dtype == np.bool_:
                value = np.ones(shape)
            else:  # other integer inputs: zeros are valid indices for any table
                value = np.zeros(shape)
            feeds[spec.name] = np.ascontiguousarray(value, dtype=spec.dtype)
        return feeds
