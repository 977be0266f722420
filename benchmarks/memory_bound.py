"""Peak private memory (RssAnon) of `apply` does not grow with the model: 4 vs 16 (or more) layers.

    python benchmarks/memory_bound.py [--layers 4,16] [--hidden 1024 --ffn 2816 --vocab 32000]
        [--dtype float32|float16|bfloat16] [--methods wanda] [--nsamples 8 --seqlen 128]
        [--work /tmp/memory-bound] [--keep]

Builds Llama-shaped decoders directly with onnx (RMSNorm, q/k/v/o, causal softmax attention,
SiLU-gated MLP, residuals; embedding and LM head; random weights, all in external data), then
runs `onnxprune apply MODEL -m M -s 0.5 --calib calib.npz` for each from another working
directory (a relative path), sampling the child's /proc/PID/status every 20 ms: RssAnon is the
private memory (file-backed pages of the memory-mapped weights are RssFile and do not count).
Prints a table with each run's model size, peak RssAnon, peak RSS, wall time, and the ratio of
the largest to the smallest model's peak RssAnon. Models are deleted afterwards unless --keep.

--dtype float16 / bfloat16 builds the model as a half-precision HF export is (torch.onnx of a
model in that dtype, as optimum's `--dtype fp16` does): weights, MatMuls, residuals and logits in
the half type, and only what HF Llama computes in float32 (`LlamaRMSNorm` upcasts its input;
eager attention's softmax takes dtype=float32) between a Cast up and a Cast back down. The causal
mask holds the dtype's most negative finite value (HF's `torch.finfo(dtype).min`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}


def llama_model(layers: int, hidden: int, ffn: int, vocab: int, path: Path, dtype: str = "float32") -> Path:
    """A Llama-shaped causal LM [1, seq] ids -> logits, weights named like the HF export."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []
    elem = DTYPES[dtype]
    np_type = helper.tensor_dtype_to_np_dtype(elem)

    def tensor(array, name):
        """`array` (float32 or int64) as an initializer, floats in the model's dtype."""
        if array.dtype != np.float32 or elem == TensorProto.FLOAT:
            return numpy_helper.from_array(array, name)
        return numpy_helper.from_array(array.astype(np_type), name)  # ml_dtypes' bfloat16 included

    def weight(name, shape, scale=None):
        scale = scale or 1 / np.sqrt(shape[0])
        inits.append(tensor(rng.standard_normal(shape, dtype=np.float32) * np.float32(scale), name))
        return name

    def in_float32(x, prefix, compute):
        """`compute(x)` in float32, as HF does for RMSNorm and softmax; no Casts in a float32 model."""
        if elem == TensorProto.FLOAT:
            return compute(x)
        up = node("Cast", [x], f"{prefix}/Cast", to=TensorProto.FLOAT)
        return node("Cast", [compute(up)], f"{prefix}/Cast_1", to=elem)

    def node(op, inputs, name, **attrs):
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def rms_norm(x, prefix):
        scale = weight(f"{prefix}.weight", (hidden,), 1.0)

        def normed(x):
            mean = node("ReduceMean", [node("Mul", [x, x], f"{prefix}/sq")], f"{prefix}/mean", axes=[-1], keepdims=1)
            inv = node("Reciprocal", [node("Sqrt", [node("Add", [mean, "eps"], f"{prefix}/add")], f"{prefix}/sqrt")],
                       f"{prefix}/inv")
            return node("Mul", [x, inv], f"{prefix}/normed")
        return node("Mul", [in_float32(x, prefix, normed), scale], f"{prefix}/out")

    inits += [numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
              tensor(np.array(1 / np.sqrt(hidden), np.float32), "attn_scale")]
    h = node("Gather", [weight("model.embed_tokens.weight", (vocab, hidden), 1.0), "input_ids"], "/model/embed")
    for i in range(layers):
        p = f"/model/layers.{i}"
        w = f"model.layers.{i}"
        x = rms_norm(h, f"{p}/input_layernorm")
        q, k, v = (node("MatMul", [x, weight(f"{w}.self_attn.{n}_proj.weight", (hidden, hidden))],
                        f"{p}/self_attn/{n}_proj/MatMul") for n in "qkv")
        kt = node("Transpose", [k], f"{p}/self_attn/kT", perm=[0, 2, 1])
        scores = node("Add", [node("Mul", [node("MatMul", [q, kt], f"{p}/self_attn/qk"), "attn_scale"],
                                   f"{p}/self_attn/scaled"), "causal_mask"], f"{p}/self_attn/masked")
        probs = in_float32(scores, f"{p}/self_attn/softmax",
                           lambda s: node("Softmax", [s], f"{p}/self_attn/softmax", axis=-1))
        attn = node("MatMul", [probs, v], f"{p}/self_attn/av")
        o = node("MatMul", [attn, weight(f"{w}.self_attn.o_proj.weight", (hidden, hidden))], f"{p}/self_attn/o_proj/MatMul")
        h = node("Add", [h, o], f"{p}/attn_residual")
        x = rms_norm(h, f"{p}/post_attention_layernorm")
        gate = node("MatMul", [x, weight(f"{w}.mlp.gate_proj.weight", (hidden, ffn))], f"{p}/mlp/gate_proj/MatMul")
        up = node("MatMul", [x, weight(f"{w}.mlp.up_proj.weight", (hidden, ffn))], f"{p}/mlp/up_proj/MatMul")
        silu = node("Mul", [gate, node("Sigmoid", [gate], f"{p}/mlp/sigmoid")], f"{p}/mlp/silu")
        down = node("MatMul", [node("Mul", [silu, up], f"{p}/mlp/gated"),
                               weight(f"{w}.mlp.down_proj.weight", (ffn, hidden))], f"{p}/mlp/down_proj/MatMul")
        h = node("Add", [h, down], f"{p}/mlp_residual")
    logits = node("MatMul", [rms_norm(h, "/model/norm"), weight("lm_head.weight", (hidden, vocab))], "logits")
    # Causal mask [seq, seq] from the ids' length: 0 on and below the diagonal, -1e9 above.
    nodes[:0] = [
        helper.make_node("Shape", ["input_ids"], ["shape"], start=1, end=2),
        helper.make_node("Squeeze", ["shape"], ["seq"]),
        helper.make_node("Range", ["zero", "seq", "one"], ["positions"]),
        helper.make_node("Unsqueeze", ["positions", "axis1"], ["rows"]),
        helper.make_node("Unsqueeze", ["positions", "axis0"], ["cols"]),
        helper.make_node("Greater", ["cols", "rows"], ["upper"]),
        helper.make_node("Where", ["upper", "minus_inf", "zero_f"], ["causal_mask"]),
    ]
    inits += [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in [
        ("zero", 0), ("one", 1), ("axis0", [0]), ("axis1", [1])]]
    inits += [tensor(np.array(v, np.float32), n) for n, v in [("minus_inf", _most_negative(dtype)), ("zero_f", 0)]]
    graph = helper.make_graph(nodes, "llama", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "seq"])],
                              [helper.make_tensor_value_info(logits, elem, [1, "seq", vocab])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    return path


def _most_negative(dtype: str) -> float:
    """The causal mask's fill: -1e9 in float32 (as before), the most negative finite value of a half type."""
    return -1e9 if dtype == "float32" else float(np.finfo(helper.tensor_dtype_to_np_dtype(DTYPES[dtype])).min)


def peak_memory(command: list[str], cwd: Path) -> dict[str, float]:
    """Wall time and peak RssAnon / VmRSS (GB) of a child, sampled every 20 ms."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peaks = {"RssAnon": 0, "VmRSS": 0}

    def sample():
        while child.poll() is None:
            try:
                for line in Path(f"/proc/{child.pid}/status").read_text().splitlines():
                    key = line.split(":")[0]
                    if key in peaks:
                        peaks[key] = max(peaks[key], int(line.split()[1]))
            except OSError:
                return
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    _, err = child.communicate()
    sampler.join()
    if child.returncode:
        raise SystemExit(f"failed: {' '.join(command)}\n{err.decode()[-3000:]}")
    return {"wall_s": time.perf_counter() - start, "rss_anon_gb": peaks["RssAnon"] / 2**20,
            "rss_gb": peaks["VmRSS"] / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default="4,16")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="the model's float type, as an HF export in that dtype (default float32)")
    parser.add_argument("--methods", default="wanda")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--work", type=Path, default=Path("/tmp/memory-bound"))
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    work = args.work.resolve()
    elsewhere = work / "cwd"
    elsewhere.mkdir(parents=True, exist_ok=True)
    ids = np.random.default_rng(1).integers(0, args.vocab, (args.nsamples, args.seqlen), dtype=np.int64)
    np.savez(work / "calib.npz", input_ids=ids)
    rows = []
    try:
        for layers in map(int, args.layers.split(",")):
            model = work / f"llama-{layers}-{args.dtype}" / "model.onnx"
            if not model.exists():
                llama_model(layers, args.hidden, args.ffn, args.vocab, model, args.dtype)
            size = (model.stat().st_size + model.with_name("model.onnx.data").stat().st_size) / 2**30
            for method in args.methods.split(","):
                out = elsewhere / f"{layers}-{method}.onnx"
                command = [sys.executable, "-m", "onnxprune", "apply", os.path.relpath(model, elsewhere), "-m", method,
                           "-s", "0.5", "--calib", str(work / "calib.npz"), "--nsamples", str(args.nsamples),
                           "-o", out.name]
                result = peak_memory(command, elsewhere)
                rows.append({"layers": layers, "method": method, "model_gb": size, **result})
                print(rows[-1], flush=True)
                for leftover in elsewhere.glob(f"{layers}-{method}.onnx*"):
                    leftover.unlink()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nLlama-shaped, {args.dtype}, hidden {args.hidden}, ffn {args.ffn}, vocab {args.vocab}, {args.nsamples} × "
          f"{args.seqlen} calibration, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '2')}\n")
    print("| layers | method | model GB | peak RssAnon GB | peak RSS GB | wall s |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['layers']} | {row['method']} | {row['model_gb']:.2f} | {row['rss_anon_gb']:.2f} "
              f"| {row['rss_gb']:.2f} | {row['wall_s']:.0f} |")
    for method in args.methods.split(","):
        mine = [r for r in rows if r["method"] == method]
        if len(mine) > 1:
            print(f"\n{method}: peak RssAnon of {mine[-1]['layers']} layers / {mine[0]['layers']} layers = "
                  f"{mine[-1]['rss_anon_gb'] / mine[0]['rss_anon_gb']:.2f}")


if __name__ == "__main__":
    main()
