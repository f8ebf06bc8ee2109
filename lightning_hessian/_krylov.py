"""Storage of Lanczos bases: how many parameter-sized vectors, where they live, and in what precision.

A Lanczos basis of ``rows`` vectors of ``n`` entries is the memory of every Krylov method here
(extremal eigenpairs, the spectral density). :class:`KrylovBasis` keeps it on the model's device
in the model's dtype (the fast default), in host memory, or in a 16-bit format; every product
with it (Gram-Schmidt coefficients, Ritz vectors) is then accumulated in float64, a few rows at a
time, so its working memory stays a few vectors. :func:`auto_max_basis` turns a memory bound into
a basis size.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

DEFAULT_BASIS_MEMORY = 2 * 1024**3  # bytes: the default bound on a Lanczos basis (2 GiB)
MIN_AUTO_BASIS = 30  # below this, thick restarts cost over 5 % more HVPs on the planted benchmark spectrum
MAX_AUTO_BASIS = 100
_CHUNK_ROWS = 4  # rows converted to float64 at a time when storage differs from the work vectors
_CHUNK_COLUMNS = 1 << 18  # entries per column slab of an in-place restart
_SCALED = (torch.float16, torch.bfloat16)


def auto_max_basis(n: int, itemsize: int, basis_memory: float = DEFAULT_BASIS_MEMORY, minimum: int = 0) -> int:
    """Basis size for a memory bound: ``(max_basis + 1) * n * itemsize <= basis_memory``, within [30, 100].

    Never below ``max(MIN_AUTO_BASIS, minimum)`` (fewer vectors would make thick restarts cost
    noticeably more HVPs), so for very large models the memory is ``(31 or minimum + 1) * n * itemsize``
    even when that exceeds ``basis_memory``; :func:`basis_bytes` states it exactly.
    """
    if not (isinstance(n, int) and n > 0 and isinstance(itemsize, int) and itemsize > 0):
        raise ValueError(f"n and itemsize must be positive integers, got {n!r}, {itemsize!r}")
    if not (math.isfinite(basis_memory) and basis_memory > 0):
        raise ValueError(f"basis_memory must be a positive number of bytes, got {basis_memory!r}")
    fits = int(basis_memory // (n * itemsize)) - 1
    return max(MIN_AUTO_BASIS, minimum, min(MAX_AUTO_BASIS, fits))


def basis_bytes(max_basis: int, n: int, itemsize: int) -> int:
    """Bytes of a Lanczos basis of ``max_basis`` vectors (one more row holds the next Lanczos vector)."""
    return (min(max_basis, n) + 1) * n * itemsize


class KrylovBasis:
    """``rows`` vectors of length ``n``; work vectors are ``dtype`` on ``device``, storage may differ.

    With storage equal to the work dtype and device, products are plain matrix products (the fast
    path). Otherwise rows are converted to float64 on the work device ``_CHUNK_ROWS`` at a time,
    and 16-bit rows are stored scaled by ``sqrt(n)`` so that unit vectors stay in float16's normal
    range. Storage in a 16-bit format limits the accuracy of Ritz values to about its unit roundoff
    times ``||H||`` (:attr:`eps`).
    """

    def __init__(
        self,
        rows: int,
        n: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
        storage_dtype: torch.dtype | None = None,
        storage_device: torch.device | str | None = None,
    ) -> None:
        self.n = n
        self.dtype, self.device = dtype, device
        self.storage_dtype = dtype if storage_dtype is None else storage_dtype
        self.storage_device = device if storage_device is None else torch.device(storage_device)
        if not self.storage_dtype.is_floating_point:
            raise ValueError(f"basis_dtype must be a floating-point dtype, got {self.storage_dtype}")
        self.native = self.storage_dtype == dtype and self.storage_device == device
        self._scale = math.sqrt(n) if self.storage_dtype in _SCALED else 1.0
        self._rows = torch.empty(rows, n, dtype=self.storage_dtype, device=self.storage_device)

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored rows."""
        return self._rows.numel() * self._rows.element_size()

    @property
    def eps(self) -> float:
        """Relative precision of a product with the basis: the coarser of work and storage precision."""
        return max(float(torch.finfo(self.dtype).eps), float(torch.finfo(self.storage_dtype).eps))

    def set(self, i: int, v: Tensor) -> None:
        """Store ``v`` as row ``i``."""
        if self.native:
            self._rows[i] = v
        else:
            self._rows[i] = (v.to(torch.float64) * self._scale).to(device=self.storage_device, dtype=self.storage_dtype)

    def get(self, i: int) -> Tensor:
        """Row ``i`` as a work vector."""
        if self.native:
            return self._rows[i]
        return (self._rows[i].to(device=self.device, dtype=torch.float64) / self._scale).to(self.dtype)

    def _chunks(self, m: int) -> list[tuple[int, Tensor]]:
        out = []
        for lo in range(0, m, _CHUNK_ROWS):
            hi = min(m, lo + _CHUNK_ROWS)
            out.append((lo, self._rows[lo:hi].to(device=self.device, dtype=torch.float64) / self._scale))
        return out

    def dot(self, m: int, w: Tensor) -> Tensor:
        """Coefficients ``rows[:m] @ w`` (in float64 unless native)."""
        if self.native:
            return self._rows[:m] @ w
        w64 = w.to(torch.float64)
        return torch.cat([chunk @ w64 for _, chunk in self._chunks(m)])

    def subtract(self, m: int, coeffs: Tensor, w: Tensor) -> Tensor:
        """``w - coeffs @ rows[:m]``."""
        if self.native:
            return w - coeffs @ self._rows[:m]
        acc = w.to(torch.float64)
        c64 = coeffs.to(device=self.device, dtype=torch.float64)
        for lo, chunk in self._chunks(m):
            acc = acc - c64[lo : lo + chunk.shape[0]] @ chunk
        return acc.to(self.dtype)

    def combine(self, coeffs: Tensor, m: int) -> Tensor:
        """Work vectors ``coeffs @ rows[:m]`` for a ``(r, m)`` coefficient matrix."""
        if self.native:
            return coeffs.to(device=self.device, dtype=self.dtype) @ self._rows[:m]
        c64 = coeffs.to(device=self.device, dtype=torch.float64)
        acc = torch.zeros(c64.shape[0], self.n, dtype=torch.float64, device=self.device)
        for lo, chunk in self._chunks(m):
            acc += c64[:, lo : lo + chunk.shape[0]] @ chunk
        return acc.to(self.dtype)

    def shrink(self, rows: int) -> None:
        """Keep only the first ``rows`` rows, in a new allocation of that size when that frees at least half."""
        if 2 * rows <= self._rows.shape[0]:
            self._rows = self._rows[:rows].clone()

    def restart(self, coeffs: Tensor, m: int) -> None:
        """Replace rows ``0 .. r-1`` by ``coeffs @ rows[:m]`` in place, one slab of columns at a time.

        Each column slab of the new rows depends only on the same slab of the old rows, so the
        extra memory is ``r`` rows of one slab, not ``r`` whole vectors.
        """
        r = coeffs.shape[0]
        if r > m:
            raise ValueError(f"a restart keeps at most the {m} current rows, got {r}")
        c64 = coeffs.to(device=self.storage_device, dtype=torch.float64)
        for lo in range(0, self.n, _CHUNK_COLUMNS):
            hi = min(self.n, lo + _CHUNK_COLUMNS)
            slab = self._rows[:m, lo:hi]
            new = c64 @ slab.to(torch.float64) if not self.native else coeffs.to(slab) @ slab
            self._rows[:r, lo:hi] = new.to(self.storage_dtype)


class KrylovSpace:
    """A finished Lanczos run's orthonormal basis ``V`` (``m`` vectors) with ``T = V'HV`` and the residual norm.

    Lanczos (thick-restarted or not) ends with ``H V = V T + f e_m'`` where ``f``, of norm
    ``beta``, is orthogonal to ``V``. So without another product: ``tr(V'HV) = tr(T)`` and
    ``||H V||_F^2 = ||T||_F^2 + beta^2``. A trace estimator deflates ``V`` for free (its part of
    ``tr(H)`` and ``tr(H^2)`` is exact) and probes only the rest: the Krylov space of a
    ``lambda_max`` run holds the top of the spectrum, where the trace's variance lives.
    """

    def __init__(self, basis: KrylovBasis, m: int, projected: np.ndarray, beta: float) -> None:
        basis.shrink(m)  # a short run in a large allocation: keep what it used, not the whole capacity
        self.basis, self.m = basis, m
        self.projected = projected[:m, :m].copy()
        self.beta = float(beta)

    @property
    def dim(self) -> int:
        """Vectors in the basis."""
        return self.m

    def trace(self) -> float:
        """``tr(V'HV)``: the exact part of ``tr(H)`` on the space."""
        return float(np.trace(self.projected))

    def trace_sq(self) -> float:
        """``||H V||_F^2 = tr(V'H^2 V)``: the exact part of ``tr(H^2)`` on the space."""
        return float(np.sum(self.projected**2) + self.beta**2)

    def project_out(self, v: Tensor) -> Tensor:
        """``(I - V V') v``, twice for orthogonality to working precision."""
        for _ in range(2):
            v = self.basis.subtract(self.m, self.basis.dot(self.m, v), v)
        return v

    def vectors(self) -> Tensor:
        """The basis as an ``(m, n)`` tensor in the work dtype (for tests and small models)."""
        return self.basis.combine(torch.eye(self.m, dtype=torch.float64), self.m)
