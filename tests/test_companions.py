"""A pruned model written elsewhere carries its tokenizer and config: `eval` and `generate` run on it
without --tokenizer; the report records the calibration settings."""

from __future__ import annotations

import json
import shutil

from conftest import cli, metadata, sha256

from onnxprune.companions import COMPANION_FILES, SOURCE_KEY


def test_apply_elsewhere_copies_tokenizer_and_config(onnx_dir, eval_txt, tmp_path):
    beside_input = {name for name in COMPANION_FILES if (onnx_dir / name).is_file()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= beside_input
    out = tmp_path / "elsewhere" / "pruned.onnx"
    report = tmp_path / "report.json"
    applied = cli("apply", onnx_dir, "-m", "wanda", "-p", "2:4", "--calib", eval_txt, "--nsamples", "4",
                  "--seqlen", "32", "--one-shot", "-o", out, "--report", report).ok()
    assert "copied " in applied.out
    assert {p.name for p in out.parent.iterdir() if p.name in COMPANION_FILES} == beside_input
    for name in beside_input:
        assert sha256(out.parent / name) == sha256(onnx_dir / name)
    assert metadata(out)[SOURCE_KEY] == str(onnx_dir.resolve())
    recorded = json.loads(report.read_text())
    assert sorted(recorded["companions"]) == sorted(beside_input)
    calibration = recorded["calibration"]
    assert (calibration["source"], calibration["nsamples"], calibration["seqlen"], calibration["seed"],
            calibration["sequential"]) == (str(eval_txt), 4, 32, 0, False)

    evaluated = json.loads(cli("eval", out, "--eval", eval_txt, "--seqlen", "32", "--max-windows", "2",
                               "--json").ok().out)
    dense = json.loads(cli("eval", onnx_dir, "--eval", eval_txt, "--seqlen", "32", "--max-windows", "2",
                           "--json").ok().out)
    assert evaluated["windows"] == 2 and evaluated["perplexity"] != dense["perplexity"]
    generated = json.loads(cli("generate", out, "--prompt", "The", "--max-new-tokens", "3", "--json").ok().out)
    assert generated["text"].startswith("The")


def test_user_files_beside_the_output_are_kept(onnx_dir, tmp_path):
    out = tmp_path / "pruned.onnx"
    (tmp_path / "config.json").write_text('{"mine": true}')
    cli("apply", onnx_dir, "-m", "magnitude", "-s", "0.5", "-o", out).ok()
    assert (tmp_path / "config.json").read_text() == '{"mine": true}'
    assert (tmp_path / "tokenizer.json").is_file()


def test_moved_model_finds_its_tokenizer_through_metadata(onnx_dir, eval_txt, tmp_path):
    """Only the .onnx travels on: eval falls back to the folder recorded in metadata_props."""
    source = tmp_path / "source"
    shutil.copytree(onnx_dir, source)
    first = tmp_path / "a" / "pruned.onnx"
    cli("apply", source, "-m", "magnitude", "-s", "0.5", "-o", first, "--no-external-data").ok()
    moved = tmp_path / "b" / "pruned.onnx"
    moved.parent.mkdir()
    shutil.copyfile(first, moved)
    cli("eval", moved, "--eval", eval_txt, "--seqlen", "32", "--max-windows", "1").ok()
    shutil.rmtree(source)
    assert "no tokenizer beside the model" in cli("eval", moved, "--eval", eval_txt, "--seqlen", "32").err


def test_nothing_copied_into_the_input_folder_or_without_companions(onnx_dir, tmp_path):
    before = sorted(p.name for p in onnx_dir.iterdir())
    result = cli("apply", onnx_dir, "-m", "magnitude", "-s", "0.5", "-o", onnx_dir / "pruned.onnx").ok()
    assert "copied" not in result.out
    assert sorted(p.name for p in onnx_dir.iterdir()) == sorted(before + ["pruned.onnx"])
    (onnx_dir / "pruned.onnx").unlink()
