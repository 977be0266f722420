"""Calibrated pruning of real pretrained CNN / audio models that install offline from PyPI.

For each model: realistic calibration inputs (text rendered with Pillow for the OCR models, the
matplotlib sample photo for the detector, a synthetic conversation in 512-sample chunks fed as
silero's wrapper streams it, for the VAD), then `onnxprune apply --method M` at 50% and 2:4 with the default selection, the
share of the model's convolution parameters pruned (from the report), and fidelity against the
dense model on held-out inputs (`onnxprune eval --reference`). Writes results.jsonl and table.md.

    python benchmarks/real_models.py -o bench-real [--models det,rec,cls,vad,yolo] [--methods wanda,sparsegpt,mama]

Models whose package is absent are skipped. Each model is pruned as shipped (paddle2onnx exports
keep their weights in Constant nodes, which onnxprune reads). Coverage is the share of the learned
convolution parameters (fixed transforms such as silero's STFT basis excluded) that the default
selection prunes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

PATTERNS = {"50%": ["--sparsity", "0.5"], "2:4": ["--pattern", "2:4"]}
CALIBRATION_SAMPLES = 8
HELD_OUT_SAMPLES = 4
# (calibration, held-out) where a sample is small: a silero chunk is 32 ms of audio and one LSTM
# step, and 8 of them would be a quarter second, mostly the stream's opening pause.
SAMPLES = {"vad": (256, 64)}


def package_file(package: str, relative: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / relative
    return path if path.is_file() else None


def text_images(count: int, height: int, width: int, seed: int, lines: int = 1) -> np.ndarray:
    """Black text (random words, sizes, offsets) on light backgrounds, as uint8 [count, H, W, 3]."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    words = ("invoice total amount date 2024 receipt paid order number customer address street city "
             "phone price quantity item tax discount subtotal OCR model pruning sparse network").split()
    images = []
    for _ in range(count):
        background = tuple(int(v) for v in rng.integers(200, 256, size=3))
        image = Image.new("RGB", (width, height), background)
        draw = ImageDraw.Draw(image)
        for line in range(lines):
            size = int(rng.integers(max(10, height // (lines * 3)), max(12, height // (lines + 1))))
            font = ImageFont.load_default(size=size)
            text = " ".join(rng.choice(words, size=int(rng.integers(2, 7))))
            top = int(line * height / lines + rng.integers(0, max(1, height // lines - size)))
            draw.text((int(rng.integers(0, max(1, width // 8))), top), text, fill=tuple(int(v) for v in
                                                                                   rng.integers(0, 80, size=3)), font=font)
        images.append(np.asarray(image))
    return np.stack(images)


def normalized(images: np.ndarray) -> np.ndarray:
    """PaddleOCR's preprocessing: BGR, /255, minus 0.5, divided by 0.5, NCHW float32."""
    return ((images[..., ::-1].astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2).copy()


def photo_crops(count: int, size: int, seed: int) -> np.ndarray:
    """Random crops of matplotlib's sample photo, resized to size×size, RGB /255 NCHW (YOLOv8's input)."""
    from PIL import Image

    path = package_file("matplotlib", "mpl-data/sample_data/grace_hopper.jpg")
    photo = Image.open(path).convert("RGB")
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(count):
        scale = rng.uniform(0.5, 1.0)
        w, h = int(photo.width * scale), int(photo.height * scale)
        left, top = int(rng.integers(0, photo.width - w + 1)), int(rng.integers(0, photo.height - h + 1))
        crop = photo.crop((left, top, left + w, top + h)).resize((size, size))
        crops.append(np.asarray(crop, dtype=np.float32) / 255.0)
    return np.stack(crops).transpose(0, 3, 1, 2).copy()


def voice_like_chunks(count: int, seed: int, chunk: int = 512, rate: int = 16000) -> list[np.ndarray]:
    """Chunks of a synthetic conversation: utterances of 0.6-2.5 s (harmonics of a wavering pitch,
    90-220 Hz, shaped by two moving formants, with a syllable envelope of 3-6 Hz) between pauses of
    0.3-1.5 s, over faint noise, float32. Silero keeps detecting it (about 60% of the chunks above
    0.5); a steady periodic voice it takes for background after a few seconds."""
    rng = np.random.default_rng(seed)
    total = count * chunk
    signal = 0.005 * rng.standard_normal(total)
    start = int(rng.uniform(0.3, 1.5) * rate)
    while start < total:
        t = np.arange(int(rng.uniform(0.6, 2.5) * rate)) / rate
        pitch = rng.uniform(90, 220) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.3, 1.5) * t + rng.uniform(0, 6)))
        phase = 2 * np.pi * np.cumsum(pitch) / rate
        formants = [(rng.uniform(300, 900) + 200 * np.sin(2 * np.pi * rng.uniform(2, 5) * t), 150, 1.0),
                    (rng.uniform(1000, 2500) + 400 * np.sin(2 * np.pi * rng.uniform(2, 5) * t), 250, 0.5)]
        voiced = sum(np.sin(k * phase) * (0.05 + sum(gain * np.exp(-((k * pitch - centre) / width) ** 2)
                                                     for centre, width, gain in formants)) for k in range(1, 30))
        envelope = np.clip(np.sin(2 * np.pi * rng.uniform(3, 6) * t + rng.uniform(0, 6)), 0, None) ** 0.5
        end = min(total, start + len(t))
        signal[start:end] += (rng.uniform(0.1, 0.5) * voiced / np.abs(voiced).max() * envelope)[:end - start]
        start = end + int(rng.uniform(0.3, 1.5) * rate)
    return [signal[i * chunk:(i + 1) * chunk].astype(np.float32) for i in range(count)]


def save_samples(folder: Path, feeds: list[dict[str, np.ndarray]]) -> Path:
    """One .npz per sample (any shapes, scalars allowed)."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, feed in enumerate(feeds):
        np.savez(folder / f"{index:03d}.npz", **feed)
    return folder


def model_inputs(name: str, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    if name == "det":
        return [{"x": normalized(text_images(1, 320, 320, seed + i, lines=6))} for i in range(count)]
    if name == "rec":
        return [{"x": normalized(text_images(1, 48, 320, seed + i))} for i in range(count)]
    if name == "cls":
        return [{"x": normalized(text_images(1, 48, 192, seed + i))} for i in range(count)]
    if name == "yolo":
        return [{"images": photo_crops(1, 320, seed + i)} for i in range(count)]
    if name == "vad":  # silero: consecutive chunks of one stream, as its own wrapper calls the model
        import onnxruntime as ort

        session = ort.InferenceSession(str(package_file(*MODELS["vad"][:2])), providers=["CPUExecutionProvider"])
        return silero_stream(session, voice_like_chunks(count, seed))
    raise ValueError(name)


SILERO_CONTEXT = 64  # samples of the previous chunk that silero's OnnxWrapper puts before each chunk (16 kHz)


def silero_feed(chunk: np.ndarray, context: np.ndarray, state: np.ndarray) -> dict[str, np.ndarray]:
    return {"input": np.concatenate([context, chunk])[None], "state": state, "sr": np.array(16000, np.int64)}


def silero_stream(session, chunks: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    """silero's feeds as its OnnxWrapper makes them for a stream: each 512-sample chunk after the last
    64 samples of the one before (zeros first), with the `state` (LSTM h and c) the model returned
    after the previous chunk (zeros first). Without the context the model sees no speech in this
    signal (probabilities ~0.001) and its cell state grows by ~1 per call; with it, 0.07-0.89."""
    state, context, feeds = np.zeros((2, 1, 128), np.float32), np.zeros(SILERO_CONTEXT, np.float32), []
    for chunk in chunks:
        feeds.append(silero_feed(chunk, context, state))
        state, context = session.run(["stateN"], feeds[-1])[0], chunk[-SILERO_CONTEXT:]
    return feeds


MODELS = {
    "det": ("rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx", "PP-OCRv4 det (rapidocr)"),
    "rec": ("rapidocr_onnxruntime", "models/ch_PP-OCRv4_rec_infer.onnx", "PP-OCRv4 rec (rapidocr)"),
    "cls": ("rapidocr_onnxruntime", "models/ch_ppocr_mobile_v2.0_cls_infer.onnx", "PP-OCR mobile v2 cls (rapidocr)"),
    "vad": ("silero_vad", "data/silero_vad_16k_op15.onnx", "silero VAD 16k op15"),
    "yolo": ("nudenet", "320n.onnx", "YOLOv8n (nudenet 320n)"),
}


def learned_conv_params(path: Path) -> int:
    """Parameters of the Conv / ConvTranspose weights that onnxprune finds, less the fixed
    signal-processing transforms (an STFT basis is maths, not a learned convolution)."""
    import onnx_ir as ir

    from onnxprune.targets import discover_targets

    return sum(t.layout.out_features * t.layout.in_features for t in discover_targets(ir.load(str(path)))
               if t.layout.is_conv and not (t.default_reason or "").startswith("fixed transform"))


def calibration_args(method: str, calib: Path) -> list[str]:
    """`--calib DIR` for a calibrated method; none for a data-free one (magnitude, random, ...),
    which refuses it rather than ignore it."""
    from onnxprune.passes.registry import available

    return ["--calib", str(calib)] if available()[method].needs else []


def onnxprune(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxprune", *args], capture_output=True, text=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--methods", default="wanda,sparsegpt,mama")
    parser.add_argument("--patterns", default=",".join(PATTERNS))
    args = parser.parse_args()
    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for key in args.models.split(","):
        package, relative, label = MODELS[key]
        source = package_file(package, relative)
        if source is None:
            print(f"skip {key}: {package} is not installed")
            continue
        folder = out / key
        folder.mkdir(exist_ok=True)
        calibration_samples, held_out_samples = SAMPLES.get(key, (CALIBRATION_SAMPLES, HELD_OUT_SAMPLES))
        calib = save_samples(folder / "calib", model_inputs(key, calibration_samples, seed=0))
        held_out = model_inputs(key, held_out_samples, seed=1000)
        held_out_dir = save_samples(folder / "held_out", held_out)
        total = learned_conv_params(source)
        for method in args.methods.split(","):
            for pattern in args.patterns.split(","):
                pruned, report = folder / f"{method}-{pattern.replace(':', 'of')}.onnx", folder / f"{method}-{pattern.replace(':', 'of')}.json"
                run = onnxprune("apply", str(source), "-m", method, *PATTERNS[pattern],
                                *calibration_args(method, calib), "-o", str(pruned), "--report", str(report))
                row = {"model": label, "key": key, "method": method, "pattern": pattern, "rc": run.returncode,
                       "conv_params": total}
                if run.returncode == 0:
                    data = json.loads(report.read_text())
                    row["conv_pruned_params"] = sum(t["params"] for t in data["targets"] if "Conv" in t["op"])
                    row["coverage"] = row["conv_pruned_params"] / total if total else None
                    row["sparsity"] = data["totals"]["sparsity"]
                    row["left_dense"] = len(data["skipped"])
                    fidelity = folder / f"{method}-{pattern.replace(':', 'of')}.fidelity.json"
                    evaluation = onnxprune("eval", str(pruned), "--reference", str(source), "--inputs", str(held_out_dir),
                                           "-o", str(fidelity))
                    if evaluation.returncode == 0:
                        outputs = json.loads(fidelity.read_text())["outputs"]
                        # The output with the most rows per sample: a cosine over one value per row
                        # (silero's speech probability) says nothing; its recurrent state does.
                        name, main = max(outputs.items(), key=lambda item: item[1]["rows"])
                        row["output"], row["cosine"], row["rel_error"] = name, main["cosine"], main["relative_error"]
                        row["rel_error_all"] = {n: o["relative_error"] for n, o in outputs.items()}
                    else:
                        row["eval_error"] = evaluation.stderr.strip().splitlines()[-1:]
                else:
                    row["error"] = run.stderr.strip().splitlines()[-1:]
                print(json.dumps(row), flush=True)
                results.append(row)
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    lines = ["| model | method | pattern | learned conv params pruned | cosine vs dense | rel. error |",
             "|---|---|---|---|---|---|"]
    for r in results:
        if r["rc"]:
            lines.append(f"| {r['model']} | {r['method']} | {r['pattern']} | failed: {r.get('error')} | | |")
            continue
        cosine = f"{r['cosine']:.4f}" if "cosine" in r else "-"
        error = f"{r['rel_error']:.3f}" if "rel_error" in r else "-"
        lines.append(f"| {r['model']} | {r['method']} | {r['pattern']} | {r['coverage']:.1%} | {cosine} | {error} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
