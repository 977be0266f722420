"""Faults a user meets: broken models and data, unwritable paths, a full disk, a kill mid-run.

Each case asserts the exit code, the one-line message, the untouched input (hashes before and
after) and that nothing is left behind (no output, no staging folder), or, where continuing is
sound, a warning on stderr and in the report.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir
import pytest
from conftest import REPO, assert_user_error, cli, snapshot
from graphs import Dense, chain_model, save
from onnx import numpy_helper

from onnxprune import atomic

K = 32


def dense_model(folder: Path, name: str = "model.onnx", external: bool = False) -> Path:
    return save(chain_model([Dense("MatMul", K, 48), Dense("MatMul", 48, 16)]), folder / name, external)


def broken_model(folder: Path, value: float) -> Path:
    """The dense model with one `value` (NaN / Inf) in its first weight."""
    model = chain_model([Dense("MatMul", K, 48), Dense("MatMul", 48, 16)])
    tensor = model.graph.initializer[0]
    array = numpy_helper.to_array(tensor).copy()
    array[3, 5] = value
    tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    return save(model, folder / "model.onnx")


def inputs(folder: Path, array: np.ndarray, name: str = "calib.npz") -> Path:
    np.savez(folder / name, X=array.astype(np.float32))
    return folder / name


def normal(rows: int = 8, width: int = K) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(rows, width))


def assert_refused(folder: Path, *args, expected: str) -> str:
    """Exit 2 with one `error:` line containing `expected`; every file in `folder` unchanged, none added."""
    before = snapshot(folder)
    names = sorted(p.name for p in folder.iterdir())
    line = assert_user_error(cli(*args))
    assert expected in line, line
    assert snapshot(folder) == before
    assert sorted(p.name for p in folder.iterdir()) == names, "something was left behind"
    return line


# ------------------------------------------------------------------------ broken models and data


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_non_finite_weight_is_refused_naming_the_layer(tmp_path, value, method):
    model = broken_model(tmp_path, value)
    calib = ["--calib", inputs(tmp_path, normal())] if method != "magnitude" else []
    line = assert_refused(tmp_path, "apply", model, "-m", method, "-s", "0.5", *calib, "-o", tmp_path / "out.onnx",
                          expected="/layers.0/fc/MatMul: weight layers.0.weight holds 1 NaN/Inf values")
    assert "--exclude" in line


def test_non_finite_weight_structured_is_refused(tmp_path):
    model = broken_model(tmp_path, np.nan)
    assert_refused(tmp_path, "apply", model, "--pattern", "structured", "-s", "0.5", "-o", tmp_path / "out.onnx",
                   expected="holds 1 NaN/Inf values")


def test_excluding_the_broken_layer_is_the_fix(tmp_path):
    model = broken_model(tmp_path, np.nan)
    cli("apply", model, "-s", "0.5", "--exclude", "layers.0", "-o", tmp_path / "out.onnx").ok()


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "mama"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_calibration_data_is_refused(tmp_path, method, bad):
    data = normal()
    data[:, 4] = bad
    model, calib = dense_model(tmp_path), inputs(tmp_path, data)
    assert_refused(tmp_path, "apply", model, "-m", method, "-s", "0.5", "--calib", calib, "-o", tmp_path / "out.onnx",
                   expected="calib.npz: input X holds NaN/Inf values (sample 0)")


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "mama"])
def test_all_zero_calibration_is_refused(tmp_path, method):
    """SparseGPT used to zero 100% of the weights here and exit 0."""
    model, calib = dense_model(tmp_path), inputs(tmp_path, np.zeros((8, K)))
    assert_refused(tmp_path, "apply", model, "-m", method, "-s", "0.5", "--calib", calib, "-o", tmp_path / "out.onnx",
                   expected="/layers.0/fc/MatMul: the calibration activations reaching it are all zero")


def test_all_zero_statistics_file_is_refused(tmp_path):
    model, calib = dense_model(tmp_path), inputs(tmp_path, np.zeros((8, K)))
    cli("calibrate", model, "--calib", calib, "-o", tmp_path / "stats.npz").ok()
    assert_refused(tmp_path, "apply", model, "-m", "wanda", "-s", "0.5", "--stats", tmp_path / "stats.npz",
                   "-o", tmp_path / "out.onnx", expected="all zero")


def test_constant_calibration_continues_with_a_warning(tmp_path):
    model, calib = dense_model(tmp_path), inputs(tmp_path, np.ones((8, K)))
    result = cli("apply", model, "-m", "wanda", "-s", "0.5", "--calib", calib, "-o", tmp_path / "out.onnx",
                 "--report", tmp_path / "r.json").ok()
    warning = [line for line in result.err.splitlines() if line.startswith("warning: ")]
    assert len(warning) == 1 and "the same for every token" in warning[0] and "/layers.0/fc/MatMul" in warning[0]
    assert warning[0] in json.loads((tmp_path / "r.json").read_text())["notes"]


def test_calibration_of_the_wrong_width_is_refused(tmp_path):
    model, calib = dense_model(tmp_path), inputs(tmp_path, normal(width=40))
    assert_refused(tmp_path, "apply", model, "-m", "wanda", "-s", "0.5", "--calib", calib, "-o", tmp_path / "out.onnx",
                   expected="input X has shape [1, 40] per sample, the model takes [?, 32]")


def test_calibration_of_the_wrong_dtype_is_refused(tmp_path):
    model = dense_model(tmp_path)
    np.savez(tmp_path / "calib.npz", X=normal().astype(np.float64))
    assert_refused(tmp_path, "apply", model, "-m", "wanda", "-s", "0.5", "--calib", tmp_path / "calib.npz",
                   "-o", tmp_path / "out.onnx", expected="input X is float64, the model takes float32")


def test_empty_file_is_not_an_empty_model(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"")
    assert_refused(tmp_path, "apply", tmp_path / "model.onnx", "-s", "0.5", "-o", tmp_path / "out.onnx",
                   expected="is empty (0 bytes)")


def test_missing_external_data_is_refused(tmp_path):
    model = dense_model(tmp_path, external=True)
    (tmp_path / "model.onnx.data").unlink()
    assert_refused(tmp_path, "apply", model, "-s", "0.5", "-o", tmp_path / "out.onnx",
                   expected="keeps weight layers.0.weight in model.onnx.data, which is missing")


def test_truncated_external_data_is_refused(tmp_path):
    model = dense_model(tmp_path, external=True)
    data = tmp_path / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    assert_refused(tmp_path, "apply", model, "-s", "0.5", "-o", tmp_path / "out.onnx", expected="is truncated")


# ----------------------------------------------------------------------------- unwritable paths


@pytest.mark.parametrize("where", ["output", "report", "report under output dir"])
def test_paths_under_a_file_are_refused_before_any_work(tmp_path, where):
    model = dense_model(tmp_path)
    (tmp_path / "afile").write_text("x")
    output, report = tmp_path / "out.onnx", tmp_path / "r.json"
    if where == "output":
        output = tmp_path / "afile" / "out.onnx"
    else:
        report = tmp_path / "afile" / "r.json"
    assert_refused(tmp_path, "apply", model, "-s", "0.5", "-o", output, "--report", report,
                   expected="afile is a file, not a directory")


@pytest.mark.parametrize("command", [
    lambda d: ["eval", d / "model.onnx", "--reference", d / "model.onnx", "--inputs", d / "calib.npz",
               "-o", d / "afile" / "f.json"],
    lambda d: ["calibrate", d / "model.onnx", "--calib", d / "calib.npz", "-o", d / "afile" / "s.npz"],
    lambda d: ["sweep", d / "model.onnx", "--methods", "magnitude", "--levels", "0.5", "--eval", "wikitext2",
               "-o", d / "afile"],
    lambda d: ["bench", d / "model.onnx", "--runs", "1", "-o", d / "afile"],
], ids=["eval -o", "calibrate -o", "sweep -o", "bench -o"])
def test_other_commands_check_their_outputs_first(tmp_path, command):
    dense_model(tmp_path)
    inputs(tmp_path, normal())
    (tmp_path / "afile").write_text("x")
    assert_refused(tmp_path, *command(tmp_path), expected="afile")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_refused(tmp_path):
    model = dense_model(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert_refused(tmp_path, "apply", model, "-s", "0.5", "-o", locked / "out.onnx", expected="is not writable")
    finally:
        locked.chmod(0o755)


# ------------------------------------------------------------------------------------ full disk


def raise_enospc(*args, **kwargs):
    path = next((a for a in args if isinstance(a, (str, os.PathLike))), None)
    if path is not None:
        Path(path).write_bytes(b"partial")  # a writer dies after writing part of its file
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_saving_the_model(tmp_path, monkeypatch):
    model = dense_model(tmp_path)
    monkeypatch.setattr(onnx_ir, "save", raise_enospc)
    line = assert_refused(tmp_path, "apply", model, "-s", "0.5", "-o", tmp_path / "out.onnx",
                          expected="No space left on device")
    assert "out.onnx" in line and "free space" in line


def test_disk_full_while_writing_the_report(tmp_path, monkeypatch):
    model = dense_model(tmp_path)
    real = Path.write_text
    monkeypatch.setattr(Path, "write_text", lambda self, *a, **k: raise_enospc(self) if self.name.startswith(
        ".r.json") else real(self, *a, **k))
    line = assert_user_error(cli("apply", model, "-s", "0.5", "-o", tmp_path / "out.onnx", "--report",
                                 tmp_path / "r.json"))
    assert "r.json" in line and "No space left on device" in line
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging left behind"


# ------------------------------------------------------------------------------------- signals

DRIVER = '''
import pathlib, sys, time
mode, marker, argv = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3:]

def stall(*args, **kwargs):
    marker.touch()
    time.sleep(120)

if mode == "save":  # the writer has written part of the staged model when the signal comes
    import onnx_ir
    def partial_save(model, path, **kwargs):
        pathlib.Path(path).write_bytes(b"partial" * 100_000)
        stall()
    onnx_ir.save = partial_save
else:  # mid-calibration: the first segment's statistics are being gathered
    import onnxprune.calibration as calibration
    calibration._segment_statistics = stall

from onnxprune.cli import main
main(argv)
'''


def start_killable(tmp_path: Path, mode: str, *args) -> tuple[subprocess.Popen, Path]:
    driver, marker = tmp_path.parent / f"{tmp_path.name}-driver.py", tmp_path.parent / f"{tmp_path.name}-marker"
    driver.write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_COLOR": "1"}
    process = subprocess.Popen([sys.executable, str(driver), mode, str(marker), *map(str, args)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the fault point was never reached"
        time.sleep(0.05)
    return process, marker


@pytest.mark.parametrize("mode", ["save", "calibrate"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_removes_staging(tmp_path, mode, sig):
    model, calib = dense_model(tmp_path), inputs(tmp_path, normal())
    before = snapshot(tmp_path)
    process, _ = start_killable(tmp_path, mode, "apply", model, "-m", "wanda", "-s", "0.5", "--calib", calib,
                                "-o", tmp_path / "out.onnx")
    if mode == "save":
        assert [p for p in tmp_path.iterdir() if p.name.startswith(".out.onnx.onnxprune-")], "no staging to kill"
    process.send_signal(sig)
    _, err = process.communicate(timeout=60)
    assert process.returncode == (130 if sig == signal.SIGINT else 128 + sig), err
    assert err.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in err
    assert snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz", "model.onnx"], "something was left behind"


def test_staging_left_by_sigkill_is_removed_by_the_next_run(tmp_path):
    model = dense_model(tmp_path)
    process, _ = start_killable(tmp_path, "save", "apply", model, "-s", "0.5", "-o", tmp_path / "out.onnx")
    process.kill()
    process.communicate(timeout=60)
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".out.onnx.")]
    assert left and left[0].is_dir(), "SIGKILL cannot be cleaned up after: the staging folder must still be there"
    cli("apply", model, "-s", "0.5", "-o", tmp_path / "out.onnx").ok()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "out.onnx"]
    onnx.checker.check_model(onnx.load(str(tmp_path / "out.onnx")))


def test_staging_of_a_live_run_is_kept(tmp_path):
    out = tmp_path / "out.onnx"
    mine = tmp_path / f"{atomic.staging_prefix(out)}abcd"  # this very process: alive
    mine.mkdir()
    other_host = tmp_path / ".out.onnx.onnxprune-elsewhere-1-abcd"
    other_host.mkdir()
    abandoned = tmp_path / ".out.onnx.onnxprune-elsewhere-2-abcd"
    abandoned.mkdir()
    os.utime(abandoned, (time.time() - 3 * 86400,) * 2)
    unrelated = tmp_path / ".out.onnx.user-notes"
    unrelated.write_text("not ours")
    assert atomic.remove_stale_staging(out) == [abandoned]
    assert mine.exists() and other_host.exists() and unrelated.exists()


def test_failed_export_leaves_no_partial_folder(hf_model, tmp_path, monkeypatch):
    """`export --dtype bf16` used to fail after writing config files into the output folder."""
    import optimum.exporters.onnx as onnx_exporter

    source = hf_model("llama").hf_dir  # built (and exported) before the exporter is broken

    def failing_export(output, **kwargs):
        (Path(output) / "config.json").write_text("{}")  # what optimum writes before the graph
        raise RuntimeError("ScalarType ComplexDouble is an unexpected tensor scalar type")

    monkeypatch.setattr(onnx_exporter, "main_export", failing_export)
    line = assert_user_error(cli("export", source, tmp_path / "out", "--dtype", "bf16"))
    assert "--dtype bf16 failed" in line and "try --dtype fp16 or fp32" in line
    assert list(tmp_path.iterdir()) == [], "a partial export folder was left behind"
