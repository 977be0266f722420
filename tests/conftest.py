"""Shared fixtures and independent checkers for the onnxprune test suite.

The checkers here deliberately do not use onnxprune's own layout or pattern code: they read raw
ONNX initializers with `onnx.numpy_helper`, find the reduction axis K from the consuming node, and
count zeros in numpy, so a bug in `targets.Layout` or `patterns` cannot hide itself.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import warnings
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

# Tests never touch the network: the Hugging Face models are built from configs, offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from onnxprune.cli import main  # noqa: E402

pytest_plugins = ["lm_fixtures"]

REPO = Path(__file__).resolve().parents[1]
VOCAB = 128


# --------------------------------------------------------------------------------------- CLI


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    def ok(self) -> "CliResult":
        assert self.code == 0, f"exit {self.code}\nstdout:\n{self.out}\nstderr:\n{self.err}"
        return self


def cli(*args) -> CliResult:
    """Run `onnxprune ARGS` in this process; the exit code comes from its SystemExit."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return CliResult(code, out.getvalue(), err.getvalue())


def cli_process(*args, cwd: Path = REPO) -> CliResult:
    """Run `python -m onnxprune ARGS` as a real process (real exit code and stderr) in `cwd`."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_COLOR": "1"}
    env.pop("ONNXPRUNE_DEBUG", None)
    done = subprocess.run([sys.executable, "-m", "onnxprune", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=300)
    return CliResult(done.returncode, done.stdout, done.stderr)


def assert_user_error(result: CliResult) -> str:
    """Exit code 2 and exactly one stderr line, starting with 'error:' (no traceback)."""
    lines = result.err.strip("\n").splitlines()
    assert result.code == 2, f"exit {result.code}, stderr: {result.err!r}"
    assert len(lines) == 1, f"expected one stderr line, got {lines!r}"
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.err + result.out
    return lines[0]


def prune(model: Path, out: Path, *options, report: Path | None = None) -> CliResult:
    """`onnxprune apply MODEL -o OUT [--report R] OPTIONS`, which must succeed."""
    extra = ["--report", report] if report is not None else []
    return cli("apply", model, "-o", out, *extra, *options).ok()


# ------------------------------------------------------------------------------------- files


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, str]:
    """Every file below `folder` with its hash, to prove nothing was written or changed."""
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def initializers(path: Path) -> dict[str, np.ndarray]:
    """name -> array of every initializer (external data resolved beside the file)."""
    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def assert_bit_identical(before: dict[str, np.ndarray], after: dict[str, np.ndarray], names) -> None:
    for name in names:
        assert after[name].dtype == before[name].dtype, name
        assert after[name].shape == before[name].shape, name
        assert after[name].tobytes() == before[name].tobytes(), f"{name} changed"


def metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


# ------------------------------------------------------------- independent weight orientation


def layout_of(model: onnx.ModelProto, name: str) -> str:
    """'kn' (stored [K, N]), 'nk' (stored [N, K]) or 'conv', from the node that consumes `name`.

    Follows Transpose(perm=[1,0]) and Cast; written from the ONNX operator definitions only.
    """
    consumers = {}
    for node in model.graph.node:
        for index, value in enumerate(node.input):
            consumers.setdefault(value, []).append((node, index))
    transposed, tensor = False, name
    while True:
        (node, index), *_ = consumers[tensor]
        if node.op_type == "Transpose":
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
            transposed ^= perm == [1, 0]
        elif node.op_type != "Cast":
            break
        tensor = node.output[0]
    assert index == 1, f"{name} is input {index} of {node.op_type}"
    if node.op_type == "Conv":
        return "conv"
    trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
    return "nk" if transposed ^ trans_b else "kn"


K_AXIS = {"kn": 0, "nk": 1, "conv": 1}  # N:M groups run along this stored axis
OUT_AXIS = {"kn": 1, "nk": 0, "conv": 0}  # one output neuron per index of this axis


def group_zero_counts(stored: np.ndarray, k_axis: int, m: int) -> np.ndarray:
    """Zeros in every run of `m` consecutive entries along `k_axis` (one count per group)."""
    moved = np.moveaxis(stored, k_axis, -1)
    assert moved.shape[-1] % m == 0, f"axis {k_axis} of {stored.shape} is not divisible by {m}"
    return (moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m) == 0).sum(axis=-1)


def assert_nm(stored: np.ndarray, k_axis: int, n: int, m: int) -> None:
    """Valid N:M along `k_axis`, with exactly N zeros per group (inputs have no zeros of their own)."""
    counts = group_zero_counts(stored, k_axis, m)
    assert (counts >= n).all(), f"{int((counts < n).sum())} groups of {m} hold fewer than {n} zeros"
    assert (counts == n).all(), f"{int((counts > n).sum())} groups of {m} hold more than {n} zeros"


def rows(stored: np.ndarray, out_axis: int) -> np.ndarray:
    """The weight as one row per output neuron (the order inside a row does not matter here)."""
    moved = np.moveaxis(stored, out_axis, 0)
    return moved.reshape(moved.shape[0], -1)


# --------------------------------------------------------------------------------- runtime


def feeds_for(session, batch: int = 2, seq: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """Real inputs for any of the test models: token ids and masks for the transformers, random
    floats (symbolic dimensions set to `batch`) for the hand-built graphs."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for arg in session.get_inputs():
        if arg.name == "input_ids":
            feeds[arg.name] = rng.integers(0, VOCAB, size=(batch, seq), dtype=np.int64)
        elif arg.name == "attention_mask":
            feeds[arg.name] = np.ones((batch, seq), dtype=np.int64)
        elif arg.name == "position_ids":
            feeds[arg.name] = np.tile(np.arange(seq, dtype=np.int64), (batch, 1))
        elif arg.name == "token_type_ids":
            feeds[arg.name] = np.zeros((batch, seq), dtype=np.int64)
        elif arg.type == "tensor(int64)":
            shape = [d if isinstance(d, int) else (batch if i == 0 else seq) for i, d in enumerate(arg.shape)]
            feeds[arg.name] = rng.integers(0, VOCAB, size=shape, dtype=np.int64)
        else:
            assert arg.type == "tensor(float)", arg.type
            shape = [d if isinstance(d, int) else batch for d in arg.shape]
            feeds[arg.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def run_model(path: Path) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds_for(session))


def assert_runs_like(pruned: Path, dense: Path) -> list[np.ndarray]:
    """The pruned model runs in onnxruntime with finite outputs shaped like the dense model's."""
    outputs, reference = run_model(pruned), run_model(dense)
    assert [o.shape for o in outputs] == [r.shape for r in reference]
    for output in outputs:
        assert np.isfinite(output).all()
    return outputs


# ------------------------------------------------------------------ tiny Hugging Face models


@dataclass
class HFModel:
    arch: str
    hf_dir: Path
    onnx_path: Path
    selected: int  # in-block linears the default selection must pick
    lm_head: bool  # causal LM with an LM head that must be left alone


def _hf_configs():
    from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                              OPTConfig, OPTForCausalLM)

    common = dict(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
    return {
        # q k v o gate up down per layer; k/v have 2 KV heads (GQA)
        "llama": (LlamaForCausalLM, LlamaConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=2,
                                                **common), 7 * 2, True),
        # q k v out_proj fc1 fc2 per layer
        "opt": (OPTForCausalLM, OPTConfig(hidden_size=32, ffn_dim=64, word_embed_proj_dim=32, **common), 6 * 2, True),
        # c_attn c_proj c_fc mlp.c_proj per layer (Conv1D → Gemm with weights stored [K, N])
        "gpt2": (GPT2LMHeadModel, GPT2Config(vocab_size=VOCAB, n_embd=32, n_inner=64, n_layer=2, n_head=4,
                                             n_positions=64), 4 * 2, True),
        # query key value attention.output intermediate output per layer
        "bert": (BertModel, BertConfig(hidden_size=48, intermediate_size=64, **common), 6 * 2, False),
    }


ARCHS = ["llama", "opt", "gpt2", "bert"]


@pytest.fixture(scope="session")
def hf_model(tmp_path_factory):
    """`hf_model(arch)`: a tiny random model saved with save_pretrained and exported once per session."""
    cache: dict[str, HFModel] = {}

    def get(arch: str) -> HFModel:
        if arch not in cache:
            import torch

            from onnxprune.exporters.hf import export_hf

            model_cls, config, selected, lm_head = _hf_configs()[arch]
            root = tmp_path_factory.mktemp(f"hf-{arch}")
            torch.manual_seed(0)
            with warnings.catch_warnings():  # the tracer's warnings about tiny shapes say nothing here
                warnings.simplefilter("ignore")
                model_cls(config).eval().save_pretrained(root / "hf")
                onnx_path = export_hf(str(root / "hf"), root / "onnx")
            cache[arch] = HFModel(arch, root / "hf", onnx_path, selected, lm_head)
        return cache[arch]

    return get
