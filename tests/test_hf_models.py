"""2:4 magnitude pruning of tiny random Llama, OPT, GPT-2 and BERT exports, end to end through the CLI."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_ir as ir
import pytest
from conftest import (ARCHS, K_AXIS, HFModel, assert_bit_identical, assert_nm, assert_runs_like, initializers,
                      layout_of, metadata, prune, sha256)

import onnxprune
from onnxprune.targets import discover_targets, select_targets


@dataclass
class Pruned:
    model: HFModel
    out: Path
    report: dict
    sha_before: str
    sha_after: str


@pytest.fixture(scope="module", params=ARCHS)
def pruned(request, hf_model, tmp_path_factory) -> Pruned:
    model = hf_model(request.param)
    work = tmp_path_factory.mktemp(f"pruned-{model.arch}")
    before = sha256(model.onnx_path)
    prune(model.onnx_path, work / "out.onnx", "--method", "magnitude", "--sparsity", "0.5", "--pattern", "2:4",
          report=work / "report.json")
    report = json.loads((work / "report.json").read_text())
    return Pruned(model, work / "out.onnx", report, before, sha256(model.onnx_path))


def test_input_file_unchanged(pruned):
    assert pruned.sha_after == pruned.sha_before


def test_default_selection_is_every_in_block_linear(pruned):
    targets = discover_targets(ir.load(pruned.model.onnx_path))
    selected = select_targets(targets)
    assert len(selected) == pruned.model.selected
    assert all(t.block is not None for t in selected)
    assert len({t.block for t in selected}) == 2  # two transformer layers
    assert [r["name"] for r in pruned.report["targets"]] == [t.name for t in selected]
    heads = [t for t in targets if "lm_head" in t.node_name]
    assert len(heads) == int(pruned.model.lm_head)
    assert all("LM head" in head.default_reason for head in heads)
    assert {t.name for t in targets} - {t.name for t in selected} == {head.name for head in heads}


def test_every_target_is_half_zero_and_2_4_along_k(pruned):
    proto = onnx.load(str(pruned.out))
    weights = initializers(pruned.out)
    rediscovered = [t.name for t in select_targets(discover_targets(ir.load(pruned.out)))]
    reported = [r["name"] for r in pruned.report["targets"]]
    assert rediscovered == reported
    for name in reported:
        stored = weights[name]
        assert (stored == 0).sum() * 2 == stored.size, name
        assert_nm(stored, K_AXIS[layout_of(proto, name)], 2, 4)
    for record in pruned.report["targets"]:
        assert record["sparsity"] == 0.5 and record["nm_valid"] is True
        assert record["zeros"] * 2 == record["params"]


def test_everything_else_is_bit_identical(pruned):
    before, after = initializers(pruned.model.onnx_path), initializers(pruned.out)
    assert set(after) == set(before)
    targets = {r["name"] for r in pruned.report["targets"]}
    assert_bit_identical(before, after, set(before) - targets)
    heads = [t.name for t in discover_targets(ir.load(pruned.model.onnx_path)) if "lm_head" in t.node_name]
    assert len(heads) == int(pruned.model.lm_head)
    assert not targets & set(heads)
    original, result = onnx.load(str(pruned.model.onnx_path)), onnx.load(str(pruned.out))
    assert [(n.op_type, list(n.input), list(n.output)) for n in result.graph.node] == \
           [(n.op_type, list(n.input), list(n.output)) for n in original.graph.node]


def test_pruned_model_runs_in_onnxruntime(pruned):
    outputs = assert_runs_like(pruned.out, pruned.model.onnx_path)
    assert outputs[0].shape[:2] == (2, 8)


def test_provenance_metadata(pruned):
    props = metadata(pruned.out)
    assert props["onnxprune.method"] == "magnitude"
    assert props["onnxprune.pattern"] == "2:4"
    assert float(props["onnxprune.sparsity"]) == 0.5
    assert props["onnxprune.version"] == onnxprune.__version__


def test_report_contents(pruned):
    report = pruned.report
    assert set(report["timings_s"]) == {"load", "discover", "prune", "emit", "save", "total"}
    assert all(seconds >= 0 for seconds in report["timings_s"].values())
    assert report["method"] == "magnitude" and report["pattern"] == "2:4" and report["sparsity"] == 0.5
    assert report["totals"]["targets"] == pruned.model.selected
    assert report["totals"]["zeros"] * 2 == report["totals"]["params"]
    assert report["skipped"] == []
    assert Path(report["output"]).resolve() == pruned.out.resolve()
