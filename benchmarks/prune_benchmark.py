"""Perplexity and wall time of magnitude, Wanda and SparseGPT: onnxprune's ONNX path vs the
reference-style torch path, on the same trained model, calibration windows and test text.

    python benchmarks/prune_benchmark.py [--nsamples 64] [--seqlen 128] [--repeat 3]
                                         [--patterns 50%,4:8,2:4] [--omp-wait-policy passive|default]

1. Trains the tiny OPT model unless `runs/tiny-lm/` already holds it (benchmarks/train_tiny_lm.py).
2. Dense perplexity: `onnxprune eval` on model.onnx, and the references' eval loop in torch.
3. For every method × pattern (50 % unstructured, 4:8, 2:4):
   ONNX:  `onnxprune apply runs/tiny-lm/onnx/model.onnx --method M ... --calib runs/tiny-lm/train.txt
           --nsamples N --seqlen S --report R.json` (a subprocess, timed end to end; the stage
           split comes from the report's timings_s), then `onnxprune eval` on the output.
   torch: the HF model loaded fresh, pruned by benchmarks/torch_reference.py with exactly the
          windows onnxprune draws (onnxprune.data.calibration_windows(tok, train.txt, N, S, seed=0)),
          then the references' perplexity loop on the same test ids onnxprune evaluates.
   The pruned weights of both paths are also compared (mask agreement, largest difference).
4. Writes benchmarks/results/prune_benchmark.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _omp_policy_from_argv() -> str:
    """--omp-wait-policy must act before torch (and its OpenMP runtime) loads, so it is read here."""
    for index, arg in enumerate(sys.argv):
        if arg.startswith("--omp-wait-policy="):
            return arg.split("=", 1)[1]
        if arg == "--omp-wait-policy" and index + 1 < len(sys.argv):
            return sys.argv[index + 1]
    return "passive"


# Both paths run under the same OpenMP wait policy: this process (torch path) and, through the
# inherited environment, every `onnxprune` subprocess (whose SparseGPT pass and statistics also
# run in torch). PASSIVE (idle threads sleep) by default: on a shared 2-core machine the default
# spinning makes timings swing several-fold with other processes' load.
OMP_WAIT_POLICY = _omp_policy_from_argv()
if OMP_WAIT_POLICY == "passive":
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
elif OMP_WAIT_POLICY == "default":
    os.environ.pop("OMP_WAIT_POLICY", None)
else:
    raise SystemExit(f"--omp-wait-policy must be passive or default, not {OMP_WAIT_POLICY!r}")

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import torch_reference as ref  # noqa: E402
from train_tiny_lm import DEFAULT_OUT, ensure_model  # noqa: E402

PATTERNS = {"50%": ("--sparsity", "0.5", 0.5, 0, 0), "4:8": ("--pattern", "4:8", 0.5, 4, 8),
            "2:4": ("--pattern", "2:4", 0.5, 2, 4), "60%": ("--sparsity", "0.6", 0.6, 0, 0),
            "70%": ("--sparsity", "0.7", 0.7, 0, 0)}
DEFAULT_PATTERNS = ["50%", "4:8", "2:4"]
METHODS = ["magnitude", "wanda", "sparsegpt"]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def onnxprune_command() -> list[str]:
    script = Path(sys.executable).with_name("onnxprune")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "onnxprune"]


def run_cli(*args) -> tuple[float, str]:
    command = onnxprune_command() + [str(a) for a in args]
    env = {**os.environ, "NO_COLOR": "1"}
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"command failed ({done.returncode}): {' '.join(command)}\n{done.stdout}\n{done.stderr}")
    return seconds, done.stdout


def onnx_eval(model: Path, test: Path, tokenizer_dir: Path, seqlen: int, json_out: Path) -> dict:
    seconds, _ = run_cli("eval", model, "--eval", test, "--seqlen", seqlen, "--tokenizer", tokenizer_dir,
                         "-o", json_out)
    result = json.loads(json_out.read_text())
    result["process_seconds"] = round(seconds, 3)
    return result


def load_hf(hf_dir: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), attn_implementation="eager", dtype=torch.float32)
    model.config.use_cache = False
    return model.eval()


def module_name_of(node_name: str, module_names: list[str]) -> str:
    """'/model/decoder/layers.0/self_attn/q_proj/MatMul' → 'model.decoder.layers.0.self_attn.q_proj'."""
    path = ".".join(node_name.strip("/").split("/")[:-1])
    matches = [m for m in module_names if m == path or m.endswith("." + path)]
    if len(matches) != 1:
        raise RuntimeError(f"cannot map {node_name} to one module: {matches}")
    return matches[0]


def compare_weights(onnx_path: Path, model) -> dict:
    """How far the ONNX-pruned in-block weights are from the torch-pruned ones."""
    from onnxprune.model_io import load_model
    from onnxprune.targets import discover_targets

    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    names = list(linears)
    agree, total, worst_abs, worst_rel, worst_name = 0, 0, 0.0, 0.0, None
    matched = 0
    for target in discover_targets(load_model(onnx_path)):
        if target.block is None:
            continue
        ours = target.read()
        theirs = linears[module_name_of(target.node_name, names)].weight.detach().numpy()
        matched += 1
        agree += int(((ours == 0) == (theirs == 0)).sum())
        total += ours.size
        diff = float(np.abs(ours - theirs).max())
        rel = diff / max(float(np.abs(theirs).max()), 1e-12)
        if rel > worst_rel:
            worst_abs, worst_rel, worst_name = diff, rel, target.node_name
    return {"layers": matched, "mask_agreement": agree / total if total else None, "max_abs_diff": worst_abs,
            "max_rel_diff": worst_rel, "worst_layer": worst_name}


def git_state() -> dict:
    def git(*args):
        done = subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO)
        return done.stdout.strip() if done.returncode == 0 else None
    return {"commit": git("rev-parse", "HEAD"),
            "modified_package_files": (git("status", "--porcelain", "--", "onnxprune", "passes") or "").splitlines()}


def onnx_apply(onnx_model: Path, method: str, flag: str, value: str, calib: list, out_model: Path,
               report_path: Path, repeat: int) -> tuple[dict, list[dict]]:
    """Run `onnxprune apply` `repeat` times; the fastest run's report (calibrate + prune) and all runs."""
    runs = []
    for _ in range(repeat):
        seconds, _ = run_cli("apply", onnx_model, "--method", method, flag, value, *calib, "-o", out_model,
                             "--report", report_path)
        report = json.loads(report_path.read_text())
        stages = report["timings_s"]
        calibrate = stages.get("calibrate", 0.0)
        runs.append({"process_s": round(seconds, 3), "timings_s": stages, "calibrate_s": round(calibrate, 6),
                     "calibrate_plus_prune_s": round(calibrate + stages.get("prune", 0.0), 6),
                     "totals": report["totals"]})
    return min(runs, key=lambda r: r["calibrate_plus_prune_s"]), runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--patterns", default=",".join(DEFAULT_PATTERNS), help="from " + ", ".join(PATTERNS).replace("%", "%%"))
    parser.add_argument("--omp-wait-policy", choices=["passive", "default"], default="passive",
                        help="OpenMP wait policy for both paths (read before torch loads)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="time each path this many times and keep the fastest (the machine may be shared)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()

    torch.set_num_threads(2)
    run_started = time.perf_counter()
    load_before = os.getloadavg()
    base = ensure_model(args.model_dir)
    onnx_model = base / "onnx" / "model.onnx"
    train_txt, test_txt = base / "train.txt", base / "test.txt"
    work = base / "pruned"
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = json.loads((base / "summary.json").read_text())

    from onnxprune.data import calibration_windows, evaluation_ids, load_tokenizer

    tokenizer = load_tokenizer(onnx_model)
    windows = torch.from_numpy(calibration_windows(tokenizer, train_txt, args.nsamples, args.seqlen, seed=0))
    test_ids = torch.from_numpy(evaluation_ids(tokenizer, test_txt, args.seqlen))
    log(f"calibration: {args.nsamples} windows × {args.seqlen} tokens from {train_txt}; "
        f"test: {test_ids.numel():,} tokens = {test_ids.numel() // args.seqlen} windows from {test_txt}")

    log("dense: onnxprune eval")
    dense_onnx = onnx_eval(onnx_model, test_txt, onnx_model.parent, args.seqlen, work / "dense.eval.json")
    log("dense: torch eval")
    start = time.perf_counter()
    dense_torch = ref.eval_ppl(load_hf(base / "hf"), test_ids, args.seqlen)
    dense = {"ppl_onnx": dense_onnx["perplexity"], "ppl_torch": dense_torch,
             "onnx_eval_s": dense_onnx["seconds"], "torch_eval_s": round(time.perf_counter() - start, 3)}
    log(f"dense perplexity: ONNX {dense['ppl_onnx']:.4f}, torch {dense['ppl_torch']:.4f}")

    rows = []
    configs = [(m, p) for m in args.methods.split(",") for p in args.patterns.split(",")]
    for index, (method, label) in enumerate(configs, 1):
        flag, value, sparsity, prune_n, prune_m = PATTERNS[label]
        tag = f"{method}-{label.replace(':', 'of').replace('%', 'pct')}"
        out_model, report_path = work / f"{tag}.onnx", work / f"{tag}.report.json"
        calib = [] if method == "magnitude" else ["--calib", train_txt, "--nsamples", args.nsamples,
                                                  "--seqlen", args.seqlen]
        log(f"[{index}/{len(configs)}] {method} {label}: onnxprune apply ×{args.repeat}")
        best, onnx_runs = onnx_apply(onnx_model, method, flag, value, calib, out_model, report_path, args.repeat)
        stages = best["timings_s"]
        log(f"[{index}/{len(configs)}] {method} {label}: onnxprune eval")
        ppl_onnx = onnx_eval(out_model, test_txt, onnx_model.parent, args.seqlen, work / f"{tag}.eval.json")

        log(f"[{index}/{len(configs)}] {method} {label}: torch prune ×{args.repeat} + eval")
        torch_runs = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            model = load_hf(base / "hf")
            load_s = time.perf_counter() - start
            with torch.no_grad():
                timings = ref.prune_model(model, windows, method, sparsity, prune_n, prune_m)
            torch_runs.append({"model_load_s": round(load_s, 3), **timings.as_dict()})
        torch_best = min(torch_runs, key=lambda r: r["total"])
        start = time.perf_counter()
        ppl_torch = ref.eval_ppl(model, test_ids, args.seqlen)
        torch_eval_s = time.perf_counter() - start
        weights = compare_weights(out_model, model)

        ours = best["calibrate_plus_prune_s"]
        row = {
            "method": method, "pattern": label,
            "ppl_onnx": ppl_onnx["perplexity"], "ppl_torch": ppl_torch,
            "ppl_rel_diff": ppl_onnx["perplexity"] / ppl_torch - 1,
            "onnx_timings_s": stages, "onnx_apply_process_s": best["process_s"],
            "onnx_calibrate_s": best["calibrate_s"],
            "onnx_prune_s": stages.get("prune", 0.0), "onnx_load_data_s": stages.get("load_data", 0.0),
            "onnx_calibrate_plus_prune_s": ours,
            "onnx_calibrate_plus_prune_reported_s": round(stages.get("calibrate", 0.0) + stages.get("prune", 0.0), 6),
            "torch_timings_s": torch_best, "torch_total_s": torch_best["total"],
            "ratio_onnx_over_torch": ours / torch_best["total"] if torch_best["total"] else None,
            "ratio_onnx_reported_over_torch": ((stages.get("calibrate", 0.0) + stages.get("prune", 0.0))
                                               / torch_best["total"] if torch_best["total"] else None),
            "onnx_runs": onnx_runs, "torch_runs": torch_runs,
            "onnx_eval_s": ppl_onnx["seconds"], "torch_eval_s": round(torch_eval_s, 3),
            "sparsity_onnx": best["totals"]["sparsity"], "weights": weights,
        }
        rows.append(row)
        log(f"    ppl ONNX {row['ppl_onnx']:.3f} torch {row['ppl_torch']:.3f} ({row['ppl_rel_diff']:+.3%}); "
            f"mask agreement {weights['mask_agreement']:.5f}; ONNX calibrate {row['onnx_calibrate_s']:.2f} s "
            f"prune {row['onnx_prune_s']:.2f} s "
            f"(process {best['process_s']:.1f} s); torch {torch_best['total']:.2f} s (calibrate "
            f"{torch_best['calibrate']:.2f}, prune {torch_best['prune']:.2f}); ratio {row['ratio_onnx_over_torch']:.2f}")

    result = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": {"dir": str(base), "onnx": str(onnx_model), "training": summary},
        "onnxprune": git_state(),
        "repeat": args.repeat,
        "nsamples": args.nsamples, "seqlen": args.seqlen, "calib": str(train_txt), "eval": str(test_txt),
        "eval_windows": int(test_ids.numel() // args.seqlen),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(library default)"), "platform": platform.platform(),
                    "torch": torch.__version__, "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "dense": dense, "rows": rows, "wall_s": round(time.perf_counter() - run_started, 1),
    }
    (args.out / "prune_benchmark.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "prune_benchmark.md").write_text(markdown(result))
    log(f"wrote {args.out / 'prune_benchmark.json'} and .md in {result['wall_s']:.0f} s")
    print(markdown(result))


def markdown(result: dict) -> str:
    training = result["model"]["training"]
    commit = (result["onnxprune"]["commit"] or "?")[:7]
    dirty = " + uncommitted changes in onnxprune/ or passes/" if result["onnxprune"]["modified_package_files"] else ""
    lines = [
        "# onnxprune vs reference-style torch: tiny OPT trained on Python's docs",
        "",
        f"Model: OPT-style causal LM, 4 layers, hidden 256, ffn 1024, {training['params'] / 1e6:.2f} M parameters, "
        f"vocab {training['vocab']}, trained {training['steps']} steps in {training['train_seconds']:.0f} s "
        f"(test ppl {training['test_perplexity_torch_seqlen128']:.2f}; unigram baseline "
        f"{training['unigram_test_perplexity']:.1f}). 24 linear layers pruned (q/k/v/out_proj/fc1/fc2 × 4).",
        f"Calibration: {result['nsamples']} windows × {result['seqlen']} tokens of `{Path(result['calib']).name}` "
        f"(the same windows in both paths); evaluation: {result['eval_windows']} non-overlapping windows of "
        f"{result['seqlen']} tokens of `{Path(result['eval']).name}`. onnxprune {commit}{dirty}. "
        f"Machine: {result['machine']['cpus']} CPU cores (shared), load average "
        f"{result['machine']['loadavg_before'][0]:.1f} before / {result['machine']['loadavg_after'][0]:.1f} after; "
        f"times are the fastest of {result['repeat']} runs of each path, both under OMP_WAIT_POLICY="
        f"{result['machine']['omp_wait_policy']}.",
        "",
        f"Dense perplexity: ONNX {result['dense']['ppl_onnx']:.4f}, torch {result['dense']['ppl_torch']:.4f}.",
        "",
        "| method | pattern | ppl ONNX | ppl torch | Δ rel | mask agree | ONNX calibrate s | ONNX prune s "
        "| torch total s (calibrate + prune) | ratio ONNX/torch | ONNX apply process s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        cal = f"{r['onnx_calibrate_s']:.2f}"
        t = r["torch_timings_s"]
        lines.append(f"| {r['method']} | {r['pattern']} | {r['ppl_onnx']:.3f} | {r['ppl_torch']:.3f} | "
                     f"{r['ppl_rel_diff']:+.2%} | {r['weights']['mask_agreement']:.4f} | {cal} | "
                     f"{r['onnx_prune_s']:.2f} | {t['total']:.2f} ({t['capture'] + t['calibrate']:.2f} + "
                     f"{t['prune']:.2f}) | {r['ratio_onnx_over_torch']:.2f} | {r['onnx_apply_process_s']:.1f} |")
    lines += [
        "",
        "- ppl: `onnxprune eval` (ONNX) and the references' eval loop in torch, on the same token ids. "
        "mask agree: fraction of in-block weights that are zero in both or non-zero in both pruned models.",
        "- ONNX calibrate / prune: `timings_s` of `onnxprune apply --report`; calibrate excludes the prune time "
        "spent inside it, and loading the model, tokenizing the calibration text (`load_data`) and saving are not "
        "counted.",
        "- torch total: capture of the layer-0 inputs + hooked layer passes + pruning + re-runs of the pruned "
        "layers (model loading not counted); in parentheses the forward passes (capture + calibrate) and the "
        "pruning. ratio = ONNX (calibrate + prune) / torch total. Magnitude needs no calibration in either path.",
        "- ONNX apply process s: the whole `onnxprune apply` subprocess (Python start-up and imports included).",
        f"- Whole benchmark: {result['wall_s']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
