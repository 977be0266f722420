"""Where the solver passes (SparseGPT, MAMA) compute: numpy, which the core install has, or torch
when it is installed (on a device of its own, later). Each algorithm is written once against a
backend: arithmetic, slicing, boolean and integer indexing, `@` and `.mT` on its arrays are spelled alike by
both libraries, and the few operations they spell differently are the methods below.

Every array a backend makes is float32 (or bool/int64 for masks and indices) and its own copy, so
an algorithm may update it in place; the one exception is `low_precision`, for operands whose
rounding only slows a solver down (a preconditioner), kept in bfloat16 where its matmuls are
faster. The solvers carry a leading group axis (a grouped convolution's independent sub-problems,
1 for any other layer), so the methods below work on batches.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np

from onnxprune.extras import is_available, require


class NumpyBackend:
    name = "numpy"
    on_cpu = True

    def asarray(self, values: np.ndarray) -> np.ndarray:
        return np.array(values, dtype=np.float32)

    def index(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values, dtype=np.int64)

    def to_numpy(self, x: np.ndarray) -> np.ndarray:
        return x

    def copy(self, x: np.ndarray) -> np.ndarray:
        return x.copy()

    def zeros_like(self, x: np.ndarray) -> np.ndarray:
        return np.zeros_like(x)

    def false_like(self, x: np.ndarray) -> np.ndarray:
        return np.zeros(x.shape, dtype=bool)

    def diag(self, x: np.ndarray) -> np.ndarray:
        """The diagonals [g, k] of a batch of matrices [g, k, k]."""
        return np.diagonal(x, axis1=-2, axis2=-1).copy()  # numpy's is a read-only view

    def where(self, condition: np.ndarray, a, b) -> np.ndarray:
        return np.where(condition, a, b)

    def isfinite(self, x: np.ndarray) -> np.ndarray:
        return np.isfinite(x)

    def ratio(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """a / b where b > 0, else 0 (without dividing by zero)."""
        return np.divide(a, b, out=np.zeros_like(a), where=b > 0)

    def kth_smallest(self, x: np.ndarray, k: int) -> np.ndarray:
        """Per entry of the first axis, the value at index k of its entries sorted ascending: [g]."""
        return np.partition(x.reshape(len(x), -1), k, axis=1)[:, k]

    def lowest_of_columns(self, x: np.ndarray, n: int) -> np.ndarray:
        """Boolean mask of x's shape [..., m, c]: True at the n lowest entries of every column."""
        mask = np.zeros(x.shape, dtype=bool)
        np.put_along_axis(mask, np.argpartition(x, n - 1, axis=-2)[..., :n, :], True, axis=-2)
        return mask

    def inverse_cholesky_upper(self, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Upper U with UᵀU = a⁻¹ for each matrix of a batch [g, k, k], and a bool array [g] of the
        ones that are not positive definite in float32 (their U is meaningless).
        numpy has neither a Cholesky inverse nor a triangular one: one LU inverse of `a` took the
        time of factoring, inverting the factor as a general matrix and multiplying."""
        try:
            return np.linalg.cholesky(np.linalg.inv(a), upper=True), np.zeros(len(a), dtype=bool)
        except np.linalg.LinAlgError:
            if len(a) == 1:
                return np.zeros_like(a), np.ones(1, dtype=bool)
        # numpy does not say which matrix failed: one at a time (only when one did)
        parts = [self.inverse_cholesky_upper(matrix[None]) for matrix in a]
        return np.concatenate([u for u, _ in parts]), np.concatenate([failed for _, failed in parts])

    def spd_inverse(self, a: np.ndarray) -> np.ndarray | None:
        """The inverses of a batch of symmetric positive definite matrices [g, k, k], or None when one
        is not positive definite in float32."""
        try:
            np.linalg.cholesky(a)  # the definiteness check numpy's LU inverse does not make
        except np.linalg.LinAlgError:
            return None
        return np.linalg.inv(a)

    def low_precision(self, x: np.ndarray) -> np.ndarray:
        return x  # numpy has no fast narrower float: float32 it stays

    def low_precision_matmul(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """a @ b for a `low_precision` b, in float32."""
        return a @ b

    def spd_solve(self, blocks: np.ndarray, rhs: np.ndarray) -> np.ndarray | None:
        """x with blocks @ x = rhs for a batch of symmetric positive definite blocks [b, k, k] and
        right-hand sides [b, k], or None when a block is not positive definite in float32."""
        try:
            factor = np.linalg.cholesky(blocks)
        except np.linalg.LinAlgError:
            return None
        # L y = rhs, then Lᵀ x = y, one unknown at a time for the whole batch: numpy has no
        # triangular solve, and np.linalg.solve's LU on the blocks made a 768x768 MAMA 1.5x slower
        # (5.1-6.6 s instead of 7.9-9.0 s on one BLAS thread).
        y = np.empty_like(rhs)
        for j in range(rhs.shape[1]):
            y[:, j] = (rhs[:, j] - np.einsum("bi,bi->b", factor[:, j, :j], y[:, :j])) / factor[:, j, j]
        x = np.empty_like(rhs)
        for j in reversed(range(rhs.shape[1])):
            x[:, j] = (y[:, j] - np.einsum("bi,bi->b", factor[:, j + 1:, j], x[:, j + 1:])) / factor[:, j, j]
        return x


class TorchBackend:
    name = "torch"

    def __init__(self, device: str = "cpu", purpose: str = "the torch backend") -> None:
        self.torch = require("torch", purpose)
        self.device = self.torch.device(device)
        fast = self.torch.cuda.is_bf16_supported() if self.device.type == "cuda" else (
            self.device.type == "cpu" and _cpu_has_bfloat16_dot_products())
        self.low_dtype = self.torch.bfloat16 if fast else self.torch.float32

    @property
    def on_cpu(self) -> bool:
        return self.device.type == "cpu"

    def asarray(self, values: np.ndarray):
        return self.torch.tensor(np.asarray(values, dtype=np.float32), device=self.device)

    def index(self, values: np.ndarray):
        return self.torch.tensor(np.asarray(values, dtype=np.int64), device=self.device)

    def to_numpy(self, x) -> np.ndarray:
        return x.cpu().numpy()

    def copy(self, x):
        return x.clone()

    def zeros_like(self, x):
        return self.torch.zeros_like(x)

    def false_like(self, x):
        return self.torch.zeros_like(x, dtype=self.torch.bool)

    def diag(self, x):
        return self.torch.diagonal(x, dim1=-2, dim2=-1)

    def where(self, condition, a, b):
        return self.torch.where(condition, a, b)

    def isfinite(self, x):
        return self.torch.isfinite(x)

    def ratio(self, a, b):
        return self.torch.where(b > 0, a / b, self.torch.zeros_like(a))

    def kth_smallest(self, x, k: int):
        return self.torch.kthvalue(x.flatten(1), k + 1, dim=1).values

    def lowest_of_columns(self, x, n: int):
        lowest = self.torch.topk(x, n, dim=-2, largest=False).indices
        return self.false_like(x).scatter_(-2, lowest, True)

    def inverse_cholesky_upper(self, a):
        torch = self.torch
        factor, info = torch.linalg.cholesky_ex(a)
        failed = info != 0
        # A failed factor is partial: invert the identity in its place (its U is discarded anyway).
        factor = torch.where(failed[:, None, None], torch.eye(a.shape[-1], device=a.device), factor)
        upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(factor), upper=True)
        return upper, (failed | (info != 0)).cpu().numpy()

    def spd_inverse(self, a):
        factor, info = self.torch.linalg.cholesky_ex(a)
        if bool((info != 0).any()):
            return None
        # cholesky_inverse returns column-major strides, on which a bfloat16 matmul runs 1.6x slower
        return self.torch.cholesky_inverse(factor).contiguous()

    def low_precision(self, x):
        return x.to(self.low_dtype)

    def low_precision_matmul(self, a, b):
        return (a.to(b.dtype) @ b).float()

    def spd_solve(self, blocks, rhs):
        factor, info = self.torch.linalg.cholesky_ex(blocks)
        if bool((info != 0).any()):
            return None
        return self.torch.cholesky_solve(rhs[..., None], factor)[..., 0]


@functools.cache
def _cpu_has_bfloat16_dot_products() -> bool:
    """AVX512-BF16 or AMX: bfloat16 matmuls then run about twice as fast as float32 ones (torch on an
    AVX512-BF16 EPYC, one thread: [768, 3072] @ [3072, 3072] in 73 ms instead of 157-171 ms); without
    them torch emulates bfloat16 and gains nothing. Read from Linux's CPU flags (torch has no public
    query); elsewhere float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) is not None


Backend = NumpyBackend | TorchBackend
BACKENDS = {"numpy": NumpyBackend, "torch": TorchBackend}
NUMPY = NumpyBackend()


def backend(name: str | None = None, purpose: str = "the torch backend", device: str = "cpu") -> Backend:
    """The backend called `name`; by default torch when it is installed, else numpy. Any device
    but the CPU is torch's."""
    if name is None:
        name = "torch" if device != "cpu" or is_available("torch") else "numpy"
    if name == "torch":
        return TorchBackend(device, purpose=purpose)
    if name not in BACKENDS:
        raise ValueError(f"unknown array backend {name!r}; available: {', '.join(BACKENDS)}")
    if device != "cpu":
        raise ValueError(f"the {name} backend computes on the CPU only, not on {device}")
    return NUMPY
