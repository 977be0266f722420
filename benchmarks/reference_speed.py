"""Whole-`apply` wall time and peak memory, onnxprune vs the real reference code, side by side.

    python benchmarks/reference_speed.py --reference PATH/TO/locuslab-wanda [--work /tmp/ref-speed]
        [--layers 12 --hidden 768] [--nsamples 32 --seqlen 512] [--threads 2] [--methods wanda,sparsegpt,mama]
        [--repeat 1]

PATH is a checkout of github.com/locuslab/wanda (its `lib/prune_opt.py` and `lib/sparsegpt.py` are
run unchanged; nothing of it is copied into this repository). Without it the script says so and
stops. Steps:

1. Builds once, under --work: a randomly initialised OPT (default: the OPT-125M shape, 12 layers,
   hidden 768) saved with `save_pretrained`, a BPE tokenizer trained on Python's own docs, the
   corpus as train.txt, and the ONNX export (`onnxprune export`).
2. For each method, in alternation (ours, reference, ours, reference ... --repeat times), each a
   whole process (load → calibrate → prune → save), timed by wall clock, peak RSS from wait4:
   ours:  onnxprune apply onnx/model.onnx -m M -s 0.5 --calib train.txt --nsamples N --seqlen S
   theirs: lib.prune_opt.prune_wanda / prune_sparsegpt on the HF model, with its `get_loaders`
           replaced by exactly the windows onnxprune draws (onnxprune.data.calibration_windows),
           then save_pretrained. MAMA has no reference; it is reported against our SparseGPT.
   Both run with OMP_NUM_THREADS = --threads (onnxruntime's pools follow it in onnxprune).
3. Perplexity of every pruned model on 8 held-out windows of the corpus (ONNX in onnxruntime,
   the reference's output in torch), so "as fast" is at equal quality.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
EVAL_WINDOWS = 8


def build(work: Path, layers: int, hidden: int, seqlen: int) -> None:
    if (work / "onnx" / "model.onnx").exists():
        return
    import torch
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

    corpus = "\n\n".join(topics[key] for key in sorted(topics))
    work.mkdir(parents=True, exist_ok=True)
    (work / "train.txt").write_text(corpus)
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator([corpus], trainers.BpeTrainer(vocab_size=4096, special_tokens=["<pad>", "<unk>", "</s>"],
                                                          show_progress=False))
    raw.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="</s>", eos_token="</s>",
                                        pad_token="<pad>")
    torch.manual_seed(0)
    config = OPTConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                       ffn_dim=4 * hidden, num_attention_heads=hidden // 64, word_embed_proj_dim=hidden,
                       max_position_embeddings=max(2048, seqlen), pad_token_id=0, bos_token_id=2, eos_token_id=2)
    model = OPTForCausalLM(config).eval()
    model.save_pretrained(work / "hf")
    tokenizer.save_pretrained(work / "hf")
    subprocess.run([sys.executable, "-m", "onnxprune", "export", str(work / "hf"), str(work / "onnx")], check=True)
    tokenizer.save_pretrained(work / "onnx")


def windows(work: Path, nsamples: int, seqlen: int):
    from onnxprune import data

    tokenizer = data.load_tokenizer(work / "onnx" / "model.onnx")
    return data.calibration_windows(tokenizer, work / "train.txt", nsamples, seqlen, seed=0)


def eval_ids(work: Path, seqlen: int):
    """Held-out windows: the corpus's last EVAL_WINDOWS·seqlen tokens."""
    from onnxprune import data

    tokenizer = data.load_tokenizer(work / "onnx" / "model.onnx")
    ids = data.tokenize(tokenizer, (work / "train.txt").read_text())
    return ids[-EVAL_WINDOWS * seqlen:].reshape(EVAL_WINDOWS, seqlen)


def run_reference(args) -> None:
    """In a child process: the reference's pruning of the HF model, then save_pretrained."""
    import torch
    from transformers import AutoTokenizer, OPTForCausalLM

    sys.path.insert(0, str(Path(args.reference).resolve()))
    import lib.prune_opt as reference

    work = Path(args.work)
    calib = [(torch.from_numpy(w[None]), None) for w in windows(work, args.nsamples, args.seqlen)]
    reference.get_loaders = lambda *a, **k: (calib, None)
    # It calls torch.cuda.synchronize / empty_cache even on the CPU, which a CPU build of torch refuses.
    torch.cuda.synchronize = torch.cuda.empty_cache = lambda *a, **k: None
    model = OPTForCausalLM.from_pretrained(work / "hf", dtype=torch.float32, attn_implementation="eager").eval()
    model.seqlen, model.hf_device_map = args.seqlen, {}
    tokenizer = AutoTokenizer.from_pretrained(work / "hf")
    options = argparse.Namespace(nsamples=args.nsamples, seed=0, sparsity_ratio=0.5)
    with torch.no_grad():
        if args.method == "wanda":
            reference.prune_wanda(options, model, tokenizer, torch.device("cpu"))
        else:
            reference.prune_sparsegpt(options, model, tokenizer, torch.device("cpu"))
    model.save_pretrained(args.output)


def perplexity_torch(model_dir: Path, ids) -> float:
    import torch
    from transformers import OPTForCausalLM

    model = OPTForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(ids)).logits
    return _perplexity(logits.numpy(), ids)


def perplexity_onnx(path: Path, ids) -> float:
    import numpy as np
    import onnxruntime as ort

    from onnxprune.data import model_feeds

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    logits = np.concatenate([session.run(["logits"], model_feeds(names, window[None]))[0] for window in ids])
    return _perplexity(logits, ids)


def _perplexity(logits, ids) -> float:
    import numpy as np

    logits = logits[:, :-1].astype(np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, ids[:, 1:, None], -1).mean()
    return float(np.exp(nll))


def timed(command: list[str], env: dict) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one whole process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"failed ({status}): {' '.join(command)}\n{process.stderr.read().decode()[-3000:]}")
    return wall, usage.ru_maxrss / 1024 / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ref-speed"))
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default="wanda,sparsegpt,mama")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--run-reference", choices=["wanda", "sparsegpt"], dest="method", help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        return run_reference(args)
    if args.reference is None or not (args.reference / "lib" / "prune_opt.py").is_file():
        raise SystemExit("needs --reference PATH: a checkout of github.com/locuslab/wanda (with lib/prune_opt.py); "
                         "git clone https://github.com/locuslab/wanda")
    build(args.work, args.layers, args.hidden, args.seqlen)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = args.work / "out"
    out.mkdir(exist_ok=True)
    common = ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
    rows: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for _ in range(args.repeat):
        for method in args.methods.split(","):
            ours = [sys.executable, "-m", "onnxprune", "apply", str(args.work / "onnx" / "model.onnx"), "-m", method,
                    "-s", "0.5", "--calib", str(args.work / "train.txt"), *common, "-o", str(out / f"{method}.onnx")]
            rows.setdefault(("onnxprune", method), []).append(timed(ours, env))
            if method in ("wanda", "sparsegpt"):
                theirs = [sys.executable, __file__, "--run-reference", method, "--reference", str(args.reference),
                          "--work", str(args.work), *common, "--output", str(out / f"reference-{method}")]
                rows.setdefault(("reference", method), []).append(timed(theirs, env))
            print(json.dumps({f"{k[0]} {k[1]}": v[-1] for k, v in rows.items() if k[1] == method}), flush=True)
    ids = eval_ids(args.work, args.seqlen)
    dense = perplexity_onnx(args.work / "onnx" / "model.onnx", ids)
    print(f"\n{args.layers} layers, hidden {args.hidden}, {args.nsamples} × {args.seqlen} calibration, "
          f"{args.threads} threads, 50 % unstructured; dense perplexity {dense:.2f} (ONNX), "
          f"{perplexity_torch(args.work / 'hf', ids):.2f} (torch)\n")
    print("| method | onnxprune wall s | reference wall s | ratio | onnxprune peak RSS GB | reference peak RSS GB "
          "| ppl onnxprune | ppl reference |")
    print("|---|---|---|---|---|---|---|---|")
    sparsegpt_wall = min(w for w, _ in rows.get(("onnxprune", "sparsegpt"), [(float("nan"), 0)]))
    for method in args.methods.split(","):
        wall, rss = min(rows[("onnxprune", method)])
        ppl = perplexity_onnx(out / f"{method}.onnx", ids)
        if ("reference", method) in rows:
            ref_wall, ref_rss = min(rows[("reference", method)])
            ref_ppl = perplexity_torch(out / f"reference-{method}", ids)
            print(f"| {method} | {wall:.1f} | {ref_wall:.1f} | {wall / ref_wall:.2f} | {rss:.2f} | {ref_rss:.2f} "
                  f"| {ppl:.2f} | {ref_ppl:.2f} |")
        else:
            print(f"| {method} | {wall:.1f} | – | {wall / sparsegpt_wall:.2f} × our SparseGPT | {rss:.2f} | – "
                  f"| {ppl:.2f} | – |")


if __name__ == "__main__":
    main()
