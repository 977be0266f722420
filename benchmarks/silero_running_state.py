#!/usr/bin/env python
"""Silero VAD pruned on samples with a live recurrent state, and its fidelity over a long stream.

Calibration and held-out samples are consecutive chunks of a synthetic conversation fed as
silero's own wrapper feeds them (real_models.silero_stream: 64 samples of context, the `state` the
dense model returned after the previous chunk), so the LSTM's R multiplies real hidden states.
Each method prunes at 50% the default selection (which leaves R alone) and that plus R (`--include`);
then dense and pruned models each run the same long stream carrying their own state, as in
deployment, so an error in R feeds back from call to call. Writes DIR/calib, DIR/held_out and
DIR/stream.jsonl; prints one line per run.

    python benchmarks/silero_running_state.py DIR [--calib 256] [--stream 2000] [--methods wanda,sparsegpt,mama]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).parent))
from real_models import (SAMPLES, SILERO_CONTEXT, calibration_args, model_inputs, package_file,  # noqa: E402
                         save_samples, silero_feed, voice_like_chunks)

THRESHOLD = 0.5  # silero's default speech threshold
WITH_R = r"reparam_conv|decoder\.rnn"  # the default selection (4 encoder convs, LSTM W) and the LSTM's R


def stream_fidelity(dense: Path, pruned: Path, chunks: list[np.ndarray]) -> dict[str, float]:
    """Both models over the stream, each fed its own previous state: the speech probabilities'
    largest and mean difference, how often they agree on speech (p >= 0.5), and the state's
    relative error over the whole stream and at its worst call."""
    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (dense, pruned)]
    states = [np.zeros((2, 1, 128), np.float32) for _ in sessions]
    probabilities, trajectories = [[], []], [[], []]
    context = np.zeros(SILERO_CONTEXT, np.float32)
    for chunk in chunks:
        for index, session in enumerate(sessions):
            out, states[index] = session.run(None, silero_feed(chunk, context, states[index]))
            probabilities[index].append(float(out.reshape(-1)[0]))
            trajectories[index].append(states[index].ravel())
        context = chunk[-SILERO_CONTEXT:]
    p, q = (np.array(x) for x in probabilities)
    s, t = (np.array(x, dtype=np.float64) for x in trajectories)
    per_call = np.linalg.norm(t - s, axis=1) / np.maximum(np.linalg.norm(s, axis=1), 1e-12)
    return {"prob_max_abs": float(np.abs(p - q).max()), "prob_mean_abs": float(np.abs(p - q).mean()),
            "decision_agreement": float(((p >= THRESHOLD) == (q >= THRESHOLD)).mean()),
            "speech_share": float((p >= THRESHOLD).mean()),
            "state_rel_error": float(np.linalg.norm(t - s) / np.linalg.norm(s)),
            "state_rel_error_worst": float(per_call.max()),
            "state_cosine": float((s * t).sum() / (np.linalg.norm(s) * np.linalg.norm(t)))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--calib", type=int, default=SAMPLES["vad"][0], help="calibration chunks (one LSTM step each)")
    parser.add_argument("--stream", type=int, default=2000, help="chunks of 32 ms in the fidelity stream")
    parser.add_argument("--methods", default="wanda,sparsegpt,mama")
    args = parser.parse_args()
    model = package_file("silero_vad", "data/silero_vad_16k_op15.onnx")
    if model is None:
        sys.exit("silero-vad is not installed")
    root = args.output
    calib = save_samples(root / "calib", model_inputs("vad", args.calib, seed=0))
    save_samples(root / "held_out", model_inputs("vad", SAMPLES["vad"][1], seed=1000))
    chunks = voice_like_chunks(args.stream, seed=2000)
    rows = []
    for method in args.methods.split(","):
        for with_r in (True, False):
            out = root / f"{method}{'' if with_r else '-no-R'}.onnx"
            run = subprocess.run([sys.executable, "-m", "onnxprune", "apply", str(model), "-m", method, "-s", "0.5",
                                  *calibration_args(method, calib), "-o", str(out),
                                  "--report", str(out.with_suffix(".json")),
                                  *(["--include", WITH_R] if with_r else [])], capture_output=True, text=True)
            if run.returncode:
                sys.exit(f"{method}: {run.stderr.strip()}")
            report = json.loads(out.with_suffix(".json").read_text())
            row = {"method": method, "R_pruned": with_r, "weights_pruned": len(report["targets"]),
                   "skipped": [s["name"] for s in report["skipped"]], **stream_fidelity(model, out, chunks)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    (root / "stream.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
