"""The reference's SparseGPT at another rounding: how far its perplexity moves from float32 alone.

    python benchmarks/reference_sparsegpt_float64.py --reference PATH/TO/locuslab-wanda --arch llama
        [--work /tmp/ref-speed-ARCH] [--nsamples 32 --seqlen 512]

Runs `reference_speed.py`'s reference SparseGPT (its prune_sparsegpt, unchanged) on the model that
script built under --work, with the Hessian accumulation (`SparseGPT.add_batch`) and the solve
(`fasterprune`) in float64 instead of float32: a wrapper makes the Hessian float64 and, during those
two calls only, turns `Tensor.float()` into `Tensor.double()`. Prints the pruned model's perplexity
on the same held-out windows, to set beside the float32 run's. A gap between two implementations
that is no larger than this is rounding, not a different algorithm.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def in_float64(method):
    import torch

    def wrapped(self, *args, **kwargs):
        self.H = self.H.double()
        saved = torch.Tensor.float
        torch.Tensor.float = torch.Tensor.double
        try:
            return method(self, *args, **kwargs)
        finally:
            torch.Tensor.float = saved

    return wrapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, required=True)
    parser.add_argument("--arch", choices=["opt", "llama"], default="llama")
    parser.add_argument("--work", type=Path, help="reference_speed.py's build folder (default /tmp/ref-speed-ARCH)")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    args = parser.parse_args()
    work = args.work or Path(f"/tmp/ref-speed-{args.arch}")
    if not (work / "hf").is_dir():
        raise SystemExit(f"{work} has no model: run benchmarks/reference_speed.py --arch {args.arch} first")
    sys.path[:0] = [str(HERE), str(args.reference.resolve())]
    import reference_speed
    from lib.sparsegpt import SparseGPT

    SparseGPT.add_batch, SparseGPT.fasterprune = in_float64(SparseGPT.add_batch), in_float64(SparseGPT.fasterprune)
    output = work / "out" / "reference-sparsegpt-float64"
    reference_speed.run_reference(argparse.Namespace(reference=args.reference, arch=args.arch, work=work,
                                                     nsamples=args.nsamples, seqlen=args.seqlen, method="sparsegpt",
                                                     output=output))
    ppl = reference_speed.perplexity_torch(output, reference_speed.eval_ids(work, args.seqlen))
    print(f"reference SparseGPT with a float64 Hessian and solve: perplexity {ppl:.2f}", flush=True)


if __name__ == "__main__":
    main()
