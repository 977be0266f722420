"""Wanda, SparseGPT and magnitude pruning in torch on a Hugging Face OPT model, structured like
the reference repositories (locuslab/wanda `lib/prune.py`, `lib/layerwrapper.py`, `lib/eval.py`;
IST-DASLab/sparsegpt `opt.py`, `sparsegpt.py`), written independently of onnxprune.

The sequential driver: run the calibration windows through the model until the first decoder
layer, catch that layer's inputs (and the keyword arguments the decoder passes it: the causal
mask, position ids), then for every decoder layer

  1. hook every nn.Linear of the layer and run the layer on all windows (statistics),
  2. prune each linear from its statistics,
  3. run the pruned layer again on all windows: its outputs are the next layer's inputs.

Everything stays in float32 on the CPU; the model must be loaded with attn_implementation="eager"
and run with use_cache=False (the references' setting).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn


# ----------------------------------------------------------------------- layer discovery


def find_linears(module: nn.Module, prefix: str = "") -> dict[str, nn.Linear]:
    """Every nn.Linear below `module`, by dotted name (the references' `find_layers`)."""
    found = {}
    for name, child in module.named_modules(prefix=prefix):
        if isinstance(child, nn.Linear):
            found[name] = child
    return found


def decoder_layers(model) -> nn.ModuleList:
    inner = model.model
    return inner.decoder.layers if hasattr(inner, "decoder") else inner.layers


# ------------------------------------------------------------------- Wanda's statistics


class ScalerRow:
    """Running mean over samples of ‖X_j‖² per input column (Wanda's `WrappedGPT.scaler_row`)."""

    def __init__(self, linear: nn.Linear):
        self.linear = linear
        self.scaler_row = torch.zeros(linear.in_features, dtype=torch.float32)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor | None = None) -> None:
        if inp.dim() == 2:  # OPT flattens the MLP input to [tokens, hidden]: one sample
            inp = inp.unsqueeze(0)
        batch = inp.shape[0]
        cols = inp.reshape(-1, inp.shape[-1]).t().float()  # [K, tokens]
        self.scaler_row *= self.nsamples / (self.nsamples + batch)
        self.nsamples += batch
        self.scaler_row += cols.norm(p=2, dim=1) ** 2 / self.nsamples


def wanda_mask(metric: torch.Tensor, sparsity: float, prune_n: int = 0, prune_m: int = 0) -> torch.Tensor:
    """True = prune. Unstructured: ⌊K·s⌋ lowest per output row (stable sort); N:M: topk per group."""
    mask = torch.zeros_like(metric, dtype=torch.bool)
    if prune_n:
        for col in range(0, metric.shape[1], prune_m):
            group = metric[:, col:col + prune_m].float()
            mask.scatter_(1, col + torch.topk(group, prune_n, dim=1, largest=False)[1], True)
        return mask
    order = torch.sort(metric, dim=-1, stable=True)[1]
    mask.scatter_(1, order[:, :int(metric.shape[1] * sparsity)], True)
    return mask


def wanda_prune_linear(linear: nn.Linear, stats: ScalerRow, sparsity: float, prune_n: int, prune_m: int) -> None:
    metric = linear.weight.data.abs() * torch.sqrt(stats.scaler_row.reshape(1, -1))
    linear.weight.data[wanda_mask(metric, sparsity, prune_n, prune_m)] = 0


# ---------------------------------------------------------------------------- SparseGPT


class SparseGPT:
    """Hessian accumulation and the blocked OBS pruning of one linear layer."""

    def __init__(self, linear: nn.Linear):
        self.linear = linear
        self.rows, self.columns = linear.weight.shape
        self.H = torch.zeros(self.columns, self.columns, dtype=torch.float32)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor | None = None) -> None:
        if inp.dim() == 2:
            inp = inp.unsqueeze(0)
        batch = inp.shape[0]
        cols = inp.reshape(-1, inp.shape[-1]).t().float()  # [K, tokens]
        # H = 2/n Σ x xᵀ kept as a running mean: rescale the old sum, add the new scaled batch.
        self.H *= self.nsamples / (self.nsamples + batch)
        self.nsamples += batch
        cols = math.sqrt(2 / self.nsamples) * cols
        self.H += cols @ cols.t()

    @torch.no_grad()
    def fasterprune(self, sparsity: float, prune_n: int = 0, prune_m: int = 0, blocksize: int = 128,
                    percdamp: float = 0.01) -> None:
        W = self.linear.weight.data.clone().float()
        H = self.H
        self.H = None
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0

        idx = torch.arange(self.columns)
        H[idx, idx] += percdamp * torch.mean(torch.diag(H))
        # Upper Cholesky factor of H⁻¹: its rows carry the OBS updates column after column.
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

        for b1 in range(0, self.columns, blocksize):
            b2 = min(b1 + blocksize, self.columns)
            count = b2 - b1
            W1 = W[:, b1:b2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[b1:b2, b1:b2]
            hdiag = torch.diag(Hinv1).reshape(1, -1)

            if prune_n:
                mask1 = torch.zeros_like(W1, dtype=torch.bool)
            else:
                saliency = W1 ** 2 / hdiag ** 2
                thresh = torch.sort(saliency.flatten())[0][int(saliency.numel() * sparsity)]
                mask1 = saliency <= thresh

            for i in range(count):
                w = W1[:, i]
                d = Hinv1[i, i]
                if prune_n and i % prune_m == 0:
                    saliency = W1[:, i:i + prune_m] ** 2 / hdiag[:, i:i + prune_m] ** 2
                    mask1.scatter_(1, i + torch.topk(saliency, prune_n, dim=1, largest=False)[1], True)
                q = w.clone()
                q[mask1[:, i]] = 0
                Q1[:, i] = q
                err = (w - q) / d
                W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
                Err1[:, i] = err

            W[:, b1:b2] = Q1
            W[:, b2:] -= Err1 @ Hinv[b1:b2, b2:]

        self.linear.weight.data = W.to(self.linear.weight.dtype)


# ---------------------------------------------------------------------------- magnitude


@torch.no_grad()
def prune_magnitude(model, sparsity: float, prune_n: int = 0, prune_m: int = 0) -> None:
    """|W| with one threshold per matrix (`<= thresh` of the sorted scores), or N:M per group."""
    for layer in decoder_layers(model):
        for linear in find_linears(layer).values():
            W = linear.weight.data
            metric = W.abs()
            if prune_n:
                mask = wanda_mask(metric, sparsity, prune_n, prune_m)
            else:
                thresh = torch.sort(metric.flatten())[0][int(W.numel() * sparsity)]
                mask = metric <= thresh
            W[mask] = 0


# ------------------------------------------------------------------ the sequential driver


class _Caught(Exception):
    pass


@dataclass
class Timings:
    capture: float = 0.0    # windows through embeddings, caught at layer 0
    calibrate: float = 0.0  # hooked layer passes + re-runs of the pruned layers
    prune: float = 0.0      # the per-linear pruning itself
    seconds: dict = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.capture + self.calibrate + self.prune

    def as_dict(self) -> dict:
        return {"capture": round(self.capture, 6), "calibrate": round(self.calibrate, 6),
                "prune": round(self.prune, 6), "total": round(self.total, 6)}


@torch.no_grad()
def capture_layer0_inputs(model, windows: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """inps[nsamples, seqlen, hidden] entering the first decoder layer, and the kwargs it gets."""
    layers = decoder_layers(model)
    inps = torch.zeros(windows.shape[0], windows.shape[1], model.config.hidden_size, dtype=torch.float32)
    kwargs: dict = {}
    position = {"i": 0}

    def catch(module, args, kw):
        hidden = args[0] if args else kw["hidden_states"]
        inps[position["i"]] = hidden[0]
        position["i"] += 1
        kwargs.update({k: v for k, v in kw.items()
                       if k not in ("hidden_states", "past_key_value", "past_key_values", "use_cache")})
        raise _Caught

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for window in windows:
            try:
                model(window[None], use_cache=False)
            except _Caught:
                pass
    finally:
        handle.remove()
    return inps, kwargs


def _layer_out(result):
    return result[0] if isinstance(result, tuple) else result


@torch.no_grad()
def sequential_prune(model, windows: torch.Tensor, method: str, sparsity: float, prune_n: int = 0,
                     prune_m: int = 0, blocksize: int = 128, percdamp: float = 0.01) -> Timings:
    """Prune `model` in place with `method` ('wanda' or 'sparsegpt'), layer after layer."""
    timings = Timings()
    start = time.perf_counter()
    inps, kwargs = capture_layer0_inputs(model, windows)
    outs = torch.zeros_like(inps)
    timings.capture = time.perf_counter() - start
    nsamples = inps.shape[0]

    for layer in decoder_layers(model):
        start = time.perf_counter()
        subset = find_linears(layer)
        wrapped = {name: (ScalerRow(lin) if method == "wanda" else SparseGPT(lin)) for name, lin in subset.items()}

        def add_batch(name):
            def hook(_, inp, out):
                wrapped[name].add_batch(inp[0].data, out.data)
            return hook

        handles = [subset[name].register_forward_hook(add_batch(name)) for name in wrapped]
        for j in range(nsamples):
            outs[j] = _layer_out(layer(inps[j].unsqueeze(0), **kwargs))[0]
        for handle in handles:
            handle.remove()
        timings.calibrate += time.perf_counter() - start

        start = time.perf_counter()
        for name, lin in subset.items():
            if method == "wanda":
                wanda_prune_linear(lin, wrapped[name], sparsity, prune_n, prune_m)
            elif method == "sparsegpt":
                wrapped[name].fasterprune(sparsity, prune_n, prune_m, blocksize, percdamp)
            else:
                raise ValueError(f"unknown method {method!r}")
        del wrapped
        timings.prune += time.perf_counter() - start

        start = time.perf_counter()
        for j in range(nsamples):
            outs[j] = _layer_out(layer(inps[j].unsqueeze(0), **kwargs))[0]
        inps, outs = outs, inps
        timings.calibrate += time.perf_counter() - start
    return timings


def prune_model(model, windows: torch.Tensor, method: str, sparsity: float, prune_n: int = 0,
                prune_m: int = 0) -> Timings:
    if method == "magnitude":
        timings = Timings()
        start = time.perf_counter()
        prune_magnitude(model, sparsity, prune_n, prune_m)
        timings.prune = time.perf_counter() - start
        return timings
    return sequential_prune(model, windows, method, sparsity, prune_n, prune_m)


# ---------------------------------------------------------------------------- perplexity


@torch.no_grad()
def eval_ppl(model, ids: torch.Tensor, seqlen: int, bs: int = 1) -> float:
    """The references' loop: non-overlapping windows, shifted logits/labels, CrossEntropyLoss,
    nll = loss·seqlen·batch summed, ppl = exp(Σ nll / (nsamples·seqlen))."""
    ids = ids.reshape(1, -1)
    nsamples = ids.numel() // seqlen
    loss_fct = nn.CrossEntropyLoss()
    nlls = []
    for i in range(0, nsamples, bs):
        j = min(i + bs, nsamples)
        inputs = ids[:, i * seqlen:j * seqlen].reshape(j - i, seqlen)
        logits = model(inputs, use_cache=False).logits
        shift_logits = logits[:, :-1, :].contiguous()
        shift_labels = inputs[:, 1:]
        loss = loss_fct(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1))
        nlls.append(loss.float() * seqlen * (j - i))
    return torch.exp(torch.stack(nlls).sum() / (nsamples * seqlen)).item()
