"""The core install (no torch, transformers, datasets, matplotlib) prunes, inspects and emits a CNN,
SparseGPT and MAMA included (their solves run on numpy); commands that need an extra say which one
in one `error:` line."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
from conftest import REPO, initializers
from graphs import conv_model, save

from onnxprune.extras import EXTRA_OF

# Runs in a fresh interpreter: a meta-path finder makes every optional package look absent, then
# each command runs through the CLI and its exit code and output are collected.
LEAN_RUNNER = textwrap.dedent("""
    import contextlib, io, json, sys

    BLOCKED = set(json.loads(sys.argv[1]))

    class Absent:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Absent())
    from onnxprune.cli import main

    results = []
    for args in json.loads(sys.argv[2]):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(args)
                code = 0
            except SystemExit as exc:
                code = exc.code
        results.append({"code": code, "out": out.getvalue(), "err": err.getvalue()})
    results.append(sorted(name for name in sys.modules if name.partition(".")[0] in BLOCKED))
    print(json.dumps(results))
""")


def run_lean(*commands: list[str]) -> tuple[list[dict], list[str]]:
    done = subprocess.run([sys.executable, "-c", LEAN_RUNNER, json.dumps(sorted(EXTRA_OF)),
                           json.dumps([[str(a) for a in c] for c in commands])],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    *results, imported = json.loads(done.stdout.splitlines()[-1])
    return results, imported


def test_core_install_prunes_a_cnn_without_optional_packages(tmp_path):
    model = save(conv_model(16), tmp_path / "cnn.onnx")
    out50, out24, structured, compressed = (tmp_path / f"{n}.onnx" for n in ("m50", "m2of4", "s50", "c50"))
    results, imported = run_lean(
        ["apply", model, "-m", "magnitude", "-s", "0.5", "-o", out50],
        ["apply", model, "-m", "magnitude", "-p", "2:4", "-o", out24, "--report", tmp_path / "r.json"],
        ["apply", model, "-p", "structured", "-s", "0.5", "-o", structured],
        ["apply", model, "-m", "magnitude", "-s", "0.5", "--target", "compressed", "-o", compressed],
        ["inspect", out24, "--json"],
        ["export", "some/model", tmp_path / "exported"],
    )
    for result in results[:5]:
        assert result["code"] == 0, result
    assert imported == []  # nothing optional was even partly imported

    for path in (out50, out24):
        weights = initializers(path)
        for name in ("layers.0.conv.weight", "layers.1.conv.weight"):
            assert np.count_nonzero(weights[name] == 0) == weights[name].size // 2
    groups = initializers(out24)["layers.1.conv.weight"].transpose(0, 2, 3, 1).reshape(-1, 4)
    assert ((groups == 0).sum(axis=1) == 2).all()  # 2:4 along the input channels
    assert initializers(structured)["layers.0.conv.weight"].shape[0] == 8
    inspected = json.loads(results[4]["out"])
    assert all(row["nm_valid"]["2:4"] for row in inspected["targets"])

    export = results[5]
    assert export["code"] == 2 and export["out"] == ""
    assert export["err"] == "error: export needs the [hf] extra: pip install 'onnxprune[hf]'\n"
    assert not (tmp_path / "exported").exists()


def test_core_install_runs_sparsegpt_and_mama_on_numpy(tmp_path):
    model = save(conv_model(16), tmp_path / "cnn.onnx")
    calib = tmp_path / "calib.npz"
    np.savez(calib, X=np.random.default_rng(0).standard_normal((8, 16, 8, 8)).astype(np.float32))
    outputs = {run: tmp_path / f"{run}.onnx" for run in ("sparsegpt50", "sparsegpt24", "mama50", "mama24")}
    results, imported = run_lean(*[
        ["apply", model, "-m", run[:-2], "-p", "2:4" if run.endswith("24") else "unstructured", "-s", "0.5",
         "--calib", calib, "-o", out] for run, out in outputs.items()])
    for result in results:
        assert result["code"] == 0, result
    assert imported == []  # no torch, not even partly

    dense = initializers(model)
    for run, out in outputs.items():
        weights = initializers(out)
        for name in ("layers.0.conv.weight", "layers.1.conv.weight"):
            w = weights[name]
            if run.endswith("24"):
                assert ((w.transpose(0, 2, 3, 1).reshape(-1, 4) == 0).sum(axis=1) == 2).all(), (run, name)
            else:
                assert np.count_nonzero(w == 0) >= w.size // 2, (run, name)
            kept = w != 0
            assert not np.array_equal(w[kept], dense[name][kept]), (run, name)  # the solves moved the kept weights
