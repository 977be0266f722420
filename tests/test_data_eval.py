"""Calibration data, input feeds and ONNX perplexity, offline: a tokenizer trained on Python's own
documentation and a tiny random Llama exported through onnxprune's exporter."""

from __future__ import annotations

import json
import math
import random
import shutil

import numpy as np
import pytest

from conftest import cli
from lm_fixtures import SEQLEN

from onnxprune import data
from onnxprune.errors import UserError
from onnxprune.evaluation import perplexity, window_loss




def reference_windows(ids, nsamples, seqlen, seed=0):
    random.seed(seed)
    starts = [random.randint(0, len(ids) - seqlen - 1) for _ in range(nsamples)]
    return np.stack([ids[i:i + seqlen] for i in starts])


def run_cli(args):
    result = cli(*args)
    return result.code, result.out, result.err


# --- data sources and windows ---------------------------------------------------------------


def test_calibration_windows_match_reference_sampling(tokenizer, eval_txt):
    windows = data.calibration_windows(tokenizer, eval_txt, nsamples=8, seqlen=SEQLEN, seed=0)
    ids = np.asarray(tokenizer(eval_txt.read_text())["input_ids"])
    assert windows.dtype == np.int64 and windows.shape == (8, SEQLEN)
    np.testing.assert_array_equal(windows, reference_windows(ids, 8, SEQLEN, seed=0))
    assert not np.array_equal(windows, data.calibration_windows(tokenizer, eval_txt, 8, SEQLEN, seed=1))


def test_text_too_short_for_a_window(tokenizer, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("only a few words here")
    with pytest.raises(UserError, match=r"has \d+ tokens; a calibration window of 32 tokens needs at least 33"):
        data.calibration_windows(tokenizer, short, 4, SEQLEN)
    with pytest.raises(UserError, match=r"has \d+ tokens; one evaluation window needs 32"):
        data.evaluation_ids(tokenizer, short, SEQLEN)


def test_jsonl_source_joins_text_fields(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "first doc", "id": 1}) + "\n\n" + json.dumps({"text": "second"}) + "\n")
    assert data.load_text(path, "train") == "first doc\n\nsecond"
    path.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(UserError, match=r'docs.jsonl:1 has no "text"'):
        data.load_text(path, "test")


def test_txt_source_is_the_whole_file(tmp_path):
    path = tmp_path / "plain.txt"
    path.write_text("line one\n\nline two\n")
    assert data.load_text(path, "test") == "line one\n\nline two\n"


@pytest.mark.parametrize("source, message", [("nosuch.txt", "text file not found"),
                                             ("wikitext3", "unknown text source"),
                                             ("inputs.npz", "holds input tensors, not text")])
def test_bad_text_sources(source, message):
    with pytest.raises(UserError, match=message):
        data.load_text(source, "train")


def test_datasets_follow_the_references(monkeypatch, tokenizer, corpus):
    from datasets import Dataset

    calls = []
    paragraphs = corpus.split("\n\n")[:400]

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return Dataset.from_dict({"text": paragraphs, "sentence": paragraphs})

    monkeypatch.setattr("datasets.load_dataset", fake_load_dataset)
    assert data.load_text("wikitext2", "train") == " ".join(paragraphs)
    assert data.load_text("WikiText2", "test") == "\n\n".join(paragraphs)
    assert data.load_text("ptb", "test") == " ".join(paragraphs)
    assert [c[0] for c in calls] == [("wikitext", "wikitext-2-raw-v1")] * 2 + [("ptb_text_only", "penn_treebank")]
    assert [c[1]["split"] for c in calls] == ["train", "test", "test"]

    # C4: per-document sampling, as the references draw it.
    windows = data.calibration_windows(tokenizer, "c4", nsamples=5, seqlen=SEQLEN, seed=0)
    assert calls[-1][1]["data_files"] == {"train": "en/c4-train.00000-of-01024.json.gz"}
    random.seed(0)
    expected = []
    for _ in range(5):
        while True:
            ids = tokenizer(paragraphs[random.randint(0, len(paragraphs) - 1)])["input_ids"]
            if len(ids) > SEQLEN:
                break
        start = random.randint(0, len(ids) - SEQLEN - 1)
        expected.append(ids[start:start + SEQLEN])
    np.testing.assert_array_equal(windows, np.array(expected))
    ids = data.evaluation_ids(tokenizer, "c4", SEQLEN)
    np.testing.assert_array_equal(ids, tokenizer(" ".join(paragraphs))["input_ids"][:256 * SEQLEN])


def test_dataset_load_failure_is_a_user_error(monkeypatch, tokenizer):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr("datasets.load_dataset", offline)
    with pytest.raises(UserError, match=r"cannot load the wikitext2 data set \(Couldn't reach.*\); .*\.txt") as info:
        data.calibration_windows(tokenizer, "wikitext2", 4, SEQLEN)
    assert "\n" not in str(info.value)


def test_missing_tokenizer(tmp_path):
    with pytest.raises(UserError, match=r"no tokenizer beside the model .*; pass --tokenizer DIR"):
        data.load_tokenizer(tmp_path / "model.onnx")
    with pytest.raises(UserError, match="tokenizer directory not found"):
        data.load_tokenizer(tmp_path / "model.onnx", tmp_path / "nope")


def test_model_feeds():
    ids = np.arange(6, dtype=np.int64).reshape(2, 3)
    feeds = data.model_feeds(["input_ids", "attention_mask", "position_ids", "token_type_ids"], ids)
    np.testing.assert_array_equal(feeds["input_ids"], ids)
    np.testing.assert_array_equal(feeds["attention_mask"], np.ones((2, 3)))
    np.testing.assert_array_equal(feeds["position_ids"], [[0, 1, 2], [0, 1, 2]])
    np.testing.assert_array_equal(feeds["token_type_ids"], np.zeros((2, 3)))
    assert list(data.model_feeds(["input_ids"], ids[0])) == ["input_ids"]
    assert data.model_feeds(["input_ids"], ids[0])["input_ids"].shape == (1, 3)
    with pytest.raises(UserError, match="export it without --with-past"):
        data.model_feeds(["input_ids", "past_key_values.0.key"], ids)
    with pytest.raises(UserError, match="also needs pixel_mask"):
        data.model_feeds(["input_ids", "pixel_mask"], ids)
    with pytest.raises(UserError, match="no input_ids"):
        data.model_feeds(["pixel_values"], ids)


def test_npz_inputs(tmp_path):
    path = tmp_path / "inputs.npz"
    np.savez(path, pixel_values=np.zeros((1, 3, 4, 4), np.float32))
    arrays = data.load_npz_inputs(path)
    assert list(arrays) == ["pixel_values"]
    data.check_inputs_match(["pixel_values"], arrays)
    with pytest.raises(UserError, match="lack mask"):
        data.check_inputs_match(["pixel_values", "mask"], arrays)
    with pytest.raises(UserError, match="tensors extra are not model inputs"):
        data.check_inputs_match(["pixel_values"], {**arrays, "extra": np.zeros(1)})
    (tmp_path / "bad.npz").write_text("not a zip")
    with pytest.raises(UserError, match="not a readable .npz"):
        data.load_npz_inputs(tmp_path / "bad.npz")


# --- perplexity -----------------------------------------------------------------------------


def torch_perplexity(model_dir, ids, seqlen):
    """The references' eval_ppl_wikitext on the torch model."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.as_tensor(ids)[None]
    nsamples = ids.numel() // seqlen
    nlls = []
    with torch.no_grad():
        for i in range(nsamples):
            inputs = ids[:, i * seqlen:(i + 1) * seqlen]
            logits = model(inputs).logits
            loss = torch.nn.CrossEntropyLoss()(logits[:, :-1, :].reshape(-1, logits.size(-1)), inputs[:, 1:].reshape(-1))
            nlls.append(loss.float() * seqlen)
    return torch.exp(torch.stack(nlls).sum() / (nsamples * seqlen)).item(), nsamples


def test_perplexity_matches_torch(onnx_dir, torch_model_dir, tokenizer, eval_txt):
    result = perplexity(onnx_dir / "model.onnx", tokenizer, eval_txt, SEQLEN)
    ids = data.evaluation_ids(tokenizer, eval_txt, SEQLEN)
    expected, nsamples = torch_perplexity(torch_model_dir, ids, SEQLEN)
    assert result.windows == nsamples == len(ids) // SEQLEN >= 10
    assert result.tokens == len(ids)
    assert abs(result.perplexity - expected) / expected < 1e-3, (result.perplexity, expected)
    assert math.isclose(math.exp(result.mean_nll), result.perplexity)
    limited = perplexity(onnx_dir, tokenizer, eval_txt, SEQLEN, max_windows=2)
    assert limited.windows == 2
    assert limited.perplexity == pytest.approx(torch_perplexity(torch_model_dir, ids[:2 * SEQLEN], SEQLEN)[0], rel=1e-3)


def test_window_loss_is_cross_entropy():
    import torch

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(300, 50)).astype(np.float32) * 5
    ids = rng.integers(0, 50, size=300)
    expected = torch.nn.CrossEntropyLoss()(torch.from_numpy(logits[:-1]), torch.from_numpy(ids[1:])).item()
    assert window_loss(logits, ids) == pytest.approx(expected, rel=1e-6)


def test_perplexity_needs_logits(tmp_path, tokenizer, eval_txt):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Cast", ["input_ids"], ["embedding"], to=TensorProto.FLOAT)], "g",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
                              [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", "seq"])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "encoder.onnx")
    with pytest.raises(UserError, match=r"not \[batch, seq, vocab\] logits"):
        perplexity(tmp_path / "encoder.onnx", tokenizer, eval_txt, SEQLEN)


# --- CLI ------------------------------------------------------------------------------------


def test_cli_eval(onnx_dir, eval_txt, tmp_path):
    out = tmp_path / "ppl.json"
    code, stdout, _ = run_cli(["eval", str(onnx_dir), "--eval", str(eval_txt), "--seqlen", str(SEQLEN),
                               "--max-windows", "3", "-o", str(out)])
    assert code == 0
    assert "perplexity" in stdout and "3 windows of 32 tokens" in stdout
    record = json.loads(out.read_text())
    assert record["windows"] == 3 and record["seqlen"] == SEQLEN and record["eval"] == str(eval_txt)
    assert record["perplexity"] == pytest.approx(math.exp(record["mean_nll"]))


def test_cli_eval_errors(onnx_dir, tokenizer_dir, eval_txt, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(onnx_dir / "model.onnx", bare / "model.onnx")
    code, _, err = run_cli(["eval", str(bare / "model.onnx"), "--eval", str(eval_txt), "--seqlen", "32"])
    assert code == 2
    assert err.startswith("error: no tokenizer") and "--tokenizer DIR" in err and err.count("\n") == 1

    code, stdout, _ = run_cli(["eval", str(bare / "model.onnx"), "--eval", str(eval_txt), "--seqlen", "32",
                               "--tokenizer", str(tokenizer_dir), "--max-windows", "1"])
    assert code == 0 and "1 windows" in stdout

    short = tmp_path / "short.txt"
    short.write_text("too short")
    code, _, err = run_cli(["eval", str(onnx_dir), "--eval", str(short), "--seqlen", "32"])
    assert code == 2
    assert err.startswith("error: ") and "tokens; one evaluation window needs 32" in err and err.count("\n") == 1


def test_cli_apply_with_text_calibration(onnx_dir, eval_txt, tokenizer, tmp_path):
    """`apply --calib FILE.txt` tokenizes with the tokenizer beside the model; the pruned model evaluates."""
    out = tmp_path / "wanda.onnx"
    code, _, err = run_cli(["apply", str(onnx_dir / "model.onnx"), "-m", "wanda", "-s", "0.5", "--calib",
                            str(eval_txt), "--nsamples", "8", "--seqlen", str(SEQLEN), "-o", str(out),
                            "--report", str(tmp_path / "r.json")])
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["targets"] and all(t["sparsity"] == 0.5 for t in report["targets"])
    dense = perplexity(onnx_dir / "model.onnx", tokenizer, eval_txt, SEQLEN)
    pruned = perplexity(out, tokenizer, eval_txt, SEQLEN)
    assert math.isfinite(pruned.perplexity) and pruned.perplexity != dense.perplexity


# --- generation and fidelity ----------------------------------------------------------------


def test_generate_matches_torch_greedy(onnx_dir, torch_model_dir, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    from onnxprune.generate import greedy_generate

    prompt = "University is"
    ours = greedy_generate(onnx_dir / "model.onnx", tokenizer, prompt, max_new_tokens=12)
    model = AutoModelForCausalLM.from_pretrained(torch_model_dir).eval()
    ids = torch.from_numpy(data.tokenize(tokenizer, prompt))[None]
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    assert ours == prompt + tokenizer.decode(generated[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
    assert ours.startswith(prompt) and len(ours) > len(prompt)


def test_cli_generate(onnx_dir):
    code, stdout, _ = run_cli(["generate", str(onnx_dir), "--prompt", "The class", "--max-new-tokens", "5"])
    assert code == 0 and stdout.startswith("The class")


def test_fidelity_against_dense_twin(onnx_dir, tmp_path):
    ids = np.random.default_rng(0).integers(3, 500, (6, 16)).astype(np.int64)
    np.savez(tmp_path / "x.npz", input_ids=ids, attention_mask=np.ones_like(ids),
             position_ids=np.broadcast_to(np.arange(16), ids.shape).copy())
    from onnxprune.fidelity import fidelity

    same = fidelity(onnx_dir / "model.onnx", onnx_dir / "model.onnx", tmp_path / "x.npz")["outputs"]["logits"]
    assert same["cosine"] == pytest.approx(1.0) and same["relative_error"] == 0 and same["top1_agreement"] == 1
    pruned = tmp_path / "p.onnx"
    assert run_cli(["apply", str(onnx_dir), "-m", "magnitude", "-p", "2:4", "-o", str(pruned)])[0] == 0
    code, stdout, _ = run_cli(["eval", str(pruned), "--reference", str(onnx_dir), "--inputs", str(tmp_path / "x.npz"),
                               "-o", str(tmp_path / "f.json")])
    assert code == 0 and "top-1 agreement" in stdout
    metrics = json.loads((tmp_path / "f.json").read_text())["outputs"]["logits"]
    assert 0 < metrics["cosine"] < 1 and metrics["relative_error"] > 0 and metrics["rows"] == 6 * 16
    code, _, err = run_cli(["eval", str(pruned), "--reference", str(onnx_dir)])
    assert code == 2 and err.startswith("error: --reference needs --inputs") and err.count("\n") == 1
