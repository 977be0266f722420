"""Train (once) a small OPT-style causal LM on Python's own documentation, offline, and export it.

Data: the text of `pydoc_data.topics` (the help topics that ship with CPython, ~470 KB of
English prose with code), topics joined in sorted order. The last ~10 % (cut at a paragraph
boundary) is held out as the test text. A byte-level BPE tokenizer (vocab 4096) is trained on
the training text only.

Writes (default `runs/tiny-lm/`):
  train.txt, test.txt             the split text
  hf/                             save_pretrained model + tokenizer (PreTrainedTokenizerFast)
  onnx/model.onnx                 `onnxprune export hf onnx` (tokenizer files beside it)
  summary.json                    training time, losses, test perplexity, unigram baseline

Skips everything when `hf/` and `onnx/model.onnx` exist (pass --force to retrain).

    python benchmarks/train_tiny_lm.py [--out runs/tiny-lm] [--steps 800] [--max-minutes 8.5]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if __name__ == "__main__":
    # Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning threads
    # make each step several times slower (numerics are unchanged). Set before torch loads; when
    # imported (by prune_benchmark.py) the importer decides.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "runs" / "tiny-lm"
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3, as OPT numbers them (pad 1, bos/eos 2)
SEQLEN = 128


def corpus_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip() for key in sorted(topics)) + "\n"


def split_text(text: str, test_fraction: float = 0.1) -> tuple[str, str]:
    cut = text.rfind("\n\n", 0, int(len(text) * (1 - test_fraction)))
    return text[:cut + 2], text[cut + 2:]


def train_tokenizer(train_text: str, vocab_size: int, out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    chunks = [p for p in train_text.split("\n\n") if p.strip()]
    tok.train_from_iterator(chunks, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=256)
    fast.save_pretrained(out_dir)
    return fast


def build_model(vocab_size: int):
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(vocab_size=vocab_size, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                       ffn_dim=1024, word_embed_proj_dim=256, max_position_embeddings=256,
                       activation_function="relu", do_layer_norm_before=True, dropout=0.1,
                       attention_dropout=0.0, layerdrop=0.0, enable_bias=True, pad_token_id=1, bos_token_id=0,
                       eos_token_id=2, tie_word_embeddings=True, use_cache=False)
    config._attn_implementation = "eager"
    return OPTForCausalLM(config)


@torch.no_grad()
def perplexity_torch(model, ids: torch.Tensor, seqlen: int) -> float:
    """The references' loop: non-overlapping windows, shifted CE, Σ loss·seqlen / (n·seqlen)."""
    model.eval()
    n = ids.numel() // seqlen
    nlls = []
    for i in range(n):
        window = ids[i * seqlen:(i + 1) * seqlen][None]
        logits = model(window, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), window[0, 1:])
        nlls.append(loss.float() * seqlen)
    return torch.exp(torch.stack(nlls).sum() / (n * seqlen)).item()


def unigram_perplexity(train_ids: np.ndarray, test_ids: np.ndarray, vocab: int) -> float:
    counts = np.bincount(train_ids, minlength=vocab).astype(np.float64) + 1.0  # add-one
    logp = np.log(counts / counts.sum())
    return float(np.exp(-logp[test_ids].mean()))


def train(out: Path, steps: int, batch: int, lr: float, max_minutes: float, seed: int) -> dict:
    torch.set_num_threads(2)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    train_text, test_text = split_text(corpus_text())
    (out / "train.txt").write_text(train_text, encoding="utf-8")
    (out / "test.txt").write_text(test_text, encoding="utf-8")
    hf_dir = out / "hf"
    tokenizer = train_tokenizer(train_text, 4096, hf_dir)
    train_ids = np.asarray(tokenizer(train_text, verbose=False)["input_ids"], dtype=np.int64)
    test_ids = np.asarray(tokenizer(test_text, verbose=False)["input_ids"], dtype=np.int64)
    vocab = len(tokenizer)
    print(f"text: {len(train_text):,} chars train / {len(test_text):,} test; tokens {len(train_ids):,} / "
          f"{len(test_ids):,}; vocab {vocab}", flush=True)

    model = build_model(vocab)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: OPT 4 layers, hidden 256, ffn 1024, {params / 1e6:.2f} M parameters", flush=True)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    budget = max_minutes * 60

    def learning_rate(step: int, elapsed: float) -> float:
        # Linear warmup, then cosine to lr/10 over the run's progress: steps done or time used,
        # whichever is further along (so a slow machine still ends on a decayed learning rate).
        progress = min(1.0, max(step / steps, elapsed / budget))
        return lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    data = torch.from_numpy(train_ids)
    started = time.perf_counter()
    losses = []
    model.train()
    done = 0
    for step in range(steps):
        starts = rng.integers(0, len(train_ids) - SEQLEN, size=batch)
        x = torch.stack([data[s:s + SEQLEN] for s in starts])
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, time.perf_counter() - started)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        done = step + 1
        elapsed = time.perf_counter() - started
        if done % 25 == 0 or done == 1:
            print(f"step {done:4d}/{steps}  loss {np.mean(losses[-25:]):.3f}  lr {optimizer.param_groups[0]['lr']:.2e}  "
                  f"{elapsed:6.1f} s", flush=True)
        if elapsed > budget:
            print(f"time budget of {max_minutes} min reached after {done} steps", flush=True)
            break
    train_seconds = time.perf_counter() - started
    model.eval()
    test_ppl = perplexity_torch(model, torch.from_numpy(test_ids), SEQLEN)
    unigram = unigram_perplexity(train_ids, test_ids, vocab)
    print(f"trained {done} steps in {train_seconds:.0f} s; test perplexity {test_ppl:.2f} "
          f"(unigram baseline {unigram:.1f})", flush=True)
    model.config.use_cache = False
    model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    return {"steps": done, "batch": batch, "seqlen": SEQLEN, "lr": lr, "seed": seed, "params": params,
            "train_tokens": int(len(train_ids)), "test_tokens": int(len(test_ids)), "vocab": vocab,
            "train_seconds": round(train_seconds, 1), "final_train_loss": float(np.mean(losses[-25:])),
            "test_perplexity_torch_seqlen128": test_ppl, "unigram_test_perplexity": unigram,
            "stopped_by_time_budget": done < steps, "torch_threads": torch.get_num_threads(),
            "loadavg_after_training": os.getloadavg()}


def export(out: Path) -> Path:
    onnx_dir = out / "onnx"
    if onnx_dir.exists():
        shutil.rmtree(onnx_dir)
    subprocess.run([sys.executable, "-m", "onnxprune", "export", str(out / "hf"), str(onnx_dir)], check=True,
                   cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    copied = []
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (out / "hf" / name).is_file() and not (onnx_dir / name).is_file():
            shutil.copy2(out / "hf" / name, onnx_dir / name)
            copied.append(name)
    print(f"exported {onnx_dir / 'model.onnx'}" + (f"; copied {', '.join(copied)} beside it" if copied
                                                     else "; the export wrote the tokenizer files itself"))
    return onnx_dir / "model.onnx"


def ensure_model(out: Path = DEFAULT_OUT, force: bool = False, steps: int = 800, batch: int = 16, lr: float = 2e-3,
                 max_minutes: float = 8.5, seed: int = 0) -> Path:
    """Train and export unless already there; returns the directory."""
    if not force and (out / "hf" / "config.json").is_file() and (out / "onnx" / "model.onnx").is_file() \
            and (out / "summary.json").is_file():
        print(f"{out}: trained model found, skipping training", flush=True)
        return out
    started = time.perf_counter()
    summary = train(out, steps, batch, lr, max_minutes, seed)
    export(out)
    summary["total_seconds_with_export"] = round(time.perf_counter() - started, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-minutes", type=float, default=8.5, help="stop training early past this wall time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="retrain even if the model exists")
    args = parser.parse_args()
    ensure_model(args.out, args.force, args.steps, args.batch, args.lr, args.max_minutes, args.seed)


if __name__ == "__main__":
    main()
