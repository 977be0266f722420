"""`inspect --json` against independent counts, and `export` of a local Hugging Face directory."""

from __future__ import annotations

import json

import onnx
import onnx_ir as ir
import pytest
from conftest import K_AXIS, assert_user_error, cli, group_zero_counts, initializers, layout_of, prune, snapshot
from graphs import conv_model, mixed_model, save

from onnxprune.targets import discover_targets, select_targets


@pytest.fixture(params=["gpt2", "mixed", "conv"])
def dense(request, hf_model, tmp_path):
    if request.param == "gpt2":
        return hf_model("gpt2").onnx_path
    build = {"mixed": mixed_model, "conv": lambda: conv_model(in_channels=8)}[request.param]
    return save(build(), tmp_path / "dense.onnx")


def inspect_json(path, *options) -> dict:
    return json.loads(cli("inspect", path, "--json", *options).ok().out)


def check_against_initializers(info: dict, path) -> None:
    """Every row and the totals agree with counts made from the raw initializers."""
    proto, weights = onnx.load(str(path)), initializers(path)
    rows = info["targets"]
    assert rows and {row["name"] for row in rows} <= set(weights)
    for row in rows:
        stored = weights[row["name"]]
        assert row["shape"] == list(stored.shape)
        assert row["params"] == stored.size and row["zeros"] == int((stored == 0).sum())
        k_axis = K_AXIS[layout_of(proto, row["name"])]
        for label, valid in row["nm_valid"].items():
            n, m = map(int, label.split(":"))
            assert valid == bool((group_zero_counts(stored, k_axis, m) >= n).all()), (row["name"], label)
    totals = info["totals"]
    assert totals["candidates"] == len(rows)
    assert totals["selected"] == sum(row["selected"] for row in rows)
    assert totals["params"] == sum(weights[row["name"]].size for row in rows)
    assert totals["selected_params"] == sum(weights[row["name"]].size for row in rows if row["selected"])
    assert totals["zeros"] == sum(int((weights[row["name"]] == 0).sum()) for row in rows)
    assert totals["sparsity"] == pytest.approx(totals["zeros"] / totals["params"])
    assert totals["blocks"] == len({row["block"] for row in rows if row["block"] is not None}) >= 2


def test_inspect_dense_model(dense):
    info = inspect_json(dense)
    check_against_initializers(info, dense)
    selected = [row for row in info["targets"] if row["selected"]]
    assert selected and all(row["nm_valid"] == {"2:4": False, "4:8": False} for row in selected)
    assert all(row["zeros"] == 0 for row in selected)
    assert len(selected) == len(select_targets(discover_targets(ir.load(dense))))


def test_inspect_after_2_4(dense, tmp_path):
    out = tmp_path / "pruned.onnx"
    prune(dense, out, "--pattern", "2:4")
    info = inspect_json(out, "--patterns", "2:4,4:8,3:4")
    check_against_initializers(info, out)
    for row in info["targets"]:
        if row["selected"]:
            assert row["nm_valid"] == {"2:4": True, "4:8": True, "3:4": False}, row["name"]
            assert row["sparsity"] == 0.5
        else:
            assert row["nm_valid"]["2:4"] is False and row["note"]
    assert info["totals"]["zeros"] == info["totals"]["selected_params"] // 2 + sum(
        row["zeros"] for row in info["targets"] if not row["selected"])


def test_inspect_after_unstructured_is_not_2_4(dense, tmp_path):
    out = tmp_path / "pruned.onnx"
    prune(dense, out, "--sparsity", "0.5")
    info = inspect_json(out)
    check_against_initializers(info, out)
    selected = [row for row in info["targets"] if row["selected"]]
    assert all(row["sparsity"] == 0.5 and row["nm_valid"]["2:4"] is False for row in selected)


def test_inspect_include_exclude(tmp_path):
    source = save(mixed_model(), tmp_path / "model.onnx")
    info = inspect_json(source, "--include", r"layers\.[01]\.", "--exclude", "layers.1")
    assert [row["name"] for row in info["targets"] if row["selected"]] == ["layers.0.weight"]
    assert info["totals"]["selected"] == 1


@pytest.mark.filterwarnings("ignore")  # the tracer's warnings about tiny shapes
def test_export_local_directory_through_cli(hf_model, tmp_path):
    model = hf_model("gpt2")
    result = cli("export", model.hf_dir, tmp_path / "export").ok()
    path = tmp_path / "export" / "model.onnx"
    assert path.is_file() and "wrote" in result.out
    targets = discover_targets(ir.load(path))
    assert len(select_targets(targets)) == model.selected
    assert f"{model.selected} selected by default" in result.out
    assert sorted(t.name for t in targets) == sorted(t.name for t in discover_targets(ir.load(model.onnx_path)))


def test_export_rejects_a_missing_directory(tmp_path):
    before = snapshot(tmp_path)
    line = assert_user_error(cli("export", tmp_path / "no-such-model", tmp_path / "out"))
    assert "not found" in line
    assert snapshot(tmp_path) == before
