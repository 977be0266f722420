"""Bad input ends with exit code 2 and one `error:` line, writes nothing and leaves the input alone."""

from __future__ import annotations

import os

import pytest
from conftest import assert_user_error, cli, cli_process, snapshot
from graphs import gemm_model, no_weights_model, save

GOOD = ["--sparsity", "0.5"]

CASES = {
    # name: (input file kind, apply options after MODEL -o OUT, text the message must contain)
    "missing file": ("missing", GOOD, "not found"),
    "random bytes": ("random", GOOD, "not a readable ONNX model"),
    "text file": ("text", GOOD, "not a readable ONNX model"),
    "sparsity 1.0": ("model", ["--sparsity", "1.0"], "--sparsity"),
    "sparsity -0.1": ("model", ["--sparsity", "-0.1"], "--sparsity"),
    "pattern 2:x": ("model", ["--pattern", "2:x"], "--pattern"),
    "pattern 4:2": ("model", ["--pattern", "4:2"], "0 < N < M"),
    "pattern 0:4": ("model", ["--pattern", "0:4"], "0 < N < M"),
    "pattern abc": ("model", ["--pattern", "abc"], "--pattern"),
    "unknown method": ("model", ["--method", "nonsense", *GOOD], "unknown method 'nonsense'"),
    "no prunable weights": ("no_weights", GOOD, "no prunable weights"),
    "sparsity contradicts pattern": ("model", ["--sparsity", "0.6", "--pattern", "2:4"], "contradicts"),
    "invalid include regex": ("model", ["--include", "(", *GOOD], "--include"),
    "no sparsity at all": ("model", [], "--sparsity"),
    "unknown option": ("model", ["--bogus", *GOOD], "--bogus"),
    "sparsity not a number": ("model", ["--sparsity", "half"], "--sparsity"),
    # options the method would silently ignore
    "calib with a data-free method": ("model", ["--calib", "wikitext2", *GOOD], "magnitude uses no calibration data: drop --calib"),
    "one-shot with a data-free method": ("model", ["--one-shot", *GOOD], "drop --one-shot"),
    "stats with a data-free method": ("model", ["--stats", "s.npz", "-m", "random", *GOOD], "random uses no calibration data"),
    "add-bias without mama": ("model", ["--add-bias", "-m", "wanda", "--calib", "x.npz", *GOOD], "--add-bias is for mama"),
    "add-bias structured l1": ("model", ["--add-bias", "-p", "structured", *GOOD], "--add-bias is for mama"),
    "data-free structured": ("model", ["--data-free", "-p", "structured", *GOOD], "--data-free is for per-weight"),
    "owl structured": ("model", ["--allocation", "owl", "-p", "structured", "-m", "wanda", "--calib", "x.npz", *GOOD],
                       "--allocation owl is for per-weight"),
}


def make_input(kind: str, folder) -> str:
    path = folder / "model.onnx"
    if kind == "model":
        save(gemm_model(True), path)
    elif kind == "no_weights":
        save(no_weights_model(), path)
    elif kind == "random":
        path.write_bytes(os.urandom(4096))
    elif kind == "text":
        path.write_text("this is not an ONNX model\n" * 20)
    return path


def check_rejected(run, tmp_path, kind: str, options: list[str], expected: str) -> None:
    source = make_input(kind, tmp_path)
    before = snapshot(tmp_path)
    line = assert_user_error(run("apply", source, "-o", tmp_path / "out.onnx", "--report", tmp_path / "r.json",
                                 *options))
    assert expected in line
    assert snapshot(tmp_path) == before  # input unchanged, no output, report or staging folder left


@pytest.mark.parametrize("case", CASES)
def test_bad_input_in_process(tmp_path, case):
    check_rejected(cli, tmp_path, *CASES[case])


@pytest.mark.parametrize("case", ["random bytes", "no prunable weights", "unknown option"])
def test_bad_input_real_process(tmp_path, case):
    check_rejected(cli_process, tmp_path, *CASES[case])


def test_output_equal_to_input(tmp_path):
    source = make_input("model", tmp_path)
    before = snapshot(tmp_path)
    line = assert_user_error(cli_process("apply", source, "-o", source, *GOOD))
    assert "is the input model" in line
    assert snapshot(tmp_path) == before


def test_output_equal_to_input_directory_form(tmp_path):
    """A directory holding model.onnx is the same input as the file itself."""
    make_input("model", tmp_path)
    before = snapshot(tmp_path)
    assert_user_error(cli("apply", tmp_path, "-o", tmp_path / "model.onnx", *GOOD))
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("args", [["apply"], ["inspect"], ["no-such-command"]], ids=" ".join)
def test_usage_errors(args):
    assert_user_error(cli(*args))


def test_structured_magnitude_is_l1_with_a_note(tmp_path):
    source = make_input("model", tmp_path)
    explicit = cli("apply", source, "--target", "cpu", "-m", "magnitude", *GOOD, "-o", tmp_path / "a.onnx").ok()
    assert "note: structured pruning ranks whole channels: -m magnitude runs as l1" in explicit.err
    default = cli("apply", source, "--target", "cpu", *GOOD, "-o", tmp_path / "b.onnx").ok()
    assert "note:" not in default.err and "structured l1" in default.out


def test_replacing_an_existing_output_says_so(tmp_path):
    source = make_input("model", tmp_path)
    first = cli("apply", source, *GOOD, "-o", tmp_path / "out.onnx", "--report", tmp_path / "r.json").ok()
    assert "replaced" not in first.out
    again = cli("apply", source, *GOOD, "-o", tmp_path / "out.onnx", "--report", tmp_path / "r.json").ok()
    assert f"(replaced the existing {tmp_path / 'out.onnx'}, {tmp_path / 'r.json'})" in again.out.replace("\n", "")
