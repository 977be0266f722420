"""Structured pruning: whole neurons / heads / channels removed, a smaller dense graph that
onnxruntime runs.

The central check: channels whose weights are exactly zero contribute nothing, so once their
producer rows and consumer columns are zeroed, structured pruning at that sparsity must pick
exactly them and the smaller model must give the same outputs as the zeroed dense one.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import K_AXIS, OUT_AXIS, assert_user_error, cli, feeds_for, layout_of
from graphs import make_model, save
from onnxprune.calibration import calibrate
from onnxprune.model_io import load_model, save_model
from onnxprune.patterns import parse_pattern
from onnxprune.structured import METHOD_NEEDS, StructuredPlan, structured_prune
from onnxprune.errors import UserError

TOL = 1e-5


# ------------------------------------------------------------------------------------ helpers


def float_params(path) -> int:
    model = onnx.load(str(path))
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == TensorProto.FLOAT)


def run(path, feeds) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def zero_random_units(source, dest, sparsity: float, kinds, seed: int = 0, include=None) -> list[list[int] | None]:
    """Zero the producer rows and consumer columns of ⌊U·s⌋ random units of every prunable group;
    returns the zeroed units per group (None for refused groups)."""
    model = load_model(source)
    plan = StructuredPlan(model, kinds, include=include)
    rng = np.random.default_rng(seed)
    chosen = []
    for group in plan.groups:
        if not group.prunable:
            chosen.append(None)
            continue
        units = sorted(rng.choice(group.units, min(int(group.units * sparsity), group.units - 1), replace=False))
        for weight in group.weights:
            stored = weight.target.value.const_value.numpy().copy()
            index = [slice(None)] * stored.ndim
            index[weight.stored_axis] = np.flatnonzero(np.isin(weight.units_at(group.units), units))
            stored[tuple(index)] = 0.0
            weight.target.write(weight.target.layout.to_canonical(stored))
        chosen.append([int(u) for u in units])
    save_model(model, dest, external_data=False)
    return chosen


def prune_file(source, dest, sparsity: float, method: str = "l1", kinds=("ffn", "heads", "conv"), **kwargs):
    model = load_model(source)
    report = structured_prune(model, sparsity, method, kinds=kinds, **kwargs)
    save_model(model, dest, external_data=False)
    return report


def assert_same_outputs(a, b, feeds) -> None:
    for x, y in zip(run(a, feeds), run(b, feeds)):
        assert x.shape == y.shape
        assert np.allclose(x, y, atol=TOL), f"max difference {np.abs(x - y).max()}"


def assert_zeroed_channels_removed_exactly(tmp_path, source, sparsity, kinds, feeds_batch=2, seq=9, include=None):
    zeroed, pruned = tmp_path / "zeroed.onnx", tmp_path / "pruned.onnx"
    chosen = zero_random_units(source, zeroed, sparsity, kinds, include=include)
    report = prune_file(zeroed, pruned, sparsity, kinds=kinds, include=include)
    assert len(report.groups) == len(chosen)
    for record, units in zip(report.groups, chosen):
        if units is None:
            assert record.reason, record
            continue
        assert record.reason is None, record.reason
        assert record.removed == units, (record.producers, record.removed, units)
        assert record.units_after == record.units_before - len(units)
    onnx.checker.check_model(onnx.load(str(pruned)), full_check=True)  # strict shape inference
    session = ort.InferenceSession(str(pruned))
    assert_same_outputs(zeroed, pruned, feeds_for(session, batch=feeds_batch, seq=seq))
    assert float_params(pruned) < float_params(zeroed)
    return report


# --------------------------------------------------------------------------------- test models


@pytest.fixture(scope="module")
def llama_mha(tmp_path_factory):
    """Llama with as many KV heads as query heads (no GQA)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from onnxprune.exporters.hf import export_hf

    root = tmp_path_factory.mktemp("llama-mha")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        LlamaForCausalLM(config).eval().save_pretrained(root / "hf")
        return export_hf(str(root / "hf"), root / "onnx")


def cnn_model(seed: int = 0) -> onnx.ModelProto:
    """Conv-BN-Relu-Conv, then a residual block (conv, BN, Relu, depthwise conv, conv, BN, + skip),
    global pooling and a Gemm classifier; X [batch, 3, 8, 8] -> Y [batch, 10]."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], {}

    def array(*shape, low=None):
        if low is not None:
            return rng.uniform(low, 1.5, shape).astype(np.float32)
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    def conv(name, x, y, cin, cout, k=3, bias=True, group=1):
        inits[f"{name}.weight"] = array(cout, cin // group, k, k)
        inputs = [x, f"{name}.weight"] + ([f"{name}.bias"] if bias else [])
        if bias:
            inits[f"{name}.bias"] = array(cout)
        nodes.append(helper.make_node("Conv", inputs, [y], name=f"/{name}/Conv", pads=[k // 2] * 4, group=group))

    def bn(name, x, y, channels):
        names = [f"{name}.{p}" for p in ("scale", "bias", "mean", "var")]
        inits.update(zip(names, [array(channels, low=0.5), array(channels), array(channels), array(channels, low=0.5)]))
        nodes.append(helper.make_node("BatchNormalization", [x, *names], [y], name=f"/{name}/BatchNormalization"))

    def relu(x, y):
        nodes.append(helper.make_node("Relu", [x], [y], name=f"/{y}/Relu"))

    conv("layers.0.conv1", "X", "c1", 3, 16)
    bn("layers.0.bn1", "c1", "b1", 16)
    relu("b1", "r1")
    conv("layers.0.conv2", "r1", "c2", 16, 16)
    bn("layers.0.bn2", "c2", "b2", 16)
    relu("b2", "h0")
    conv("layers.1.conv_a", "h0", "ca", 16, 24, bias=False)
    bn("layers.1.bn_a", "ca", "ba", 24)
    relu("ba", "ra")
    conv("layers.1.dw", "ra", "dw", 24, 24, group=24)
    relu("dw", "rd")
    conv("layers.1.conv_b", "rd", "cb", 24, 16, k=1)
    bn("layers.1.bn_b", "cb", "bb", 16)
    nodes.append(helper.make_node("Add", ["bb", "h0"], ["sum"], name="/layers.1/Add"))
    relu("sum", "h1")
    nodes.append(helper.make_node("GlobalAveragePool", ["h1"], ["pool"], name="/head/GlobalAveragePool"))
    nodes.append(helper.make_node("Flatten", ["pool"], ["flat"], name="/head/Flatten"))
    inits["head.fc.weight"], inits["head.fc.bias"] = array(10, 16), array(10)
    nodes.append(helper.make_node("Gemm", ["flat", "head.fc.weight", "head.fc.bias"], ["Y"], name="/head/fc/Gemm",
                                  transB=1))
    return make_model(nodes, [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 3, 8, 8])],
                      [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 10])], inits, "cnn")


def mlp_model(seed: int = 0, fc2_bias: bool = True) -> onnx.ModelProto:
    """X [batch, 32] -> fc1 (+b) -> Relu -> fc2 (+b) -> Y, with hidden neurons whose input and output
    weights are scaled inversely (so weight norms and activation-weighted norms rank them differently)."""
    rng = np.random.default_rng(seed)
    scale = np.logspace(-1, 1, 64).astype(np.float32)[rng.permutation(64)]
    inits = {"layers.0.fc1.weight": (rng.standard_normal((32, 64)) * scale).astype(np.float32),
             "layers.0.fc1.bias": rng.standard_normal(64).astype(np.float32),
             "layers.0.fc2.weight": (rng.standard_normal((64, 32)) / scale[:, None]).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["X", "layers.0.fc1.weight"], ["h"], name="/layers.0/fc1/MatMul"),
             helper.make_node("Add", ["h", "layers.0.fc1.bias"], ["hb"], name="/layers.0/fc1/Add"),
             helper.make_node("Relu", ["hb"], ["a"], name="/layers.0/act/Relu"),
             helper.make_node("MatMul", ["a", "layers.0.fc2.weight"], ["y" if fc2_bias else "Y"],
                              name="/layers.0/fc2/MatMul")]
    if fc2_bias:
        inits["layers.0.fc2.bias"] = rng.standard_normal(32).astype(np.float32)
        nodes.append(helper.make_node("Add", ["y", "layers.0.fc2.bias"], ["Y"], name="/layers.0/fc2/Add"))
    return make_model(nodes, [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 32])],
                      [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 32])], inits, "mlp")


def mlp_samples(count: int = 16, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"X": rng.normal(1.0, 0.5, size=(8, 32)).astype(np.float32)} for _ in range(count)]


# -------------------------------------------------------------------- exact removal of zeros


@pytest.mark.parametrize("arch", ["llama", "opt", "bert"])
def test_zeroed_ffn_and_heads_are_removed_exactly(hf_model, tmp_path, arch):
    report = assert_zeroed_channels_removed_exactly(tmp_path, hf_model(arch).onnx_path, 0.5, ("ffn", "heads"))
    kinds = [g.kind for g in report.pruned]
    assert kinds.count("ffn") == 2 and kinds.count("heads") == 2, kinds
    for group in report.pruned:
        if group.kind == "heads":
            assert (group.heads_before, group.heads_after) == (4, 2)
    # the residual stream (hidden size) is never pruned: it is listed as refused, with the reason
    assert any(g.kind == "residual" and "normalis" in g.reason for g in report.refused)


def test_llama_without_gqa_prunes_single_heads(llama_mha, tmp_path):
    report = assert_zeroed_channels_removed_exactly(tmp_path, llama_mha, 0.5, ("heads",))
    heads = [g for g in report.pruned if g.kind == "heads"]
    assert len(heads) == 2 and all((g.unit, g.units_before, g.units_after) == ("heads", 4, 2) for g in heads)


def test_llama_gqa_prunes_whole_kv_groups(hf_model, tmp_path):
    """4 query heads share 2 KV heads: a unit is one KV head with its 2 query heads. Zero KV group 1
    by hand (k/v rows of KV head 1, q rows and o_proj columns of query heads 2 and 3)."""
    source = hf_model("llama").onnx_path
    model = onnx.load(str(source))
    arrays = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    head_dim = 8
    for node in model.graph.node:
        if node.op_type != "MatMul" or "self_attn" not in node.name or node.input[1] not in arrays:
            continue
        name, layout = node.input[1], layout_of(model, node.input[1])
        proj = node.name.split("/")[-2]
        axis = K_AXIS[layout] if proj == "o_proj" else OUT_AXIS[layout]
        start = (2 if proj in ("q_proj", "o_proj") else 1) * head_dim  # query heads 2-3, KV head 1
        stop = start + (2 * head_dim if proj in ("q_proj", "o_proj") else head_dim)
        index = [slice(None)] * 2
        index[axis] = slice(start, stop)
        arrays[name][tuple(index)] = 0.0
    for tensor in model.graph.initializer:
        tensor.CopyFrom(numpy_helper.from_array(arrays[tensor.name], tensor.name))
    zeroed, pruned = tmp_path / "zeroed.onnx", tmp_path / "pruned.onnx"
    onnx.save(model, str(zeroed))
    report = prune_file(zeroed, pruned, 0.5, kinds=("heads",))
    heads = [g for g in report.pruned if g.kind == "heads"]
    assert len(heads) == 2
    for group in heads:
        assert (group.unit, group.units_before, group.units_after, group.removed) == ("kv-groups", 2, 1, [1])
        assert (group.heads_before, group.heads_after) == (4, 2)
    result = onnx.load(str(pruned))
    shapes = {t.name: tuple(t.dims) for t in result.graph.initializer}
    weights = {n.name.split("/")[-2]: shapes[n.input[1]] for n in result.graph.node
               if n.op_type == "MatMul" and "layers.0/self_attn" in n.name and n.input[1] in shapes}
    assert weights == {"q_proj": (32, 16), "k_proj": (32, 8), "v_proj": (32, 8), "o_proj": (16, 32)}
    session = ort.InferenceSession(str(pruned))
    assert_same_outputs(zeroed, pruned, feeds_for(session, seq=9))


def test_opt_reshape_constants_carry_the_new_head_count(hf_model, tmp_path):
    pruned = tmp_path / "pruned.onnx"
    prune_file(hf_model("opt").onnx_path, pruned, 0.5, kinds=("heads",))
    model = load_model(pruned)
    for node in model.graph:
        if node.op_type == "Reshape" and "self_attn" in node.name and node.outputs[0].uses() \
                and node.outputs[0].uses()[0].node.op_type == "Transpose":
            pieces = node.inputs[1].producer().inputs
            tensors = [ir.convenience.get_const_tensor(p) for p in pieces[1:]]
            values = [int(t.numpy().reshape(-1)[0]) for t in tensors if t is not None]
            assert values == [-1, 2, 8], (node.name, values)  # [batch, -1, heads, head_dim]


def test_cnn_conv_bn_relu_conv_residual_and_depthwise(tmp_path):
    source = save(cnn_model(), tmp_path / "cnn.onnx")
    report = assert_zeroed_channels_removed_exactly(tmp_path, source, 0.5, ("conv",))
    by_producers = {tuple(g.producers): g for g in report.groups}
    assert by_producers[("/layers.0.conv1/Conv",)].units_after == 8
    # the residual join: conv2 and conv_b feed the same Add, so their channels go together, and the
    # classifier's input columns with them
    residual = by_producers[("/layers.0.conv2/Conv", "/layers.1.conv_b/Conv")]
    assert residual.reason is None and set(residual.consumers) == {"/layers.1.conv_a/Conv", "/head/fc/Gemm"}
    assert by_producers[("/layers.1.conv_a/Conv",)].units_after == 12
    model = onnx.load(str(tmp_path / "pruned.onnx"))
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert arrays["layers.1.dw.weight"].shape == (12, 1, 3, 3)
    assert next(a.i for n in model.graph.node if n.name == "/layers.1.dw/Conv" for a in n.attribute
                if a.name == "group") == 12
    assert arrays["layers.1.bn_a.mean"].shape == (12,) and arrays["head.fc.weight"].shape == (10, 8)


def test_failed_shape_check_puts_the_group_back(hf_model, tmp_path):
    """A group whose plan misses a Reshape constant would break the graph: the re-inferred shapes
    disagree with the plan, so the group is reverted and reported, and the model stays correct."""
    source = hf_model("opt").onnx_path
    model = load_model(source)
    plan = StructuredPlan(model, ("heads",))
    broken = next(g for g in plan.groups if g.kind == "heads")
    broken.entries.clear()
    report = plan.prune(0.5)
    record = report.groups[plan.groups.index(broken)]
    assert record.reason and "differ from the plan" in record.reason
    assert sum(g.reason is None for g in report.groups) == 1
    pruned = tmp_path / "pruned.onnx"
    save_model(model, pruned, external_data=False)
    session = ort.InferenceSession(str(pruned))
    assert run(pruned, feeds_for(session))[0].shape == run(source, feeds_for(session))[0].shape


# ----------------------------------------------------------------------------------- refusals


def test_refused_groups_are_listed_with_reasons(hf_model):
    report = structured_prune(load_model(hf_model("gpt2").onnx_path), 0.5)
    fused = [g for g in report.refused if "Split" in g.reason]
    assert len(fused) == 2 and all(g.kind == "heads" and "fused" in g.reason for g in fused)
    assert any(g.kind == "residual" and "LayerNormalization" in g.reason for g in report.refused)
    assert [g.kind for g in report.pruned] == ["ffn", "ffn"]  # c_fc -> gelu -> c_proj through Reshapes
    report = structured_prune(load_model(hf_model("llama").onnx_path), 0.5)
    residual = [g for g in report.refused if g.kind == "residual"]
    assert len(residual) == 1 and "RMSNorm" in residual[0].reason


# ----------------------------------------------------------------------- methods and the move


def calibrated_mlp(tmp_path, fc2_bias=True):
    source = save(mlp_model(fc2_bias=fc2_bias), tmp_path / "mlp.onnx")
    model = load_model(source)
    plan = StructuredPlan(model)
    samples = mlp_samples()
    stats = calibrate(model, [plan.consumers()], samples, METHOD_NEEDS["mama"])
    return source, samples, stats


def output_error(source, pruned, samples) -> float:
    return float(np.mean([np.mean((run(source, s)[0] - run(pruned, s)[0]) ** 2) for s in samples]))


def test_methods_rank_channels_differently(tmp_path):
    source, samples, stats = calibrated_mlp(tmp_path)
    removed = {}
    for method in ("l1", "wanda", "mama"):
        report = prune_file(source, tmp_path / f"{method}.onnx", 0.5, method, stats=stats)
        (group,) = report.pruned
        assert group.units_after == 32
        removed[method] = group.removed
    assert removed["l1"] != removed["wanda"]
    assert removed["mama"] == removed["wanda"]  # same scores; mama also moves the mean into the bias
    assert output_error(source, tmp_path / "wanda.onnx", samples) < output_error(source, tmp_path / "l1.onnx", samples)


def test_mama_bias_move_reduces_output_error(tmp_path):
    """On the calibration data the move removes exactly the mean of the removal error:
    E‖e − ē‖² = E‖e‖² − ‖ē‖², with e = dense − pruned outputs of the same removed units."""
    source, samples, stats = calibrated_mlp(tmp_path)
    wanda = prune_file(source, tmp_path / "wanda.onnx", 0.5, "wanda", stats=stats)
    mama = prune_file(source, tmp_path / "mama.onnx", 0.5, "mama", stats=stats)
    assert mama.pruned[0].removed == wanda.pruned[0].removed
    assert mama.pruned[0].bias_moved is True and wanda.pruned[0].bias_moved is None
    errors = np.concatenate([run(source, s)[0] - run(tmp_path / "wanda.onnx", s)[0] for s in samples])
    error_wanda, error_mama = output_error(source, tmp_path / "wanda.onnx", samples), \
        output_error(source, tmp_path / "mama.onnx", samples)
    mean_part = float(np.mean(errors.mean(axis=0) ** 2))
    assert mean_part > 0.05 * error_wanda  # the data has non-zero means
    assert error_mama < error_wanda
    assert np.isclose(error_mama, error_wanda - mean_part, rtol=1e-3), (error_mama, error_wanda, mean_part)


def test_mama_adds_a_bias_only_when_asked(tmp_path):
    source, samples, stats = calibrated_mlp(tmp_path, fc2_bias=False)
    plain = prune_file(source, tmp_path / "plain.onnx", 0.5, "mama", stats=stats)
    assert plain.pruned[0].bias_moved is False
    added = prune_file(source, tmp_path / "added.onnx", 0.5, "mama", stats=stats, add_bias=True)
    assert added.pruned[0].bias_moved is True
    ops = [n.op_type for n in onnx.load(str(tmp_path / "added.onnx")).graph.node]
    assert ops.count("Add") == 2  # fc1's bias and the new one after fc2
    assert output_error(source, tmp_path / "added.onnx", samples) < output_error(source, tmp_path / "plain.onnx", samples)


def test_wanda_without_statistics_is_a_clear_error(tmp_path):
    source = save(mlp_model(), tmp_path / "mlp.onnx")
    with pytest.raises(UserError, match="calibration statistics"):
        structured_prune(load_model(source), 0.5, "wanda")
    with pytest.raises(UserError, match="supports --method"):
        structured_prune(load_model(source), 0.5, "sparsegpt")


# ------------------------------------------------------------------------------------------ CLI


def test_parse_pattern_structured():
    assert parse_pattern("structured", 0.5).structured and parse_pattern("structured", 0.5).label == "structured"
    with pytest.raises(UserError, match="needs --sparsity"):
        parse_pattern("structured", None)


def test_cli_structured_end_to_end(hf_model, tmp_path):
    source = hf_model("bert").onnx_path
    out, report_path = tmp_path / "bert-structured.onnx", tmp_path / "report.json"
    result = cli("apply", source, "--pattern", "structured", "--sparsity", "0.5", "--method", "l1", "-o", out,
                 "--report", report_path).ok()
    assert "pruned 4 channel groups" in result.out
    assert float_params(out) < float_params(source)
    report = json.loads(report_path.read_text())
    assert report["pattern"] == "structured" and report["totals"]["params_after"] == float_params(out)
    assert {g["kind"] for g in report["groups"] if g["reason"] is None} == {"ffn", "heads"}
    assert all(g["reason"] for g in report["groups"] if g["kind"] == "residual")
    assert "Refused groups" in report_path.with_suffix(".md").read_text()
    session = ort.InferenceSession(str(out))
    assert run(out, feeds_for(session))[0].shape == run(source, feeds_for(session))[0].shape


def test_cli_structured_mama_calibrates_on_npz(tmp_path):
    source = save(cnn_model(), tmp_path / "cnn.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", X=rng.standard_normal((8, 3, 8, 8)).astype(np.float32))
    out = tmp_path / "cnn-mama.onnx"
    cli("apply", source, "--pattern", "structured", "-s", "0.25", "-m", "mama", "--calib", tmp_path / "calib.npz",
        "-o", out, "--report", tmp_path / "r.json").ok()
    report = json.loads((tmp_path / "r.json").read_text())
    assert [g["units_after"] for g in report["groups"]] == [12, 12, 18]
    assert all(g["bias_moved"] is not None for g in report["groups"])
    assert float_params(out) < float_params(source)
    feeds = {"X": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)}
    assert run(out, feeds)[0].shape == (2, 10)


def test_cli_structured_refuses_when_no_group_can_be_pruned(hf_model):
    message = assert_user_error(cli("apply", hf_model("gpt2").onnx_path, "--pattern", "structured", "-s", "0.5",
                                    "--include", "c_attn", "-o", "/tmp/never-written.onnx"))
    assert "no prunable channel group" in message and "Split" in message


def test_cli_structured_wanda_from_a_statistics_file(tmp_path):
    source = save(mlp_model(), tmp_path / "mlp.onnx")
    rng = np.random.default_rng(0)
    inputs = rng.normal(1.0, 0.5, size=(32, 32)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", X=inputs)
    cli("calibrate", source, "--calib", tmp_path / "calib.npz", "-o", tmp_path / "stats.npz").ok()
    cli("apply", source, "--pattern", "structured", "-s", "0.5", "-m", "wanda", "--stats", tmp_path / "stats.npz",
        "-o", tmp_path / "cli.onnx", "--report", tmp_path / "r.json").ok()
    model = load_model(source)
    plan = StructuredPlan(model)
    stats = calibrate(model, [plan.consumers()], [{"X": inputs[i:i + 1]} for i in range(32)], METHOD_NEEDS["wanda"])
    expected = plan.prune(0.5, "wanda", stats)
    assert json.loads((tmp_path / "r.json").read_text())["groups"][0]["removed"] == expected.groups[0].removed
