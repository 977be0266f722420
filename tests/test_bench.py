"""`onnxprune bench`: latency per provider and batch, speed-up vs a dense baseline, output checks,
providers that cannot run here, the torch 2:4 GEMM backend, inputs. No timing is asserted."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from conftest import assert_user_error, cli, prune
from graphs import BATCH, Dense, chain_model, make_model, save, shared_weights_model, weight
from onnx import TensorProto, helper

from onnxprune.errors import UserError
from onnxprune.runtime_bench import gemm24
from onnxprune.runtime_bench.inputs import DEFAULT_VOCAB, InputMaker, model_vocab
from onnxprune.runtime_bench.latency import round_robin, wall_timer
from onnxprune.runtime_bench.providers import (ORT_NAMES, ProviderSettings, ProviderUnavailable,
                                               open_provider_session, parse_providers)
from onnxprune.runtime_bench.report import gemm24_markdown

FAST = ["--warmup", "1", "--runs", "3"]
GPU_EPS = {ORT_NAMES["cuda"], ORT_NAMES["tensorrt"]}
needs_no_gpu_ep = pytest.mark.skipif(bool(GPU_EPS & set(ort.get_available_providers())),
                                     reason="this onnxruntime has GPU providers")


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def bert_pair(hf_model, tmp_path_factory):
    """(2:4 magnitude-pruned BERT, its dense original)."""
    dense = hf_model("bert").onnx_path
    pruned = tmp_path_factory.mktemp("bench") / "bert-2of4.onnx"
    prune(dense, pruned, "--method", "magnitude", "--pattern", "2:4")
    return pruned, dense


@pytest.fixture
def chain(tmp_path):
    """X[batch, 64] → 64×64 → 64×64 → 64×32, pruned 2:4 (two weights share one GEMM shape)."""
    dense = save(chain_model([Dense("MatMul", 64, 64), Dense("MatMul", 64, 64), Dense("MatMul", 64, 32)]),
                 tmp_path / "chain.onnx")
    prune(dense, tmp_path / "chain-2of4.onnx", "--pattern", "2:4")
    return tmp_path / "chain-2of4.onnx"


def test_cpu_end_to_end_with_baseline(bert_pair, tmp_path):
    pruned, dense = bert_pair
    out = tmp_path / "out"
    result = cli("bench", pruned, "--baseline", dense, "--batch", "1,2", "--seqlen", "8", *FAST, "--threads", "1",
                 "-o", out).ok()
    data = json.loads((out / "bench.json").read_text())
    rows = {(r["model"], r["batch"]): r for r in data["rows"]}
    assert set(rows) == {(m, b) for m in ("model", "baseline") for b in (1, 2)}
    for (role, batch), row in rows.items():
        assert row["provider"] == "cpu" and row["runs"] == 3
        assert 0 < row["p50_ms"] <= row["p90_ms"]
        assert row["throughput"] == pytest.approx(batch / (row["mean_ms"] / 1e3))
        assert row["outputs_check"]["passed"] and row["outputs_check"]["status"] == "reference"
        if role == "model":
            assert row["speedup"] == pytest.approx(rows[("baseline", batch)]["p50_ms"] / row["p50_ms"])
            assert 0.9 < row["vs_baseline"]["cosine"] <= 1.0  # pruned, so close but not equal
    assert data["unavailable"] == [] and data["threads"] == 1 and data["labels"]["model"] == "bert-2of4.onnx"
    markdown = (out / "bench.md").read_text()
    for text in ("| model | provider | batch | p50 ms | p90 ms | throughput /s | speed-up vs baseline |",
                 "| bert-2of4.onnx | cpu | 2 |", "| model.onnx | cpu | 1 |", "reference (CPU)"):
        assert text in markdown and text in result.out
    assert "input_ids in [0, 128)" in data["inputs"]  # the embedding table's size, not the default


@needs_no_gpu_ep
def test_gpu_providers_reported_unavailable(chain, tmp_path):
    result = cli("bench", chain, "--providers", "cpu,cuda,tensorrt", "--batch", "2", *FAST, "-o", tmp_path).ok()
    data = json.loads((tmp_path / "bench.json").read_text())
    assert [r["provider"] for r in data["rows"]] == ["cpu"]
    reasons = {p["provider"]: p["reason"] for p in data["unavailable"]}
    assert set(reasons) == {"cuda", "tensorrt"}
    assert "has no CUDAExecutionProvider" in reasons["cuda"] and "TensorrtExecutionProvider" in reasons["tensorrt"]
    assert "## Unavailable" in result.out and "- cuda: onnxruntime" in result.out
    # only providers that cannot run: nothing to measure is a one-line error, not a crash
    assert "nothing could be measured" in assert_user_error(cli("bench", chain, "--providers", "cuda,tensorrt"))


def test_provider_that_falls_back_to_cpu_is_unavailable(chain, monkeypatch):
    """A GPU provider that is built in but cannot start must not report CPU timings under its name."""
    listed = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers", lambda: [*listed, *GPU_EPS])
    if GPU_EPS & set(listed):
        pytest.skip("this onnxruntime has GPU providers")
    for name in ("cuda", "tensorrt"):
        with pytest.raises(ProviderUnavailable, match="fell back|session creation failed"):
            open_provider_session(chain, name, ProviderSettings(threads=1))


def test_gemm24_unavailable_without_cuda(chain, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = gemm24.bench_gemm24(chain, [1, 8], 16)
    assert result["status"] == "unavailable" and result["reason"] == "no CUDA device"
    shapes = {(s["out"], s["k"]): s["layers"] for s in result["shapes"]}
    assert shapes == {(64, 64): 2, (32, 64): 1}  # identical GEMM shapes once, with their layer count
    assert result["not_2of4"] == 0


def test_gemm24_no_2of4_weights_is_unavailable(tmp_path):
    dense = save(chain_model([Dense("MatMul", 64, 64), Dense("MatMul", 64, 32)]), tmp_path / "dense.onnx")
    result = gemm24.bench_gemm24(dense, [1], 8)
    assert result["status"] == "unavailable" and result["not_2of4"] == 2 and result["shapes"] == []


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CUDA present: the GPU path runs instead")
def test_gemm24_through_the_cli_without_cuda(chain, tmp_path):
    result = cli("bench", chain, "--gemm24", "--batch", "1", *FAST, "-o", tmp_path).ok()
    assert "unavailable: no CUDA device" in result.out
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["gemm24"]["status"] == "unavailable"


@pytest.mark.skipif(gemm24.unavailable_reason() is not None, reason="needs a CUDA GPU with 2:4 sparse tensor cores")
def test_gemm24_on_cuda(chain):
    result = gemm24.bench_gemm24(chain, [1, 2], 64, warmup=2, runs=5)
    assert result["status"] == "ok" and result["backend"] in ("cuSPARSELt", "CUTLASS")
    assert [(r["out"], r["k"], r["tokens"]) for r in result["rows"]] == [(64, 64, 64), (64, 64, 128), (32, 64, 64),
                                                                         (32, 64, 128)]
    for row in result["rows"]:
        assert "error" not in row and "graph_error" not in row, row
        assert row["rel_error"] < 1e-2  # the same math in fp16
        for mode in ("eager", "graph"):
            assert row[mode]["dense_ms"] > 0 and row[mode]["sparse_ms"] > 0, row


def test_gemm24_timing_loop_dry_run_on_cpu(chain):
    """Everything but the CUDA calls: identity 'sparsify' and wall-clock timer on the CPU."""
    import torch

    shapes, _ = gemm24.gemm_shapes(chain)
    rows = gemm24.time_shapes(shapes, [4, 8], 1, 2, "cpu", torch.float32, lambda w: w, wall_timer)
    assert [(r["out"], r["k"], r["tokens"]) for r in rows] == [(64, 64, 4), (64, 64, 8), (32, 64, 4), (32, 64, 8)]
    assert all(r["eager"]["dense_ms"] > 0 and r["eager"]["sparse_ms"] > 0 and r["rel_error"] == 0 for r in rows)
    assert all("graph" not in r for r in rows)  # no capture on a CPU
    totals = gemm24.totals(rows, shapes)
    assert [(t["tokens"], t["mode"], t["layers"]) for t in totals] == [(4, "eager", 3), (8, "eager", 3)]
    markdown = gemm24_markdown({"status": "ok", "device": "cpu", "torch": "-", "backend": "none", "seqlen": 4,
                                "rows": rows, "totals": totals, "not_2of4": 0, "not_gemm": 0,
                                "shapes": [{"out": s["out"], "k": s["k"], "layers": s["layers"]} for s in shapes]})
    assert "| 64×64 | 4 |" in markdown and "| all 3 layers | 8 |" in markdown
    broken = gemm24.time_shapes(shapes[:1], [4], 0, 1, "cpu", torch.float32, _refuse, wall_timer)
    assert broken == [{"out": 64, "k": 64, "tokens": 4, "error": "shape not supported"}]


def _refuse(weight):
    raise RuntimeError("shape not supported\nsecond line")


def test_round_robin_alternates_and_stops_on_time():
    order = []
    calls = {name: (lambda name=name: order.append(name) or name) for name in "ab"}
    times, last = round_robin(calls, warmup=1, runs=3)
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b"] and last == {"a": "a", "b": "b"}
    assert [len(t) for t in times.values()] == [3, 3]
    times, _ = round_robin(calls, warmup=0, runs=50, max_seconds=0)
    assert [len(t) for t in times.values()] == [1, 1]


def _symbolic_model(dims, path):
    """X[dims] → MatMul W[32, 48] → Y."""
    node = helper.make_node("MatMul", ["X", "W"], ["Y"], name="/layers.0/fc/MatMul")
    model = make_model([node], [helper.make_tensor_value_info("X", TensorProto.FLOAT, dims)],
                       [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [*dims[:-1], 48])],
                       {"W": weight((32, 48), 0)})
    return save(model, path)


def test_symbolic_dimensions_resolved_by_name(tmp_path):
    path = _symbolic_model(["batch_size", "sequence_length", 32], tmp_path / "seq.onnx")
    feeds = InputMaker(path, _session(path), seqlen=5).feeds(3)
    assert feeds["X"].shape == (3, 5, 32) and feeds["X"].dtype == np.float32
    odd = _symbolic_model([BATCH, "num_choices", 32], tmp_path / "odd.onnx")
    with pytest.raises(UserError, match="input X has the symbolic dimension 'num_choices'.*--inputs"):
        InputMaker(odd, _session(odd), seqlen=5).feeds(1)
    message = assert_user_error(cli("bench", odd, *FAST))
    assert "num_choices" in message and "--inputs" in message


def test_npz_inputs(tmp_path):
    odd = _symbolic_model([BATCH, "num_choices", 32], tmp_path / "odd.onnx")
    x = np.random.default_rng(0).standard_normal((3, 4, 32)).astype(np.float32)
    np.savez(tmp_path / "x.npz", X=x)
    maker = InputMaker(odd, _session(odd), seqlen=99, npz=tmp_path / "x.npz")
    np.testing.assert_array_equal(maker.feeds(5)["X"], x[[0, 1, 2, 0, 1]])  # rows repeated to fill a batch
    out = tmp_path / "out"
    cli("bench", odd, "--inputs", tmp_path / "x.npz", "--batch", "1,5", *FAST, "-o", out).ok()
    data = json.loads((out / "bench.json").read_text())
    assert [r["batch"] for r in data["rows"]] == [1, 5] and data["inputs"].startswith("x.npz")
    np.savez(tmp_path / "wrong.npz", Z=x)
    assert "lack X" in assert_user_error(cli("bench", odd, "--inputs", tmp_path / "wrong.npz", *FAST))


def test_vocab_from_logits_embedding_or_default(hf_model, tmp_path):
    gpt2, bert = hf_model("gpt2").onnx_path, hf_model("bert").onnx_path
    assert model_vocab(gpt2, _session(gpt2)) == 128  # logits' last dimension
    assert model_vocab(bert, _session(bert)) == 128  # the Gather that reads input_ids
    shared = save(shared_weights_model(vocab=96), tmp_path / "shared.onnx")
    assert model_vocab(shared, _session(shared)) == 96
    plain = save(chain_model([Dense("MatMul", 32, 48)]), tmp_path / "plain.onnx")
    assert model_vocab(plain, _session(plain)) == DEFAULT_VOCAB


@pytest.mark.parametrize("args, expected", [
    (["missing.onnx"], "not found"),
    (["MODEL", "--providers", "cpu,gpu"], "unknown provider gpu"),
    (["MODEL", "--batch", "1,x"], "--batch"),
    (["MODEL", "--batch", "0"], "--batch"),
    (["MODEL", "--runs", "0"], "--runs"),
    (["MODEL", "--baseline", "missing.onnx"], "not found"),
    (["MODEL", "--baseline", "OTHER"], "same network"),
    (["MODEL", "--inputs", "missing.npz"], "not found"),
], ids=["missing model", "bad provider", "batch not integer", "batch zero", "runs zero", "missing baseline",
        "baseline of another network", "missing npz"])
def test_bad_input_is_one_line(args, expected, chain, tmp_path):
    other = _symbolic_model([BATCH, "sequence_length", 32], tmp_path / "other.onnx")
    names = {"MODEL": chain, "OTHER": other, "missing.onnx": tmp_path / "missing.onnx",
             "missing.npz": tmp_path / "missing.npz"}
    assert expected in assert_user_error(cli("bench", *FAST, *(names.get(a, a) for a in args)))


def test_parse_providers():
    assert parse_providers(" CPU, cuda,cpu ") == ["cpu", "cuda"]
    with pytest.raises(UserError):
        parse_providers(",")
