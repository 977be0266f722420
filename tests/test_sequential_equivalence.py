"""The ONNX pipeline prunes exactly like a torch pipeline on the original Hugging Face model.

The torch side works the way the Wanda and SparseGPT reference repositories do: capture the
inputs of the first decoder layer, then layer by layer gather statistics with forward hooks on
every linear layer, prune them, and run the pruned layer to produce the next layer's inputs. It
uses the same per-layer algorithms (checked against independent references in
test_wanda_sparsegpt.py), so what this test proves is the calibration plumbing: onnxruntime
segments, cached boundaries and statistics equal the torch hooks, weight for weight.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import cli

from onnxprune.model_io import load_model
from onnxprune.passes import Layer, get_pass
from onnxprune.patterns import parse_pattern
from onnxprune.targets import discover_targets

NSAMPLES, SEQLEN = 6, 16


class _Captured(Exception):
    pass


def torch_sequential_prune(model, windows: np.ndarray, method_name: str, pattern) -> dict[str, np.ndarray]:
    """Reference-style sequential pruning; returns pruned weights by module name."""
    method = get_pass(method_name)
    decoder = model.model.decoder if hasattr(model.model, "decoder") else model.model
    layers = decoder.layers
    inputs, kwargs = [], {}

    def capture(module, args, kw):
        inputs.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.update({k: v for k, v in kw.items() if k not in ("hidden_states", "past_key_value", "past_key_values")})
        raise _Captured

    handle = layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    for window in windows:
        try:
            model(torch.from_numpy(window[None]), use_cache=False)
        except _Captured:
            pass
    handle.remove()

    names = {module: name for name, module in model.named_modules()}
    pruned = {}
    for index, layer in enumerate(layers):
        linears = {name: m for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        sums = {name: {"sq_sum": 0.0, "gram": 0.0, "sum": 0.0, "tokens": 0, "samples": 0} for name in linears}

        def hook(name):
            def accumulate(module, args, output):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                stats = sums[name]
                stats["sq_sum"] = stats["sq_sum"] + x.square().sum(0)
                stats["sum"] = stats["sum"] + x.sum(0)
                stats["gram"] = stats["gram"] + x.T @ x
                stats["tokens"] += x.shape[0]
                stats["samples"] += 1
            return accumulate

        handles = [m.register_forward_hook(hook(name)) for name, m in linears.items()]
        for x in inputs:
            layer(x, **kwargs)
        for h in handles:
            h.remove()
        for offset, (name, linear) in enumerate(linears.items()):
            stats = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in sums[name].items()}
            weight = linear.weight.detach().numpy().astype(np.float32).copy()
            result = method.prune(Layer(name, weight, None, np.random.default_rng([0, index * 100 + offset]), stats),
                                  pattern)
            linear.weight.data = torch.from_numpy(result.weight)
            pruned[names[linear]] = result.weight
        outputs = []
        for x in inputs:
            out = layer(x, **kwargs)
            outputs.append(out[0] if isinstance(out, tuple) else out)
        inputs = outputs
    return pruned


def module_name_of(node_name: str, module_names: list[str]) -> str:
    """'/model/layers.0/self_attn/q_proj/MatMul' → 'model.layers.0.self_attn.q_proj'."""
    path = ".".join(node_name.strip("/").split("/")[:-1])
    matches = [m for m in module_names if m == path or m.endswith("." + path)]
    assert len(matches) == 1, (node_name, matches)
    return matches[0]


@pytest.mark.parametrize("arch", ["opt", "llama"])
@pytest.mark.parametrize("method,pattern", [("wanda", "0.5"), ("wanda", "2:4"), ("sparsegpt", "0.5"),
                                            ("sparsegpt", "4:8")])
def test_onnx_sequential_equals_torch_sequential(arch, method, pattern, hf_model, tmp_path):
    from transformers import AutoModelForCausalLM

    model_info = hf_model(arch)
    windows = np.random.default_rng(1).integers(4, 128, (NSAMPLES, SEQLEN)).astype(np.int64)
    inputs = {"input_ids": windows, "attention_mask": np.ones_like(windows),
              "position_ids": np.broadcast_to(np.arange(SEQLEN), windows.shape).copy()}
    calib = tmp_path / "calib.npz"
    np.savez(calib, **inputs)
    spec = ["--pattern", pattern] if ":" in pattern else ["--sparsity", pattern]
    out = tmp_path / "pruned.onnx"
    cli("apply", model_info.onnx_path, "--method", method, *spec, "--calib", calib, "-o", out,
        "--report", tmp_path / "r.json").ok()

    torch_model = AutoModelForCausalLM.from_pretrained(model_info.hf_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = torch_sequential_prune(torch_model, windows, method, parse_pattern(*_pattern_args(pattern)))

    targets = [t for t in discover_targets(load_model(out)) if t.block is not None]
    assert len(targets) == len(expected)
    module_names = list(expected)
    for target in targets:
        ours = target.read()
        theirs = expected[module_name_of(target.node_name, module_names)]
        assert ((ours == 0) == (theirs == 0)).mean() > 0.999, target.node_name
        np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-5, err_msg=target.node_name)
    report = json.loads((tmp_path / "r.json").read_text())
    assert {"calibrate", "prune", "load_data"} <= set(report["timings_s"])


def _pattern_args(pattern: str):
    return (pattern, None) if ":" in pattern else (None, float(pattern))


def test_one_shot_stats_file_round_trip(hf_model, tmp_path):
    """`calibrate` then `apply --stats` equals `apply --one-shot --calib` weight for weight."""
    model_info = hf_model("opt")
    windows = np.random.default_rng(2).integers(4, 128, (4, SEQLEN)).astype(np.int64)
    calib = tmp_path / "calib.npz"
    np.savez(calib, input_ids=windows, attention_mask=np.ones_like(windows),
             position_ids=np.broadcast_to(np.arange(SEQLEN), windows.shape).copy())
    cli("calibrate", model_info.onnx_path, "--calib", calib, "-o", tmp_path / "stats.npz").ok()
    cli("apply", model_info.onnx_path, "-m", "sparsegpt", "-s", "0.5", "--stats", tmp_path / "stats.npz",
        "-o", tmp_path / "a.onnx").ok()
    cli("apply", model_info.onnx_path, "-m", "sparsegpt", "-s", "0.5", "--one-shot", "--calib", calib,
        "-o", tmp_path / "b.onnx").ok()
    cli("apply", model_info.onnx_path, "-m", "sparsegpt", "-s", "0.5", "--calib", calib,
        "-o", tmp_path / "c.onnx").ok()
    a, b, c = ({t.name: t.read() for t in discover_targets(load_model(tmp_path / f"{x}.onnx"))} for x in "abc")
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-7)
    # Sequential statistics come from the pruned first block, so the second block must differ.
    assert any(not np.allclose(b[name], c[name]) for name in b if "layers.1" in name or "MatMul" in name)
