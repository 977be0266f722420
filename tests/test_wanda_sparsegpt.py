"""Wanda and SparseGPT against references written straight from the papers' code.

Statistics are computed here with plain numpy from the calibration activations X[tokens, K],
exactly as the calibration engine's contract defines them.
"""

import math

import numpy as np
import pytest
import torch

from onnxprune.passes import Layer, available, get_pass
from onnxprune.passes.sparsegpt import SparseGPT
from onnxprune.patterns import Pattern, nm_valid

PATTERNS = {"0.5": Pattern(0.5), "2:4": Pattern(0.5, 2, 4), "4:8": Pattern(0.5, 4, 8)}
SEQ = 64  # tokens per calibration sample


def activations(tokens: int, k: int, seed: int, dead: tuple[int, ...] = ()) -> np.ndarray:
    """Heavy-tailed activations with a few large 'outlier' channels, as in LLM hidden states."""
    rng = np.random.default_rng(seed)
    x = rng.standard_t(df=4, size=(tokens, k))
    x[:, rng.choice(k, size=max(1, k // 16), replace=False)] *= 8.0
    x += rng.normal(size=k) * 0.3  # channel means, so X is not centred
    x[:, list(dead)] = 0.0
    return x.astype(np.float32)


def weights(out: int, k: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed + 1000).normal(size=(out, k)).astype(np.float32)


def stats_of(x: np.ndarray) -> dict:
    x64 = x.astype(np.float64)
    return {"sq_sum": (x64**2).sum(0), "gram": x64.T @ x64, "sum": x64.sum(0),
            "tokens": x.shape[0], "samples": x.shape[0] // SEQ}


def run_pass(name: str, w: np.ndarray, x: np.ndarray, pattern: Pattern, **kwargs) -> np.ndarray:
    method = SparseGPT(**kwargs) if name == "sparsegpt" else get_pass(name)
    layer = Layer(name="t", weight=w.copy(), bias=None, rng=np.random.default_rng(0), stats=stats_of(x))
    return method.prune(layer, pattern).weight


# ---------------------------------------------------------------- references

def wanda_reference_mask(w: np.ndarray, x: np.ndarray, pattern: Pattern) -> np.ndarray:
    """Wanda's mask from the definition: argsort of |W|·‖X_j‖ per row (or per group of M)."""
    score = np.abs(w.astype(np.float64)) * np.linalg.norm(x.astype(np.float64), axis=0)
    mask = np.zeros(w.shape, dtype=bool)
    rows = np.arange(w.shape[0])[:, None]
    if pattern.is_nm:
        for g in range(0, w.shape[1], pattern.m):
            order = np.argsort(score[:, g:g + pattern.m], axis=1, kind="stable")
            mask[rows, g + order[:, :pattern.n]] = True
    else:
        order = np.argsort(score, axis=1, kind="stable")
        mask[rows, order[:, :int(w.shape[1] * pattern.sparsity)]] = True
    return mask


class ReferenceSparseGPT:
    """The published algorithm in the structure of IST-DASLab/sparsegpt (H built incrementally)."""

    def __init__(self, weight: np.ndarray):
        self.W = torch.tensor(weight, dtype=torch.float32)
        self.H = torch.zeros(weight.shape[1], weight.shape[1])
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        # inp: [batch, seq, K]; the running H is the mean over samples of 2·XᵀX.
        count = inp.shape[0]
        cols = inp.reshape(-1, inp.shape[-1]).t().float()
        self.H *= self.nsamples / (self.nsamples + count)
        self.nsamples += count
        cols = math.sqrt(2 / self.nsamples) * cols
        self.H += cols @ cols.t()

    def fasterprune(self, sparsity, prunen=0, prunem=0, blocksize=128, percdamp=0.01) -> np.ndarray:
        W, H = self.W.clone(), self.H.clone()
        ncols = W.shape[1]
        zero_in = torch.diag(H) == 0
        H[zero_in, zero_in] = 1
        W[:, zero_in] = 0
        idx = torch.arange(ncols)
        H[idx, idx] += percdamp * torch.mean(torch.diag(H))
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

        for b0 in range(0, ncols, blocksize):
            b1 = min(b0 + blocksize, ncols)
            blk = W[:, b0:b1].clone()
            out = torch.zeros_like(blk)
            errs = torch.zeros_like(blk)
            hb = Hinv[b0:b1, b0:b1]
            hdiag = torch.diag(hb)
            if prunen == 0:
                sal = blk**2 / hdiag[None, :] ** 2
                cut = torch.sort(sal.flatten())[0][int(sal.numel() * sparsity)]
                drop = sal <= cut
            else:
                drop = torch.zeros(blk.shape, dtype=torch.bool)
            for c in range(b1 - b0):
                if prunen != 0 and c % prunem == 0:
                    sal = blk[:, c:c + prunem] ** 2 / hdiag[c:c + prunem][None, :] ** 2
                    drop.scatter_(1, c + torch.topk(sal, prunen, dim=1, largest=False)[1], True)
                col = blk[:, c]
                kept = col.clone()
                kept[drop[:, c]] = 0
                out[:, c] = kept
                e = (col - kept) / hb[c, c]
                blk[:, c:] -= e.unsqueeze(1).matmul(hb[c, c:].unsqueeze(0))
                errs[:, c] = e
            W[:, b0:b1] = out
            W[:, b1:] -= errs.matmul(Hinv[b0:b1, b1:])
        return W.numpy()


def sparsegpt_reference(w, x, pattern, blocksize=128, batch=2):
    ref = ReferenceSparseGPT(w)
    seqs = torch.from_numpy(x).reshape(-1, SEQ, x.shape[1])
    for b in range(0, seqs.shape[0], batch):
        ref.add_batch(seqs[b:b + batch])
    return ref.fasterprune(pattern.sparsity, pattern.n, pattern.m, blocksize=blocksize)


# ---------------------------------------------------------------- tests

def test_registered():
    passes = available()
    assert passes["wanda"].needs == frozenset({"sq_sum"})
    assert passes["sparsegpt"].needs == frozenset({"gram", "samples"})


@pytest.mark.parametrize("label", list(PATTERNS))
def test_wanda_mask_matches_definition(label):
    x, w = activations(512, 64, seed=1), weights(48, 64, seed=1)
    got = run_pass("wanda", w, x, PATTERNS[label])
    expected = wanda_reference_mask(w, x, PATTERNS[label])
    np.testing.assert_array_equal(got == 0, expected)
    np.testing.assert_array_equal(got[~expected], w[~expected])  # kept weights untouched


CASES = [(64, 128, ()), (200, 128, ()), (200, 128, (7,)), (96, 32, (0, 50))]


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("label", list(PATTERNS))
@pytest.mark.parametrize("k,blocksize,dead", CASES)
def test_sparsegpt_matches_reference(label, k, blocksize, dead, backend):
    x, w = activations(512, k, seed=k + len(dead), dead=dead), weights(48, k, seed=k)
    pattern = PATTERNS[label]
    got = run_pass("sparsegpt", w, x, pattern, blocksize=blocksize, backend=backend)
    expected = sparsegpt_reference(w, x, pattern, blocksize=blocksize)
    np.testing.assert_array_equal(got == 0, expected == 0)
    assert np.linalg.norm(got - expected) / np.linalg.norm(w) < 1e-4
    if dead:
        assert not got[:, list(dead)].any()


@pytest.mark.parametrize("label", list(PATTERNS))
def test_exact_sparsity_and_nm_validity(label):
    k, blocksize = 200, 128
    x, w = activations(512, k, seed=3), weights(48, k, seed=3)
    pattern = PATTERNS[label]
    wanda = run_pass("wanda", w, x, pattern)
    sgpt = run_pass("sparsegpt", w, x, pattern, blocksize=blocksize)
    if pattern.is_nm:
        assert nm_valid(wanda, pattern.n, pattern.m) and nm_valid(sgpt, pattern.n, pattern.m)
        assert (wanda == 0).sum() == (sgpt == 0).sum() == w.size * pattern.n // pattern.m
    else:
        assert ((wanda == 0).sum(axis=1) == int(k * pattern.sparsity)).all()
        # The reference's block threshold is the score at index ⌊numel·s⌋ pruned with `<=`:
        # one weight more than ⌊numel·s⌋ per block (no ties in continuous random data).
        blocks = [(b, min(b + blocksize, k)) for b in range(0, k, blocksize)]
        for b0, b1 in blocks:
            assert (sgpt[:, b0:b1] == 0).sum() == int(w.shape[0] * (b1 - b0) * pattern.sparsity) + 1


def test_sparsegpt_nm_block_not_multiple_of_m():
    x, w = activations(512, 64, seed=4), weights(48, 64, seed=4)
    got = run_pass("sparsegpt", w, x, Pattern(0.5, 2, 4), blocksize=6)  # rounded down to 4
    assert nm_valid(got, 2, 4) and (got == 0).sum() == w.size // 2


@pytest.mark.parametrize("label", list(PATTERNS))
def test_sparsegpt_reconstructs_better(label):
    x, w = activations(512, 64, seed=5), weights(48, 64, seed=5)
    x64 = x.astype(np.float64)

    def err(pruned):
        return np.linalg.norm(x64 @ (w.astype(np.float64) - pruned).T)

    pattern = PATTERNS[label]
    e_sgpt, e_wanda, e_mag = (err(run_pass(n, w, x, pattern)) for n in ("sparsegpt", "wanda", "magnitude"))
    assert e_sgpt < e_wanda and e_sgpt < e_mag, (e_sgpt, e_wanda, e_mag)


@pytest.mark.parametrize("name", ["wanda", "sparsegpt"])
def test_sparsity_zero_is_identity(name):
    x, w = activations(512, 64, seed=6, dead=(3,)), weights(48, 64, seed=6)
    np.testing.assert_array_equal(run_pass(name, w, x, Pattern(0.0)), w)
