"""Shared fixtures: a tokenizer trained on Python's own documentation and a tiny random Llama
exported through onnxprune's exporter, with the tokenizer saved beside model.onnx (offline)."""

from __future__ import annotations

import pytest

from onnxprune import data

SEQLEN = 32  # tokens per window in the tests that use these models


@pytest.fixture(scope="session")
def corpus() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator([corpus], trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"],
                                                          show_progress=False))
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", raw.token_to_id("<s>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    directory = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    return data.load_tokenizer(tokenizer_dir / "model.onnx", tokenizer_dir)


@pytest.fixture(scope="session")
def torch_model_dir(tmp_path_factory, tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.2, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    directory = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(config).eval().save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def onnx_dir(tmp_path_factory, torch_model_dir, tokenizer):
    from onnxprune.exporters.hf import export_hf

    directory = tmp_path_factory.mktemp("onnx")
    export_hf(str(torch_model_dir), directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def eval_txt(tmp_path_factory, corpus):
    path = tmp_path_factory.mktemp("text") / "eval.txt"
    path.write_text(corpus[:12_000])
    return path
