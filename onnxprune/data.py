"""Calibration and evaluation data: tokenizers, text sources, token windows, input tensors.

A text source is one `--calib` / `--eval` value: a data set name (`wikitext2`, `c4`, `ptb`,
loaded through Hugging Face `datasets` exactly as the Wanda and SparseGPT reference code loads
them) or a local `.txt` (the whole file) or `.jsonl` (one `{"text": ...}` per line, joined with
blank lines). Models that do not take text get their inputs from a `.npz` file instead.

Calibration windows follow the references: tokenize the whole text once, `random.seed(seed)`,
then draw each window's start with `random.randint(0, n_tokens - seqlen - 1)`. For C4 the
references draw a document first (again until one is longer than `seqlen`), then a window in it.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np

from onnxprune.companions import recorded_source
from onnxprune.errors import UserError, first_line
from onnxprune.extras import require
from onnxprune.model_io import resolve_model_path

DATASETS = ("wikitext2", "c4", "ptb")
TEXT_SUFFIXES = (".txt", ".jsonl")

# Files whose presence marks a directory as holding a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
# The references' C4 shards (en/c4-validation.*-of-00008 is how allenai/c4 names its validation shards).
_C4_FILES = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}
_C4_EVAL_DOCUMENTS = 1100   # validation documents joined for evaluation
_C4_EVAL_WINDOWS = 256      # evaluation keeps the first 256 * seqlen tokens
_C4_MAX_DRAWS = 100_000     # documents drawn before giving up on finding one longer than seqlen


DEFAULT_SEQLEN = 2048  # the references' window; shorter when the model cannot take it
# config.json keys that hold a model's longest input, by family (Llama/OPT/BERT, GPT-2, MPT, GPT-J).
_MAX_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "n_ctx")


def max_positions(model_path: str | os.PathLike) -> int | None:
    """The longest sequence the model takes: from the config.json beside it, else the row count of
    a position-embedding table (a Gather on an initializer named like *position* / wpe); None
    when neither tells (rotary models without a config)."""
    path = resolve_model_path(model_path)
    config = path.parent / "config.json"
    if config.is_file():
        try:
            values = json.loads(config.read_text())
        except (OSError, ValueError):
            values = {}
        for key in _MAX_POSITION_KEYS:
            if isinstance(values.get(key), int) and values[key] > 0:
                return values[key]
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:
        return None
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    for node in graph.node:
        table = node.input[0] if node.op_type == "Gather" and node.input else ""
        if table in shapes and len(shapes[table]) == 2 and ("position" in table.lower() or "wpe" in table.lower()):
            return int(shapes[table][0])
    return None


def window_length(model_path: str | os.PathLike, requested: int | None) -> int:
    """--seqlen: min(2048, the model's max positions) by default; longer than the model takes is an error."""
    limit = max_positions(model_path)
    if requested is None:
        return DEFAULT_SEQLEN if limit is None else min(DEFAULT_SEQLEN, limit)
    if requested < 1:
        raise UserError(f"--seqlen must be at least 1 (got {requested})")
    if limit is not None and requested > limit:
        raise UserError(f"--seqlen {requested} is longer than the model's {limit} positions; "
                        f"pass --seqlen {limit} or less")
    return requested


def load_tokenizer(model_path: str | os.PathLike | None, tokenizer_dir: str | os.PathLike | None = None):
    """The tokenizer in `tokenizer_dir`, else the one stored beside the model (as `onnxprune export` does)."""
    if tokenizer_dir is None and model_path is None:
        raise UserError("a model given in memory has no folder to find its tokenizer in: pass tokenizer=DIR "
                        "(a directory with tokenizer.json or tokenizer_config.json)")
    if tokenizer_dir is not None:
        directory = Path(tokenizer_dir)
        if not directory.is_dir():
            raise UserError(f"tokenizer directory not found: {directory}")
    else:
        directory = resolve_model_path(model_path).parent
        if not _has_tokenizer(directory):  # the .onnx moved on alone: try where its tokenizer came from
            recorded = recorded_source(resolve_model_path(model_path))
            directory = recorded if recorded is not None and _has_tokenizer(recorded) else directory
    if not _has_tokenizer(directory):
        where = f"in {directory}" if tokenizer_dir is not None else f"beside the model in {directory}"
        raise UserError(f"no tokenizer {where}; pass --tokenizer DIR (a directory with tokenizer.json "
                        "or tokenizer_config.json, e.g. the Hugging Face model's directory)")
    transformers = require("transformers", "loading a tokenizer")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(directory))
    except Exception as exc:
        raise UserError(f"cannot load the tokenizer in {directory}: {first_line(exc)}") from None


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


def tokenize(tokenizer, text: str) -> np.ndarray:
    """Token ids of the whole `text` (with the tokenizer's special tokens, as the references) as int64."""
    ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
    return np.asarray(ids, dtype=np.int64).reshape(-1)


def load_text(source: str | os.PathLike, split: str) -> str:
    """The text of `source`; `split` is "train" (calibration) or "test" (evaluation) for data sets."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    name = _dataset_name(source)
    if name == "wikitext2":
        rows = _load_dataset("wikitext2", "wikitext", "wikitext-2-raw-v1", split=split)["text"]
        return (" " if split == "train" else "\n\n").join(rows)
    if name == "ptb":
        return " ".join(_load_dataset("ptb", "ptb_text_only", "penn_treebank", split=split)["sentence"])
    if name == "c4":
        if split == "train":
            return " ".join(_c4("train")["text"])
        return " ".join(_c4("validation")[:_C4_EVAL_DOCUMENTS]["text"])
    return _read_text_file(Path(source))


def calibration_windows(tokenizer, source: str | os.PathLike, nsamples: int, seqlen: int, seed: int = 0) -> np.ndarray:
    """`nsamples` random windows of `seqlen` tokens from `source`, drawn as the references draw them: int64 [nsamples, seqlen]."""
    if nsamples < 1 or seqlen < 1:
        raise UserError(f"need at least one sample of at least one token (got nsamples={nsamples}, seqlen={seqlen})")
    if _dataset_name(source) == "c4":
        return _c4_windows(tokenizer, nsamples, seqlen, seed)
    ids = tokenize(tokenizer, load_text(source, "train"))
    if len(ids) < seqlen + 1:
        raise UserError(f"{source} has {len(ids)} tokens; a calibration window of {seqlen} tokens needs at least "
                        f"{seqlen + 1}; give more text or a smaller --seqlen")
    random.seed(seed)
    windows = np.empty((nsamples, seqlen), dtype=np.int64)
    for k in range(nsamples):
        start = random.randint(0, len(ids) - seqlen - 1)
        windows[k] = ids[start:start + seqlen]
    return windows


def evaluation_ids(tokenizer, source: str | os.PathLike, seqlen: int) -> np.ndarray:
    """Token ids of `source`'s test text, as the references evaluate it (C4: the first 256 windows only)."""
    ids = tokenize(tokenizer, load_text(source, "test"))
    if _dataset_name(source) == "c4":
        ids = ids[:_C4_EVAL_WINDOWS * seqlen]
    if len(ids) < seqlen:
        raise UserError(f"{source} has {len(ids)} tokens; one evaluation window needs {seqlen}; "
                        "give more text or a smaller --seqlen")
    return ids


def model_feeds(input_names: list[str], ids: np.ndarray) -> dict[str, np.ndarray]:
    """onnxruntime feeds for a text model from token ids [batch, seq] (or [seq]).

    Fills input_ids, and attention_mask (ones), position_ids (0..seq-1) and token_type_ids
    (zeros) when the graph has them; any other input cannot come from text.
    """
    ids = np.asarray(ids, dtype=np.int64)
    ids = ids[None] if ids.ndim == 1 else ids
    if "input_ids" not in input_names:
        raise UserError(f"the model's inputs ({', '.join(input_names)}) have no input_ids: it does not take text; "
                        "pass input tensors as a .npz file")
    fillers = {
        "input_ids": lambda: ids,
        "attention_mask": lambda: np.ones_like(ids),
        "position_ids": lambda: np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy(),
        "token_type_ids": lambda: np.zeros_like(ids),
    }
    others = [name for name in input_names if name not in fillers]
    if any(name.startswith(("past_key_values", "past_key", "past_value")) for name in others):
        raise UserError("the model takes a KV cache (past_key_values inputs); export it without --with-past")
    if others:
        raise UserError(f"the model also needs {', '.join(others)}, which text cannot fill; "
                        "pass all inputs as a .npz file")
    return {name: fillers[name]() for name in input_names}


def load_npz_inputs(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Input tensors by name from a .npz file (np.savez(path, input_name=array, ...))."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"input file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except Exception as exc:
        raise UserError(f"{path} is not a readable .npz file ({first_line(exc)})") from None
    if not arrays:
        raise UserError(f"{path} holds no arrays")
    return arrays


def check_inputs_match(model_input_names: list[str], arrays: dict[str, np.ndarray], source: str | None = None) -> None:
    """Refuse arrays that do not name exactly the model's inputs (`source`: the file they came from)."""
    missing = [name for name in model_input_names if name not in arrays]
    extra = [name for name in arrays if name not in model_input_names]
    where = f" of {source}" if source else ""
    if missing:
        raise UserError(f"the input tensors{where} lack {', '.join(missing)} (the model takes {', '.join(model_input_names)})")
    if extra:
        raise UserError(f"the input tensors {', '.join(extra)}{where} are not model inputs "
                        f"(the model takes {', '.join(model_input_names)})")


def is_tensor_source(source: str | os.PathLike) -> bool:
    """Input tensors rather than text: a .npz file or a directory (of .npz files)."""
    return Path(source).suffix.lower() == ".npz" or Path(source).is_dir()


def load_sample_feeds(path: str | os.PathLike, input_names: list[str], batch: int = 1,
                      limit: int | None = None) -> list[dict[str, np.ndarray]]:
    """onnxruntime feed dicts from input tensors, at most `limit` samples.

    A directory holds one .npz per sample (read in name order), each a complete feed dict of any
    shapes, scalars included (a sample rate, a recurrent state). One .npz stacks the samples along
    every array's first axis; they are fed `batch` at a time.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.npz"))[:limit]
        if not files:
            raise UserError(f"{path} holds no .npz files (one per sample: np.savez(f, input_name=array, ...))")
        feeds = []
        for file in files:
            arrays = load_npz_inputs(file)
            check_inputs_match(input_names, arrays, str(file))
            feeds.append(arrays)
        return feeds
    return stacked_feeds(load_npz_inputs(path), input_names, batch, limit, str(path))


def stacked_feeds(arrays: dict[str, np.ndarray], input_names: list[str], batch: int = 1, limit: int | None = None,
                  source: str | None = None) -> list[dict[str, np.ndarray]]:
    """Feed dicts of `batch` samples each from arrays that stack samples along their first axis."""
    check_inputs_match(input_names, arrays, source)
    scalars = [name for name, array in arrays.items() if np.ndim(array) == 0]
    if scalars:
        raise UserError(f"{source or 'the input tensors'}: {', '.join(scalars)} {'is a scalar' if len(scalars) == 1 else 'are scalars'}, but "
                        "stacked tensors hold samples along the first axis; give a directory with one .npz per sample")
    count = min(len(a) for a in arrays.values())
    if limit is not None:
        count = min(count, limit * batch)
    return [{name: np.asarray(a)[i:i + batch] for name, a in arrays.items()} for i in range(0, count, batch)]


def _dataset_name(source: str | os.PathLike) -> str | None:
    """The data set `source` names, or None when it is a local file (checked to exist and be text)."""
    if isinstance(source, str) and source.lower() in DATASETS:
        return source.lower()
    path = Path(source)
    if is_tensor_source(path):
        raise UserError(f"{path} holds input tensors, not text; use it for models that do not take text")
    if path.suffix.lower() not in TEXT_SUFFIXES:
        raise UserError(f"unknown text source {source}: use {', '.join(DATASETS)}, or a .txt or .jsonl file")
    if not path.is_file():
        raise UserError(f"text file not found: {path}")
    return None


def _read_text_file(path: Path) -> str:
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path} as UTF-8 text ({first_line(exc)})") from None
    if path.suffix.lower() == ".txt":
        return content
    texts = []
    for number, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number} is not JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UserError(f'{path}:{number} has no "text" string field')
        texts.append(record["text"])
    return "\n\n".join(texts)


def _load_dataset(label: str, *args, **kwargs):
    datasets = require("datasets", f"the {label} data set")
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as exc:
        raise UserError(f"cannot load the {label} data set ({first_line(exc)}); it needs the Hugging Face hub "
                        "or its local cache; pass a .txt or .jsonl file instead") from None


def _c4(split: str):
    return _load_dataset("c4", "allenai/c4", data_files={split: _C4_FILES[split]}, split=split)


def _c4_windows(tokenizer, nsamples: int, seqlen: int, seed: int) -> np.ndarray:
    documents = _c4("train")
    random.seed(seed)
    windows = np.empty((nsamples, seqlen), dtype=np.int64)
    for k in range(nsamples):
        for _ in range(_C4_MAX_DRAWS):
            ids = tokenize(tokenizer, documents[random.randint(0, len(documents) - 1)]["text"])
            if len(ids) > seqlen:
                break
        else:
            raise UserError(f"no c4 document among {_C4_MAX_DRAWS} drawn is longer than {seqlen} tokens; "
                            "use a smaller --seqlen")
        start = random.randint(0, len(ids) - seqlen - 1)
        windows[k] = ids[start:start + seqlen]
    return windows
