"""`onnxprune sweep`: every cell filled, resumable without recomputing, the paper's outputs written."""

from __future__ import annotations

import json

import pytest
from conftest import assert_user_error, cli
from lm_fixtures import SEQLEN

import onnxprune.sweeps as sweep_module

METHODS = "magnitude,wanda,sparsegpt,bias,random"


def sweep_args(onnx_dir, eval_txt, out, levels="0.1,0.5,0.9"):
    return ["sweep", onnx_dir / "model.onnx", "--methods", METHODS, "--levels", levels, "--patterns", "2:4",
            "--calib", eval_txt, "--eval", eval_txt, "--nsamples", 4, "--seqlen", SEQLEN, "--max-windows", 4,
            "--max-new-tokens", 4, "-o", out]


def read(out):
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sweep_module.CONFIG in lines[0], "the first line is the configuration the cells belong to"
    return lines[1:]


def test_sweep_fills_every_cell_and_resumes(onnx_dir, eval_txt, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    real_run_cell = sweep_module.run_cell
    calls = []

    def killed_after_three(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt  # the user stops the sweep
        calls.append(args[2:4])
        return real_run_cell(*args, **kwargs)

    monkeypatch.setattr(sweep_module, "run_cell", killed_after_three)
    assert cli(*sweep_args(onnx_dir, eval_txt, out)).code == 130
    first = read(out)
    assert len(first) == 3

    resumed = []

    def counting(*args, **kwargs):
        resumed.append(args[2:4])
        return real_run_cell(*args, **kwargs)

    monkeypatch.setattr(sweep_module, "run_cell", counting)
    cli(*sweep_args(onnx_dir, eval_txt, out)).ok()
    results = read(out)
    cells = {(r["method"], r["label"]) for r in results}
    assert len(results) == len(cells) == 1 + 5 * 4  # dense + methods × (3 levels + 2:4)
    assert not set(resumed) & {(r["method"], r["label"]) for r in first}, "resume recomputed a finished cell"
    assert results[:3] == first

    by_cell = {(r["method"], r["label"]): r for r in results}
    for method in ("magnitude", "wanda", "sparsegpt", "random"):
        for label in ("0.1", "0.5", "0.9", "2:4"):
            assert by_cell[(method, label)]["status"] == "ok", by_cell[(method, label)]
            assert by_cell[(method, label)]["sample"].startswith("University is")
    # Llama has no biases: the bias indicator is not applicable, with the reason, never an empty cell.
    assert all(by_cell[("bias", label)]["status"] == "na" for label in ("0.1", "0.5", "0.9", "2:4"))
    assert "no bias" in by_cell[("bias", "0.5")]["error"]
    # A random model is not a language model: pruning moves it towards uniform, so only the
    # distance from the dense perplexity must grow with the level.
    dense = by_cell[("dense", "0")]["perplexity"]
    for method in ("magnitude", "wanda"):
        near, far = by_cell[(method, "0.1")]["perplexity"], by_cell[(method, "0.9")]["perplexity"]
        assert abs(near - dense) < abs(far - dense), method

    table = (out / "table.md").read_text()
    assert "| level | magnitude | wanda | sparsegpt | bias | random |" in table
    assert "pending" not in table and "NA" in table
    assert "wanda" in (out / "timing.md").read_text() and "University is" in (out / "samples.md").read_text()
    assert (out / "ppl_vs_level.png").read_bytes()[:4] == b"\x89PNG"
    assert not list((out / "models").glob("*.onnx")), "pruned models are removed unless --keep-models"

    # A third run computes nothing and rewrites the same table.
    resumed.clear()
    cli(*sweep_args(onnx_dir, eval_txt, out)).ok()
    assert resumed == [] and (out / "table.md").read_text() == table


def test_sweep_one_shot_shares_statistics(onnx_dir, eval_txt, tmp_path):
    out = tmp_path / "one-shot"
    cli("sweep", onnx_dir / "model.onnx", "--methods", "wanda,sparsegpt", "--levels", "0.5", "--calib", eval_txt,
        "--eval", eval_txt, "--nsamples", 4, "--seqlen", SEQLEN, "--max-windows", 2, "--max-new-tokens", 2,
        "--one-shot", "-o", out).ok()
    results = read(out)
    assert [r["method"] for r in results].count("statistics") == 1
    assert all(r["status"] == "ok" for r in results)
    assert "computed once" in (out / "timing.md").read_text()


@pytest.mark.parametrize("args,message", [
    (["--methods", "nope"], "unknown method"),
    (["--levels", "1.5"], "--sparsity must be in [0, 1)"),
    (["--levels", "x"], "not a number"),
    (["--patterns", "3:2"], "0 < N < M"),
])
def test_sweep_bad_input(onnx_dir, eval_txt, tmp_path, args, message):
    line = assert_user_error(cli("sweep", onnx_dir / "model.onnx", "--eval", eval_txt, "-o", tmp_path / "s", *args))
    assert message in line


def small_sweep(onnx_dir, eval_txt, out, *extra):
    return cli("sweep", onnx_dir / "model.onnx", "--methods", "magnitude,wanda", "--levels", "0.5", "--calib",
               eval_txt, "--eval", eval_txt, "--nsamples", 2, "--seqlen", SEQLEN, "--max-windows", 1,
               "--max-new-tokens", 1, "-o", out, *extra)


@pytest.mark.parametrize("change", [["--nsamples", "3"], ["--seqlen", str(SEQLEN // 2)], ["--prompt", "Other"],
                                    ["--one-shot"], ["--max-windows", "2"]])
def test_sweep_refuses_to_resume_another_configuration(onnx_dir, eval_txt, tmp_path, change):
    out = tmp_path / "s"
    small_sweep(onnx_dir, eval_txt, out).ok()
    before = (out / "results.jsonl").read_bytes()
    line = assert_user_error(small_sweep(onnx_dir, eval_txt, out, *change))
    assert "holds a sweep with another configuration" in line and "another --output directory" in line
    assert (out / "results.jsonl").read_bytes() == before


def test_sweep_refuses_another_calibration_text(onnx_dir, eval_txt, tmp_path):
    out = tmp_path / "s"
    small_sweep(onnx_dir, eval_txt, out).ok()
    other = tmp_path / "other.txt"
    other.write_text(eval_txt.read_text()[::-1])
    line = assert_user_error(cli("sweep", onnx_dir / "model.onnx", "--methods", "magnitude,wanda", "--levels", "0.5",
                                 "--calib", other, "--eval", eval_txt, "--nsamples", 2, "--seqlen", SEQLEN,
                                 "--max-windows", 1, "--max-new-tokens", 1, "-o", out))
    assert "different calib" in line


def test_sweep_after_removing_results_starts_fresh(onnx_dir, eval_txt, tmp_path):
    """Removing results.jsonl (the fix the refusal names) also drops the old calibration windows."""
    out = tmp_path / "s"
    small_sweep(onnx_dir, eval_txt, out).ok()
    (out / "results.jsonl").unlink()
    stale = (out / "calibration.npz").read_bytes()
    small_sweep(onnx_dir, eval_txt, out, "--nsamples", "3").ok()
    assert (out / "calibration.npz").read_bytes() != stale
    assert {r["method"] for r in read(out)} == {"dense", "magnitude", "wanda"}


def test_torn_last_line_loses_no_record(tmp_path):
    path = tmp_path / "results.jsonl"
    key = {"nsamples": 1}
    assert sweep_module.open_results(path, key) == []
    sweep_module.append_result(path, {"method": "dense", "label": "0", "status": "ok"})
    sweep_module.append_result(path, {"method": "magnitude", "label": "0.5", "status": "ok"})
    with open(path, "ab") as stream:
        stream.write(b'{"method": "wanda", "label": "0.5", "sta')  # killed mid-write
    records = sweep_module.open_results(path, key)
    assert [r["method"] for r in records] == ["dense", "magnitude"]
    sweep_module.append_result(path, {"method": "wanda", "label": "0.5", "status": "ok"})
    assert [r["method"] for r in sweep_module.open_results(path, key)] == ["dense", "magnitude", "wanda"]
    assert path.read_text().count("\n") == 4


def test_a_configuration_without_records_is_replaced(tmp_path):
    """A first run that failed before any cell (e.g. a typo in --tokenizer) does not lock the directory."""
    path = tmp_path / "results.jsonl"
    sweep_module.open_results(path, {"nsamples": 1})
    assert sweep_module.open_results(path, {"nsamples": 2}) == []
    assert json.loads(path.read_text()) == {sweep_module.CONFIG: {"nsamples": 2}}


def test_results_without_configuration_are_refused(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps({"method": "dense", "label": "0", "status": "ok"}) + "\n")
    with pytest.raises(sweep_module.UserError, match="no configuration record"):
        sweep_module.open_results(path, {"nsamples": 1})
