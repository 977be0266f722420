"""CLI conventions: --version, -h on every command, -q / -v, --json meaning the same everywhere,
and examples in every --help that name only options the command has."""

from __future__ import annotations

import json
import shlex

import numpy as np
import pytest
import typer
from conftest import assert_user_error, cli, cli_process
from graphs import Dense, chain_model, conv_model, save

from onnxprune import __version__
from onnxprune.cli import app

GROUP = typer.main.get_command(app)
COMMANDS = sorted(GROUP.commands)


@pytest.fixture
def cnn(tmp_path):
    return save(conv_model(16), tmp_path / "cnn.onnx")


def test_version_flag_and_command():
    assert cli("--version").ok().out == f"onnxprune {__version__}\n"
    assert cli("version").ok().out == f"{__version__}\n"
    process = cli_process("--version").ok()
    assert process.out.strip() == f"onnxprune {__version__}" and process.err == ""


@pytest.mark.parametrize("command", COMMANDS)
def test_short_and_long_help_with_examples(command):
    short = cli(command, "-h").ok().out
    assert short == cli(command, "--help").ok().out
    assert short.startswith("Usage: onnxprune") and "Examples:" in short
    for flag in ("-q, --quiet", "-v, --verbose"):
        assert flag in short


@pytest.mark.parametrize("command", COMMANDS)
def test_examples_parse_as_the_command(command):
    """Each example in --help parses with the command's own parser: a renamed option, a missing
    argument or a value of the wrong type breaks this test."""
    sub = GROUP.commands[command]
    global_options = {opt for param in GROUP.params for opt in param.opts}
    examples = sub.epilog.split("Examples:", 1)[1].replace("\\\n", " ")
    lines = [line.strip() for line in examples.splitlines() if line.strip().startswith("onnxprune")]
    assert lines
    for line in lines:
        words = shlex.split(line.split(" > ")[0])[1:]
        while words and words[0] in global_options:
            words.pop(0)
        if not words:
            continue  # global options alone, e.g. `onnxprune --version`
        assert words[0] == command, line
        sub.make_context(command, words[1:])  # raises on anything the parser refuses


def test_help_is_the_default_and_root_lists_global_options():
    root = cli("-h").ok().out
    for text in ("--version", "-q, --quiet", "-v, --verbose", "--install-completion"):
        assert text in root


def test_quiet_prints_only_the_result_line(cnn, tmp_path):
    args = ["-m", "magnitude", "-p", "2:4", "--target", "cpu", "-o", tmp_path / "a.onnx"]
    loud = cli("apply", cnn, *args).ok()
    assert [line.split(" in ")[0] for line in loud.out.splitlines()[1:]] == [f"wrote {tmp_path / 'a.onnx'}"]
    assert loud.err.startswith("note: ")
    for quiet in (["-q", "apply"], ["apply", "--quiet"]):
        result = cli(*quiet, cnn, *args).ok()
        assert result.out.splitlines() == ["pruned 2 weights with magnitude (2:4, sparsity 0.5): 2,304 of 4,608 are "
                                           "zero (50.00%); 0 left dense"]
        assert result.err == ""
    inspected = cli("-q", "inspect", tmp_path / "a.onnx").ok()
    assert inspected.out.splitlines() == [line for line in cli("inspect", tmp_path / "a.onnx").ok().out.splitlines()
                                          if line.startswith("2 prunable weights")]


def test_verbose_lists_every_layer_on_stderr(cnn, tmp_path):
    result = cli("-v", "apply", cnn, "-m", "magnitude", "-p", "2:4", "-o", tmp_path / "a.onnx").ok()
    assert result.err.splitlines() == ["/layers.0/conv/Conv: Conv 16×16×3×3, sparsity 0.5000, 2:4 valid",
                                       "/layers.1/conv/Conv: Conv 16×16×3×3, sparsity 0.5000, 2:4 valid"]
    structured = cli("apply", cnn, "-p", "structured", "-s", "0.5", "-o", tmp_path / "s.onnx", "-v").ok()
    assert "conv /layers.0/conv/Conv: 16 -> 8 channels" in structured.err
    assert "refused: reaches the model output" in structured.err


def test_quiet_and_verbose_contradict(cnn, tmp_path):
    assert "contradict" in assert_user_error(cli("-q", "apply", cnn, "-s", "0.5", "-o", tmp_path / "x.onnx", "-v"))
    assert not (tmp_path / "x.onnx").exists()


def test_json_is_the_whole_stdout_on_every_command_with_results(cnn, tmp_path):
    out = tmp_path / "a.onnx"
    applied = json.loads(cli("apply", cnn, "-m", "magnitude", "-p", "2:4", "-o", out, "--json").ok().out)
    assert applied["totals"]["zeros"] == 2304 and applied["output"] == str(out)
    inspected = json.loads(cli("inspect", out, "--json").ok().out)
    assert inspected["totals"]["sparsity"] == pytest.approx(0.5)
    methods = {m["name"]: m["needs"] for m in json.loads(cli("methods", "--json").ok().out)}
    assert methods["magnitude"] == [] and "sq_sum" in methods["wanda"]
    bench = json.loads(cli("bench", out, "--baseline", cnn, "--runs", "2", "--warmup", "0", "--json").ok().out)
    assert [(row["model"], row["runs"]) for row in bench["rows"]] == [("model", 2), ("baseline", 2)]

    chain = save(chain_model([Dense("MatMul", 32, 32), Dense("MatMul", 32, 32)]), tmp_path / "chain.onnx")
    np.savez(tmp_path / "x.npz", X=np.random.default_rng(0).normal(size=(4, 32)).astype(np.float32))
    stats = json.loads(cli("calibrate", chain, "--calib", tmp_path / "x.npz", "-m", "wanda", "-o",
                           tmp_path / "s.npz", "--json").ok().out)
    assert stats["output"] == str(tmp_path / "s.npz") and stats["samples"] == 4
    pruned = tmp_path / "c.onnx"
    cli("-q", "apply", chain, "-s", "0.5", "-o", pruned).ok()
    evaluated = cli("eval", pruned, "--reference", chain, "--inputs", tmp_path / "x.npz", "--json",
                    "-o", tmp_path / "f.json").ok()
    assert json.loads(evaluated.out) == json.loads((tmp_path / "f.json").read_text())
    assert 0 < json.loads(evaluated.out)["outputs"]["h1"]["cosine"] < 1


@pytest.mark.parametrize("user_value", [None, "10"])
def test_openblas_threads_sleep_between_calibration_runs(user_value):
    """Importing onnxprune before numpy makes OpenBLAS's idle threads sleep at once (their spinning
    slowed the onnxruntime runs between numpy's Gram updates 1.4x), unless the user chose a value."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if user_value:
        env["OPENBLAS_THREAD_TIMEOUT"] = user_value
    code = "import os, sys, onnxprune; assert 'numpy' not in sys.modules; print(os.environ['OPENBLAS_THREAD_TIMEOUT'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == (user_value or "4")
