"""Coverage matrix: every weight form exporters write is found, pruned by every method (or refused
per layer with a reason), and the result runs in onnxruntime with the dense model's output shapes."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import weight_forms as forms
from conftest import cli
from graphs import save
from onnxprune.calibration import calibrate
from onnxprune.model_io import load_model
from onnxprune.targets import discover, discover_targets

CALIBRATED = ["wanda", "sparsegpt", "mama"]
SAMPLES = 8


def _prepare(tmp_path, build):
    model, names = build()
    source = save(model, tmp_path / "model.onnx")
    calib = tmp_path / "calib.npz"
    np.savez(calib, **forms.feeds(model, SAMPLES))
    return model, names, source, calib


def _apply(source, calib, out, method, *extra):
    args = ["apply", source, "-m", method, "-s", "0.5", "-o", out, "--report", out.with_suffix(".json"), *extra]
    if method in CALIBRATED:
        args += ["--calib", calib, "--nsamples", SAMPLES]
    return cli(*args)


def _run(path, model):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    sample = {k: v[:1] for k, v in forms.feeds(model, 1, seed=1).items()}
    return session.run(None, sample)


def _canonical(path) -> dict[str, np.ndarray]:
    return {t.name: t.read() for t in discover_targets(load_model(path))}


@pytest.mark.parametrize("build", forms.EQUIVALENT + forms.OTHER, ids=lambda b: b.__name__)
def test_found_pruned_and_runs(tmp_path, build):
    model, names, source, calib = _prepare(tmp_path, build)
    found = {t.name for t in discover(load_model(source)).targets}
    assert set(names) <= found, f"not found: {set(names) - found}"
    dense = _run(source, model)
    for method in ["magnitude", *CALIBRATED]:
        out = tmp_path / f"{method}.onnx"
        # the named weights, whether or not the default selection takes them (it leaves a recurrent R alone)
        result = _apply(source, calib, out, method, "--include", "^(" + "|".join(map(re.escape, names)) + ")$")
        if result.code == 2:  # refused as a whole: only when no layer can take the method, with its reason
            assert method in CALIBRATED and "calibration" in result.err, result.err
            continue
        result.ok()
        report = json.loads(out.with_suffix(".json").read_text())
        pruned = {t["name"] for t in report["targets"]}
        refused = {s["name"]: s["reason"] for s in report["skipped"]}
        assert set(names) <= pruned | set(refused), (method, report["skipped"])
        assert all(refused.values())
        if method == "magnitude":
            assert set(names) <= pruned
        for record in report["targets"]:
            assert record["sparsity"] == pytest.approx(0.5, abs=0.02), record
        outputs = _run(out, model)
        assert [o.shape for o in outputs] == [d.shape for d in dense]
        assert all(np.isfinite(o).all() for o in outputs)
        # no tensor is stored twice, and nothing was left behind
        saved = onnx.load(str(out))
        stored = [i.name for i in saved.graph.initializer]
        assert len(stored) == len(set(stored))


@pytest.mark.parametrize("build", forms.EQUIVALENT[1:], ids=lambda b: b.__name__)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_equivalent_forms_prune_alike(tmp_path, build, method):
    """Every form of y = x @ W gets the canonical weight the plain MatMul gets: the same layout
    and, for calibrated methods, the same activation statistics."""
    _, _, reference, calib = _prepare(tmp_path / "plain", forms.plain)
    _, (name,), source, _ = _prepare(tmp_path / build.__name__, build)
    _apply(reference, calib, tmp_path / "ref.onnx", method).ok()
    _apply(source, calib, tmp_path / "form.onnx", method).ok()
    expected = _canonical(tmp_path / "ref.onnx")["W"]
    actual = _canonical(tmp_path / "form.onnx")[name]
    assert ((expected == 0) == (actual == 0)).mean() > 0.99
    np.testing.assert_allclose(actual, expected, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("build, zero", [(forms.qdq_per_channel, forms.ZERO[None, :]),
                                         (forms.qdq_per_tensor, np.zeros(())),
                                         (forms.cast_mul_int8, forms.ZERO[None, :])],
                         ids=["per-channel", "per-tensor", "cast-mul"])
def test_quantized_weights_pruned_in_the_quantized_domain(tmp_path, build, zero):
    model, _, source, calib = _prepare(tmp_path, build)
    before = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for method in ["magnitude", "sparsegpt"]:
        _apply(source, calib, tmp_path / f"{method}.onnx", method).ok()
        after = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / f"{method}.onnx")).graph.initializer}
        codes = after["Wq"]
        assert codes.dtype == np.int8 and codes.shape == before["Wq"].shape
        pruned = codes == np.broadcast_to(zero, codes.shape).astype(np.int8)
        assert pruned.mean() == pytest.approx(0.5, abs=0.02)  # a pruned weight is its zero point
        for key in set(before) - {"Wq"}:  # scales and zero points untouched
            np.testing.assert_array_equal(after[key], before[key])
        if method == "magnitude":  # kept codes are the stored codes, exactly
            np.testing.assert_array_equal(codes[~pruned], before["Wq"][~pruned])


def test_constant_weight_becomes_one_initializer(tmp_path):
    _, _, source, calib = _prepare(tmp_path, forms.constant_node)
    _apply(source, calib, tmp_path / "out.onnx", "magnitude").ok()
    saved = onnx.load(str(tmp_path / "out.onnx"))
    assert [i.name for i in saved.graph.initializer] == ["W"]
    assert not [n for n in saved.graph.node if n.op_type == "Constant"]


def test_if_branch_weights_pruned_where_they_live(tmp_path):
    _, _, source, calib = _prepare(tmp_path, forms.if_branches)
    for method in ["magnitude", "wanda"]:
        _apply(source, calib, tmp_path / f"{method}.onnx", method).ok()
        saved = onnx.load(str(tmp_path / f"{method}.onnx"))
        then_branch = next(a.g for a in saved.graph.node[0].attribute if a.name == "then_branch")
        assert [i.name for i in then_branch.initializer] == ["W_inner"]  # written back where it lived
        assert (numpy_helper.to_array(then_branch.initializer[0]) == 0).mean() == pytest.approx(0.5)
        assert len(saved.graph.node[0].output) == 1  # calibration's extra If outputs are not saved
        report = json.loads((tmp_path / f"{method}.json").read_text())
        assert {t["name"] for t in report["targets"]} == {"W", "W_inner", "W2"} and not report["skipped"]


def test_if_branch_statistics_come_from_the_branch_each_sample_takes(tmp_path):
    model, _ = forms.if_branches()
    ir_model = load_model(save(model, tmp_path / "if.onnx"))
    targets = {t.name: t for t in discover_targets(ir_model)}
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((1, forms.SEQ, forms.K)).astype(np.float32) for _ in range(4)]
    takes_then = [True, False, True, False]
    samples = [{"X": x, "use_branch": np.array([flag])} for x, flag in zip(xs, takes_then)]
    stats = calibrate(ir_model, [list(targets.values())], samples, frozenset({"sq_sum", "gram"}))
    # W is read by both branches: every sample counts once, through the branch it took
    rows = np.concatenate([x.reshape(-1, forms.K) for x in xs])
    np.testing.assert_allclose(stats["W"]["sq_sum"], (rows ** 2).sum(0), rtol=1e-5)
    assert stats["W"]["tokens"] == len(rows)
    # W_inner only in the then-branch, on t0 = X @ W of the samples that took it
    t0 = np.concatenate([x.reshape(-1, forms.K) @ forms.W for x, flag in zip(xs, takes_then) if flag])
    np.testing.assert_allclose(stats["W_inner"]["gram"], t0.T @ t0, rtol=1e-4, atol=1e-4)
    assert stats["W_inner"]["tokens"] == len(t0)


def test_matmul_nbits_pruned_in_its_blocks(tmp_path):
    """A pruned 4-bit weight is its block's zero point; scales and zero points stay as they were,
    and magnitude (which changes no kept weight) keeps every other code."""
    model, _, source, calib = _prepare(tmp_path, forms.matmul_nbits)
    codes, _, zero = forms.nbits_codes(forms.W)
    before = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for method in ["magnitude", "sparsegpt"]:
        out = tmp_path / f"{method}.onnx"
        _apply(source, calib, out, method).ok()
        after = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(out)).graph.initializer}
        for key in ("scales", "zp"):
            np.testing.assert_array_equal(after[key], before[key])
        packed = after["Bq"]
        assert packed.dtype == np.uint8 and packed.shape == before["Bq"].shape
        new_codes = np.stack([packed & 15, packed >> 4], -1).reshape(codes.shape)
        pruned = new_codes == zero[..., None]
        assert pruned.mean() == pytest.approx(0.5, abs=0.05)
        if method == "magnitude":
            np.testing.assert_array_equal(new_codes[~pruned], codes[~pruned])
        record = next(t for t in json.loads(out.with_suffix(".json").read_text())["targets"] if t["name"] == "Bq")
        assert record["zeros"] == int(pruned.sum())  # the report counts the codes as stored
        verified = json.loads(cli("verify", out, "--json").ok().out)
        (layer,) = [row for row in verified["steps"][0]["layers"] if row["name"] == "Bq"]
        assert layer["storage"] == "matmulnbits" and layer["zeros"] == int(pruned.sum())


def test_unsupported_forms_are_listed_with_the_reason(tmp_path):
    _, _, source, calib = _prepare(tmp_path, forms.matmul_nbits_act_order)
    _apply(source, calib, tmp_path / "out.onnx", "magnitude").ok()
    report = json.loads((tmp_path / "out.json").read_text())
    (untouched,) = [u for u in report["untouched"] if u["name"] == "Bq"]
    assert untouched["op"] == "com.microsoft.MatMulNBits" and "g_idx" in untouched["reason"]
    assert any("g_idx" in note for note in report["notes"])
    inspected = cli("inspect", source, "--json").ok()
    assert [u["name"] for u in json.loads(inspected.out)["unsupported"]] == ["Bq"]


# ------------------------------------------------------------------ tiny optimum exports

def _lm_configs():
    from transformers import (DistilBertConfig, GemmaConfig, GPTNeoXConfig, MistralConfig, Phi3Config, Qwen2Config,
                              RobertaConfig, T5Config, ViTConfig, WhisperConfig)

    from conftest import VOCAB, _hf_configs

    common = dict(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                  hidden_size=32, intermediate_size=64)
    configs = {arch: (cls, config) for arch, (cls, config, _, _) in _hf_configs().items()}
    return {**configs,
            "mistral": ("AutoModelForCausalLM", MistralConfig(num_key_value_heads=2, **common)),  # GQA
            "qwen2": ("AutoModelForCausalLM", Qwen2Config(num_key_value_heads=2, **common)),  # GQA, q/k/v biases
            "phi3": ("AutoModelForCausalLM", Phi3Config(pad_token_id=0, **common)),  # fused qkv_proj, gate_up_proj
            "gemma": ("AutoModelForCausalLM", GemmaConfig(num_key_value_heads=2, head_dim=8, **common)),
            "gpt-neox": ("AutoModelForCausalLM", GPTNeoXConfig(**common)),
            "roberta": ("AutoModel", RobertaConfig(**{**common, "max_position_embeddings": 66})),
            "distilbert": ("AutoModel", DistilBertConfig(vocab_size=VOCAB, n_layers=2, n_heads=4, dim=32,
                                                         hidden_dim=64, max_position_embeddings=64)),
            "vit": ("AutoModel", ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=64, image_size=VIT_IMAGE, patch_size=8)),
            # optimum's dummy input is 3000 mel frames, so the encoder must take 2 × 1500 positions
            "whisper": ("AutoModelForSpeechSeq2Seq", WhisperConfig(
                vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16,
                max_source_positions=1500, max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                decoder_start_token_id=1)),
            "t5": ("AutoModelForSeq2SeqLM", T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                     num_heads=4, decoder_start_token_id=0))}


VIT_IMAGE = 32
# Seq2seq models export an encoder and a decoder; these rows prune the encoder.
ENCODER_ROWS = {"whisper-encoder": "automatic-speech-recognition", "t5-encoder": "text2text-generation"}


LM_ROWS = ["llama", "mistral", "qwen2", "phi3", "gemma", "gpt2", "gpt-neox", "opt", "bert", "roberta", "distilbert",
           "vit", "whisper-encoder", "t5-encoder",
           "llama-with-past", "llama-merged-decoder", "llama-fp16", "bert-ort-optimized"]


@pytest.fixture(scope="session")
def lm_export(tmp_path_factory):
    """`lm_export(row)`: the row's tiny random model exported (and transformed) once per session."""
    cache: dict[str, object] = {}

    def get(row: str):
        if row not in cache:
            cache[row] = _export_row(row, tmp_path_factory)
        return cache[row]

    return get


def _export_row(row: str, tmp_path_factory):
    import warnings

    import torch
    import transformers

    from onnxprune.exporters.hf import export_hf

    arch = row.split("-with-past")[0].split("-merged")[0].split("-fp16")[0].split("-ort")[0].split("-encoder")[0]
    root = tmp_path_factory.mktemp(f"lm-{row}")
    model_cls, config = _lm_configs()[arch]
    if isinstance(model_cls, str):
        model_cls = getattr(transformers, model_cls)
        build = model_cls.from_config
    else:
        build = model_cls
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build(config).eval().save_pretrained(root / "hf")
        dtype = "fp16" if row.endswith("fp16") else "fp32"
        path = export_hf(str(root / "hf"), root / "onnx", task=ENCODER_ROWS.get(row, "auto"),
                         with_past="past" in row or "merged" in row, dtype=dtype)
    if row in ENCODER_ROWS:
        path = path.parent / "encoder_model.onnx"
    if row.endswith("merged-decoder"):  # optimum's merged form: an If on use_cache_branch, branches share weights
        from optimum.onnx import merge_decoders

        merged = root / "merged.onnx"
        merge_decoders(str(path), str(path), save_path=str(merged), strict=False)
        path = merged
    if row.endswith("ort-optimized"):  # onnxruntime's transformers optimizer: fused Attention, SkipLayerNorm, ...
        from onnxruntime.transformers.optimizer import optimize_model

        optimized = root / "optimized.onnx"
        optimize_model(str(path), model_type="bert", num_heads=4, hidden_size=config.hidden_size).save_model_to_file(
            str(optimized))
        path = optimized
    return path


def _lm_feeds(path, samples: int) -> dict[str, np.ndarray]:
    """Stacked feeds (first axis = samples, each one batch of 8 tokens after 3 cached ones)."""
    rng = np.random.default_rng(0)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    sizes = {"sequence_length": 8, "past_sequence_length": 3, "past_sequence_length + sequence_length": 11,
             "num_channels": 3, "height": VIT_IMAGE, "width": VIT_IMAGE}
    feeds = {}
    for arg in session.get_inputs():
        shape = [samples] + [d if isinstance(d, int) else sizes.get(d, 8) for d in arg.shape[1:]]
        if arg.name == "use_cache_branch":
            feeds[arg.name] = np.ones([samples], bool)
        elif arg.name == "position_ids":
            feeds[arg.name] = np.tile(np.arange(shape[-1]) + (3 if "past" in str(session.get_inputs()) else 0),
                                      (samples, 1)).astype(np.int64)
        elif arg.type == "tensor(int64)" and "mask" in arg.name:
            feeds[arg.name] = np.ones(shape, np.int64)
        elif arg.type in ("tensor(int64)", "tensor(int32)"):
            high = 2 if "type" in arg.name else 100
            feeds[arg.name] = rng.integers(0, high, size=shape).astype(np.int64 if "64" in arg.type else np.int32)
        else:
            dtype = np.float16 if arg.type == "tensor(float16)" else np.float32
            feeds[arg.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def _block_linear_params(path) -> int:
    """Independent count: parameters of the rank-2 float initializers that block nodes (named
    /…/layers.N/… or /…/h.N/…, or onnxruntime's fused Attention) multiply, directly or through
    Transpose/Cast/Identity."""
    import re

    model = onnx.load(str(path))
    graphs, stack = [], [model.graph]
    while stack:
        graph = stack.pop()
        graphs.append(graph)
        stack += [a.g for n in graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
    arrays = {i.name: i for g in graphs for i in g.initializer}
    producer = {o: n for g in graphs for n in g.node for o in n.output}
    block = re.compile(r"[/.](layers|layer|h)[._]\d+[/._]")
    counted = set()
    linear = {"MatMul", "Gemm", "FusedMatMul", "Attention"}
    for node in (n for g in graphs for n in g.node):
        if node.op_type not in linear or not (block.search(node.name) or node.op_type == "Attention"):
            continue
        for name in node.input[:2]:
            while name in producer and producer[name].op_type in ("Transpose", "Cast", "Identity"):
                name = producer[name].input[0]
            if name in arrays and len(arrays[name].dims) == 2 and name not in counted:
                counted.add(name)
    return sum(int(np.prod(arrays[n].dims)) for n in counted)


@pytest.mark.parametrize("row", LM_ROWS)
def test_lm_export_forms(tmp_path, lm_export, row):
    source = lm_export(row)
    discovery = discover(load_model(source))
    in_blocks = sum(t.layout.out_features * t.layout.in_features for t in discovery.targets if t.block is not None)
    assert in_blocks == _block_linear_params(source) > 0  # every block weight found
    calib = tmp_path / "calib.npz"
    np.savez(calib, **_lm_feeds(source, 2))
    session = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    sample = {k: v[:1] for k, v in _lm_feeds(source, 1).items()}
    dense = session.run(None, sample)
    for method in ["magnitude", *CALIBRATED]:
        out = tmp_path / f"{method}.onnx"
        args = ["apply", source, "-m", method, "-s", "0.5", "-o", out, "--report", out.with_suffix(".json")]
        result = cli(*args, *(["--calib", calib, "--nsamples", 2] if method in CALIBRATED else []))
        result.ok()
        report = json.loads(out.with_suffix(".json").read_text())
        assert report["targets"] and all(s["reason"] for s in report["skipped"])
        outputs = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, sample)
        assert [o.shape for o in outputs] == [d.shape for d in dense]
        assert all(np.isfinite(o).all() for o in outputs)
