#!/usr/bin/env python
"""Silero VAD samples with a live recurrent state: consecutive voice-like chunks (as in
real_models.py), each fed with the `state` the dense model returned after the previous chunk, so the
LSTM's R multiplies a real hidden state. Writes DIR/calib (8) and DIR/held_out (4) .npz feed dicts."""

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).parent))
from real_models import package_file, save_samples, voice_like_chunks  # noqa: E402


def running_feeds(session: ort.InferenceSession, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    state, feeds = np.zeros((2, 1, 128), np.float32), []
    for chunk in voice_like_chunks(count, seed):
        feeds.append({"input": chunk[None], "state": state, "sr": np.array(16000, np.int64)})
        state = session.run(["stateN"], feeds[-1])[0]
    return feeds


def main() -> None:
    model = package_file("silero_vad", "data/silero_vad_16k_op15.onnx")
    if model is None:
        sys.exit("silero-vad is not installed")
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    root = Path(sys.argv[1])
    save_samples(root / "calib", running_feeds(session, 8, seed=0))
    save_samples(root / "held_out", running_feeds(session, 4, seed=1000))


if __name__ == "__main__":
    main()
