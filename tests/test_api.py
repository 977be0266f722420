"""The Python API: three lines in a notebook, models in memory, statistics reused, the CLI's results."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import REPO, cli, initializers, metadata, sha256, snapshot
from graphs import Dense, chain_model, save
from lm_fixtures import SEQLEN

import onnxprune
from onnxprune.errors import UserError


def test_three_lines_prune_evaluate_save(onnx_dir, eval_txt, tmp_path):
    model = onnx_dir / "model.onnx"
    before = snapshot(onnx_dir)
    result = onnxprune.prune(model, "wanda", 0.5, calib=eval_txt, nsamples=4, seqlen=SEQLEN)
    ppl = onnxprune.evaluate(result, eval_txt, seqlen=SEQLEN, max_windows=4)
    saved = result.save(tmp_path / "pruned.onnx")

    dense = onnxprune.evaluate(model, eval_txt, seqlen=SEQLEN, max_windows=4)
    assert math.isfinite(float(ppl)) and float(ppl) != pytest.approx(float(dense), rel=1e-6)
    assert snapshot(onnx_dir) == before  # the input folder is never touched
    totals = result.report.totals
    assert totals["targets"] == 14 and totals["sparsity"] == pytest.approx(0.5)
    stamped = metadata(saved)
    assert stamped["onnxprune.method"] == "wanda"
    calibration = json.loads(stamped["onnxprune.calibration"])
    assert calibration["sha256"] == sha256(eval_txt) and calibration["nsamples"] == 4
    assert result.report.calibration == calibration and result.report.output == str(saved)
    # the saved file evaluates as the in-memory model did
    assert float(onnxprune.evaluate(saved, eval_txt, seqlen=SEQLEN, max_windows=4,
                                    tokenizer=onnx_dir)) == pytest.approx(float(ppl), rel=1e-5)


def test_same_weights_as_the_cli(onnx_dir, eval_txt, tmp_path):
    model = onnx_dir / "model.onnx"
    cli("apply", model, "-m", "sparsegpt", "-p", "2:4", "--calib", eval_txt, "--nsamples", 4, "--seqlen", SEQLEN,
        "-o", tmp_path / "cli.onnx").ok()
    onnxprune.prune(model, "sparsegpt", pattern="2:4", calib=eval_txt, nsamples=4,
                    seqlen=SEQLEN).save(tmp_path / "api.onnx")
    want, got = initializers(tmp_path / "cli.onnx"), initializers(tmp_path / "api.onnx")
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def chain() -> onnx.ModelProto:
    return chain_model([Dense("MatMul", 32, 48), Dense("MatMul", 48, 32), Dense("MatMul", 32, 16)])


def test_models_in_memory_are_not_modified_and_statistics_are_reused():
    proto = chain()
    original = proto.SerializeToString()
    x = np.random.default_rng(0).normal(size=(16, 32)).astype(np.float32)
    stats = onnxprune.calibrate(proto, {"X": x}, include="layers")
    from_stats = onnxprune.prune(proto, "wanda", 0.5, stats=stats, include="layers")
    one_shot = onnxprune.prune(proto, "wanda", 0.5, calib=[{"X": x[i:i + 1]} for i in range(16)], one_shot=True,
                               include="layers")
    assert proto.SerializeToString() == original
    for a, b in zip(from_stats.to_onnx().graph.initializer, one_shot.to_onnx().graph.initializer):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
    assert from_stats.report.calibration["sha256"] == one_shot.report.calibration["sha256"]

    # an onnx_ir model and a PruneResult are inputs too, cloned rather than changed
    again = onnxprune.prune(from_stats, "magnitude", pattern="structured", sparsity=0.25, include="layers")
    assert again.report.params_after < again.report.params_before
    assert onnxprune.inspect(from_stats.model)["totals"]["sparsity"] == pytest.approx(0.5)
    fidelity = onnxprune.evaluate(from_stats, reference=proto, inputs={"X": x})
    assert 0 < fidelity["outputs"]["h2"]["cosine"] < 1


def test_save_refuses_to_overwrite_the_source_and_needs_onnx(tmp_path):
    path = save(chain(), tmp_path / "m.onnx")
    result = onnxprune.prune(path, "magnitude", 0.5, include="layers")
    with pytest.raises(UserError, match="is the input model"):
        result.save(path)
    with pytest.raises(UserError, match="must end in .onnx"):
        onnxprune.prune(chain(), "magnitude", include="layers").save(tmp_path / "x.bin")
    with pytest.raises(UserError, match="model must be"):
        onnxprune.prune(42)
    with pytest.raises(UserError, match="tokenizer"):  # text calibration of a model in memory needs one
        onnxprune.prune(onnx.load(str(path)), "wanda", calib="some.txt", include="layers")


def test_import_is_cheap_and_lazy():
    code = ("import sys, onnxprune; assert 'onnxruntime' not in sys.modules and 'onnxprune.api' not in sys.modules; "
            "onnxprune.prune; import onnxprune.evaluation; assert callable(onnxprune.evaluate); print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr
