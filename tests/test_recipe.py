"""Recipes: structured FFN neurons -> SparseGPT 2:4 -> int8, from the CLI and from Python, verified;
validation errors name the stage and the key; the report alone reruns the recipe."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import assert_user_error, cli, initializers, metadata, sha256, snapshot
from lm_fixtures import SEQLEN

import onnxprune

STAGES = [
    {"name": "ffn", "prune": {"method": "l1", "pattern": "structured", "sparsity": 0.25, "kinds": ["ffn"]}},
    {"name": "2of4", "prune": {"method": "sparsegpt", "pattern": "2:4"}},
    {"name": "int8", "quantize": {"mode": "int8-static"}},
]


def recipe_dict(calib) -> dict:
    return {"calibration": {"source": str(calib), "nsamples": 4, "seqlen": SEQLEN}, "stages": STAGES}


def write_yaml(path, recipe) -> str:
    import yaml

    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def recipe_run(onnx_dir, eval_txt, tmp_path_factory):
    """The recipe run once from the CLI (and the folder it wrote to)."""
    tmp = tmp_path_factory.mktemp("recipe")
    before = snapshot(onnx_dir)
    recipe = write_yaml(tmp / "recipe.yaml", recipe_dict(eval_txt))
    out = tmp / "out.onnx"
    cli("run", recipe, onnx_dir / "model.onnx", "-o", out, "--report", tmp / "report.json").ok()
    assert snapshot(onnx_dir) == before
    return out, tmp


def test_recipe_from_the_cli_keeps_2of4_through_int8(recipe_run, onnx_dir, eval_txt):
    out, tmp = recipe_run
    report = json.loads((tmp / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["ffn", "2of4", "int8"]
    structured, two_four, int8 = (s["report"] for s in report["stages"])
    assert structured["totals"]["groups"] == 2 and structured["totals"]["units_after"] == 2 * 48
    assert two_four["totals"]["targets"] == 14 and two_four["totals"]["sparsity"] == pytest.approx(0.5)
    assert int8["zeros_kept"] and int8["pattern"] == "2:4"
    # the report reproduces the run: the recipe, its hash, the calibration data and its hash
    assert report["recipe"]["stages"][0]["prune"]["kinds"] == ["ffn"]
    assert report["calibration"]["sha256"] == sha256(eval_txt)
    stamped = metadata(out)
    assert json.loads(stamped["onnxprune.recipe"]) == report["recipe"]
    assert stamped["onnxprune.recipe_sha256"] == report["recipe_sha256"]
    assert json.loads(stamped["onnxprune.calibration"])["sha256"] == sha256(eval_txt)

    verified = json.loads(cli("verify", out, "--pattern", "2:4", "--json").ok().out)
    layers = [row for row in verified["steps"][0]["layers"] if row["required"]]
    assert len(layers) == 14 and all(row["pattern_valid"] and row["storage"] == "qdq" for row in layers)
    ppl = onnxprune.evaluate(out, eval_txt, seqlen=SEQLEN, max_windows=2, tokenizer=onnx_dir)
    assert np.isfinite(float(ppl))


def test_the_same_recipe_from_python_and_from_the_report(recipe_run, onnx_dir, eval_txt):
    out, tmp = recipe_run
    result = onnxprune.run_recipe(recipe_dict(eval_txt), onnx_dir / "model.onnx")
    result.save(tmp / "python.onnx")
    report = json.loads((tmp / "report.json").read_text())
    rerun = write_yaml(tmp / "from-report.yaml", report["recipe"])
    cli("run", rerun, onnx_dir / "model.onnx", "-o", tmp / "rerun.onnx").ok()
    want = initializers(out)
    for path in (tmp / "python.onnx", tmp / "rerun.onnx"):
        got = initializers(path)
        assert got.keys() == want.keys()
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"{path.name}: {name}")
    # prune(recipe=) is the same entry point
    assert onnxprune.prune(onnx_dir / "model.onnx", recipe=recipe_dict(eval_txt)).report.recipe_sha256 == \
        report["recipe_sha256"]


@pytest.mark.parametrize("change, message", [
    (lambda r: r["stages"][1]["prune"].update(sparsit=0.5), "stage 2 (2of4, prune): unknown key 'sparsit'"),
    (lambda r: r["stages"][0]["prune"].update(sparsity="half"), "stage 1 (ffn, prune): sparsity must be float"),
    (lambda r: r["stages"][1]["prune"].update(pattern="4:2"), "stage 2 (2of4, prune): --pattern 4:2"),
    (lambda r: r["stages"][1]["prune"].update(method="nope"), "stage 2 (2of4, prune): "),
    (lambda r: r["stages"][2]["quantize"].update(mode="fp8"), "stage 3 (int8, quantize): quantization mode"),
    (lambda r: r["stages"][0]["prune"].update(kinds=["rows"]), "stage 1 (ffn, prune): kinds"),
    (lambda r: r["stages"].append({"prune": {"method": "magnitude"}, "quantize": {}}), "stage 4: give exactly one"),
    (lambda r: r["stages"].append({"distill": {}}), "stage 4: unknown key 'distill'"),
    (lambda r: r["stages"][0].pop("prune"), "stage 1: give exactly one"),
    (lambda r: r.update(stages=[]), "`stages:` must be a non-empty list"),
    (lambda r: r["calibration"].update(nsamples="4"), "calibration: nsamples must be int"),
    (lambda r: r.update(passes={}), "unknown key 'passes'"),
])
def test_recipe_validation_errors_exit_2_naming_stage_and_key(onnx_dir, eval_txt, tmp_path, change, message):
    recipe = json.loads(json.dumps(recipe_dict(eval_txt)))
    change(recipe)
    path = write_yaml(tmp_path / "recipe.yaml", recipe)
    line = assert_user_error(cli("run", path, onnx_dir / "model.onnx", "-o", tmp_path / "out.onnx"))
    assert message in line, line
    assert not (tmp_path / "out.onnx").exists()


def test_recipe_files_that_are_not_recipes(onnx_dir, tmp_path):
    (tmp_path / "bad.yaml").write_text("stages: [prune: {method: magnitude}\n")
    assert "not a YAML recipe" in assert_user_error(cli("run", tmp_path / "bad.yaml", onnx_dir / "model.onnx",
                                                        "-o", tmp_path / "o.onnx"))
    assert "recipe file not found" in assert_user_error(cli("run", tmp_path / "none.yaml", onnx_dir / "model.onnx",
                                                            "-o", tmp_path / "o.onnx"))
