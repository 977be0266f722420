"""Whole-`apply` wall time and peak memory, onnxprune vs the real reference code, side by side.

    python benchmarks/reference_speed.py --reference PATH/TO/locuslab-wanda [--arch opt|llama]
        [--work /tmp/ref-speed-ARCH] [--layers 12 --hidden 768 --kv-heads 4] [--nsamples 32 --seqlen 512]
        [--threads 2] [--methods wanda,sparsegpt,mama] [--repeat 1]

PATH is a checkout of github.com/locuslab/wanda (its `lib/prune_opt.py` for OPT, `lib/prune.py` for
Llama, each with its `lib/sparsegpt.py` and `lib/layerwrapper.py`, are run unchanged; nothing of it
is copied into this repository). Without it the script says so and stops. Steps:

1. Builds once, under --work: a randomly initialised model saved with `save_pretrained`, a BPE
   tokenizer trained on Python's own docs, the corpus as train.txt, and the ONNX export
   (`onnxprune export`). --arch opt (default): the OPT-125M shape, 12 layers, hidden 768, FFN 4·hidden.
   --arch llama: 12 layers, hidden 768, SwiGLU MLP of 8/3·hidden (2048), 12 heads, 4 key-value heads
   (GQA), rotary positions.
2. For each method, in alternation (ours, reference, ours, reference ... --repeat times), each a
   whole process (load → calibrate → prune → save), timed by wall clock, peak RSS from wait4:
   ours:  onnxprune apply onnx/model.onnx -m M -s 0.5 --calib train.txt --nsamples N --seqlen S
   theirs: the reference's prune_wanda / prune_sparsegpt on the HF model, with its `get_loaders`
           replaced by exactly the windows onnxprune draws (onnxprune.data.calibration_windows),
           then save_pretrained. MAMA has no reference; it is reported against our SparseGPT.
   Both run with OMP_NUM_THREADS = --threads (onnxruntime's pools follow it in onnxprune).
3. Perplexity of every pruned model on 8 held-out windows of the corpus (ONNX in onnxruntime,
   the reference's output in torch), so "as fast" is at equal quality.
Prints a Markdown table, a row as each method finishes.

The one adapter (Llama only): the 2023 reference calls each decoder layer as
`layer(x, attention_mask=..., position_ids=...)`, but transformers >= 4.48's LlamaDecoderLayer
takes the rotary (cos, sin) from its caller as `position_embeddings`. `supply_rotary` adds a
forward pre-hook to every decoder layer that, only when `position_embeddings` is absent, computes
it as LlamaModel.forward does: `model.model.rotary_emb(x, position_ids)`. Nothing else of the
reference's calls changes (tests/test_reference_speed.py checks its layer-by-layer outputs equal a
plain forward's).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
EVAL_WINDOWS = 8
REFERENCE_MODULES = {"opt": "lib.prune_opt", "llama": "lib.prune"}  # the reference's pruning code per architecture


def build(work: Path, arch: str, layers: int, hidden: int, kv_heads: int, seqlen: int) -> None:
    shape = {"arch": arch, "layers": layers, "hidden": hidden, "kv_heads": kv_heads if arch == "llama" else None}
    if (work / "onnx" / "model.onnx").exists():
        built = json.loads((work / "shape.json").read_text()) if (work / "shape.json").exists() else None
        if built != shape:
            raise SystemExit(f"{work} holds another model ({built or 'unknown shape'}, asked for {shape}); "
                             f"pass another --work or delete it")
        return
    import torch
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

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
    model = AutoModelForCausalLM.from_config(hf_config(arch, len(tokenizer), layers, hidden, kv_heads, seqlen)).eval()
    model.save_pretrained(work / "hf")
    tokenizer.save_pretrained(work / "hf")
    subprocess.run([sys.executable, "-m", "onnxprune", "export", str(work / "hf"), str(work / "onnx")], check=True)
    tokenizer.save_pretrained(work / "onnx")
    (work / "shape.json").write_text(json.dumps(shape))


def hf_config(arch: str, vocab: int, layers: int, hidden: int, kv_heads: int, seqlen: int):
    from transformers import LlamaConfig, OPTConfig

    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                  max_position_embeddings=max(2048, seqlen), pad_token_id=0, bos_token_id=2, eos_token_id=2)
    if arch == "opt":
        return OPTConfig(ffn_dim=4 * hidden, word_embed_proj_dim=hidden, **common)
    return LlamaConfig(intermediate_size=8 * hidden // 3, num_key_value_heads=kv_heads, **common)


def supply_rotary(model) -> None:
    """Give the reference's `layer(x, attention_mask=, position_ids=)` calls the rotary (cos, sin)
    that transformers >= 4.48's LlamaDecoderLayer needs from its caller, computed as
    LlamaModel.forward computes it; a call that passes `position_embeddings` is left as it is."""
    rotary = model.model.rotary_emb

    def hook(_, args, kwargs):
        if kwargs.get("position_embeddings") is None:
            kwargs["position_embeddings"] = rotary(args[0], kwargs["position_ids"])
        return args, kwargs

    for layer in model.model.layers:
        layer.register_forward_pre_hook(hook, with_kwargs=True)


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
    from transformers import AutoTokenizer

    sys.path.insert(0, str(Path(args.reference).resolve()))
    reference = importlib.import_module(REFERENCE_MODULES[args.arch])

    work = Path(args.work)
    calib = [(torch.from_numpy(w[None]), None) for w in windows(work, args.nsamples, args.seqlen)]
    reference.get_loaders = lambda *a, **k: (calib, None)
    # It calls torch.cuda.synchronize / empty_cache even on the CPU, which a CPU build of torch refuses.
    torch.cuda.synchronize = torch.cuda.empty_cache = lambda *a, **k: None
    model = load_hf(work / "hf")
    if args.arch == "llama":
        supply_rotary(model)
    model.seqlen, model.hf_device_map = args.seqlen, {}
    tokenizer = AutoTokenizer.from_pretrained(work / "hf")
    # use_variant: lib/prune.py's prune_wanda reads it (False: the plain per-row Wanda of prune_opt.py).
    options = argparse.Namespace(nsamples=args.nsamples, seed=0, sparsity_ratio=0.5, use_variant=False)
    with torch.no_grad():
        if args.method == "wanda":
            reference.prune_wanda(options, model, tokenizer, torch.device("cpu"))
        else:
            reference.prune_sparsegpt(options, model, tokenizer, torch.device("cpu"))
    model.save_pretrained(args.output)


def load_hf(model_dir: Path):
    """The HF model in float32 with eager attention, the references' setting."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()


def perplexity_torch(model_dir: Path, ids) -> float:
    import torch

    with torch.no_grad():
        logits = load_hf(model_dir)(torch.from_numpy(ids)).logits
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
    parser.add_argument("--arch", choices=sorted(REFERENCE_MODULES), default="opt")
    parser.add_argument("--work", type=Path, help="build folder (default /tmp/ref-speed-ARCH)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768, help="a multiple of 64 (heads of 64)")
    parser.add_argument("--kv-heads", type=int, default=4, help="llama: key-value heads (GQA)")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default="wanda,sparsegpt,mama")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--run-reference", choices=["wanda", "sparsegpt"], dest="method", help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work = args.work or Path(f"/tmp/ref-speed-{args.arch}")
    if args.method:
        return run_reference(args)
    module_file = Path(*REFERENCE_MODULES[args.arch].split(".")).with_suffix(".py")
    if args.reference is None or not (args.reference / module_file).is_file():
        raise SystemExit(f"needs --reference PATH: a checkout of github.com/locuslab/wanda (with {module_file}); "
                         "git clone https://github.com/locuslab/wanda")
    heads = args.hidden // 64
    if args.hidden % 64 or (args.arch == "llama" and heads % args.kv_heads):
        parser.error(f"--hidden {args.hidden} must be a multiple of 64 and its {heads} heads a multiple of "
                     f"--kv-heads {args.kv_heads}")
    build(args.work, args.arch, args.layers, args.hidden, args.kv_heads, args.seqlen)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = args.work / "out"
    out.mkdir(exist_ok=True)
    common = ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
    ids = eval_ids(args.work, args.seqlen)
    shape = f"{args.kv_heads} key-value heads, " if args.arch == "llama" else ""
    print(f"\n{args.arch}, {args.layers} layers, hidden {args.hidden}, {shape}{args.nsamples} × {args.seqlen} "
          f"calibration, {args.threads} threads, 50 % unstructured; dense perplexity "
          f"{perplexity_onnx(args.work / 'onnx' / 'model.onnx', ids):.2f} (ONNX), "
          f"{perplexity_torch(args.work / 'hf', ids):.2f} (torch)\n")
    print("| method | onnxprune wall s | reference wall s | ratio | onnxprune peak RSS GB | reference peak RSS GB "
          "| ppl onnxprune | ppl reference |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    sparsegpt_wall = float("nan")
    for method in args.methods.split(","):
        ours, theirs = [], []
        for _ in range(args.repeat):
            ours.append(timed([sys.executable, "-m", "onnxprune", "apply", str(args.work / "onnx" / "model.onnx"),
                               "-m", method, "-s", "0.5", "--calib", str(args.work / "train.txt"), *common,
                               "-o", str(out / f"{method}.onnx")], env))
            if method in ("wanda", "sparsegpt"):
                theirs.append(timed([sys.executable, __file__, "--run-reference", method, "--reference",
                                     str(args.reference), "--arch", args.arch, "--work", str(args.work), *common,
                                     "--output", str(out / f"reference-{method}")], env))
        wall, rss = min(ours)
        ppl = perplexity_onnx(out / f"{method}.onnx", ids)
        if method == "sparsegpt":
            sparsegpt_wall = wall
        if theirs:
            ref_wall, ref_rss = min(theirs)
            ref_ppl = perplexity_torch(out / f"reference-{method}", ids)
            print(f"| {method} | {wall:.1f} | {ref_wall:.1f} | {wall / ref_wall:.2f} | {rss:.2f} | {ref_rss:.2f} "
                  f"| {ppl:.2f} | {ref_ppl:.2f} |", flush=True)
        else:
            print(f"| {method} | {wall:.1f} | – | {wall / sparsegpt_wall:.2f} × our SparseGPT | {rss:.2f} | – "
                  f"| {ppl:.2f} | – |", flush=True)


if __name__ == "__main__":
    main()
