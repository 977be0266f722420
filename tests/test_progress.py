"""Progress in a log: one line per calibrated block on a non-terminal stderr, nothing with -q."""

from __future__ import annotations

import re

import numpy as np
from conftest import cli
from graphs import Dense, chain_model, save

from onnxprune.progress import format_duration


def test_one_line_per_block_in_a_log_and_none_when_quiet(tmp_path):
    model = save(chain_model([Dense("MatMul", 16, 24), Dense("MatMul", 24, 16), Dense("MatMul", 16, 8)]),
                 tmp_path / "chain.onnx")
    np.savez(tmp_path / "calib.npz", X=np.random.default_rng(0).standard_normal((6, 16)).astype(np.float32))
    args = ["apply", model, "-m", "sparsegpt", "-s", "0.5", "--calib", tmp_path / "calib.npz"]
    result = cli(*args, "-o", tmp_path / "a.onnx").ok()
    lines = [line for line in result.err.splitlines() if line.startswith("block ")]
    assert len(lines) == 3, result.err
    pattern = r"block (\d)/3: calibrate \d+\.\d s, prune \d+\.\d s, eta \d+ s"
    assert [int(re.fullmatch(pattern, line).group(1)) for line in lines] == [1, 2, 3]
    quiet = cli("-q", *args, "-o", tmp_path / "b.onnx").ok()
    assert "block " not in quiet.err


def test_durations_read_as_people_write_them():
    assert [format_duration(s) for s in (3.2, 75, 4000)] == ["3 s", "1 min", "1.1 h"]
