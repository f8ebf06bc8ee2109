"""Memory planning for double-backward HVPs: micro-batches, the bytes a gradient graph holds, and the plan.

HVPs add over samples, so a probe batch can be cut into micro-batches whose products, weighted
by their share of the samples, sum to the batch's product exactly. The planner sizes them from
the bytes autograd saves (measured on two small slices and extrapolated linearly in the number of
samples), so that the graphs alive at any moment stay within a budget, and holds as many graphs
for the whole measurement as the budget allows (holding saves the forward pass and the first
backward pass of every later product).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class EnginePlan:
    """How the double-backward engine runs over the probe set (``Objective.engine_plan``).

    Attributes:
        engine: ``"cached"`` (every chunk's gradient graph is built once and held for the session),
            ``"double_backward"`` (every chunk's graph is rebuilt for each product) or
            ``"partially_cached"`` (the first ``held_chunks`` held, the others rebuilt).
        chunks: pieces the probe set is evaluated in for each product.
        held_chunks: pieces whose gradient graphs are held for the session.
        micro_batch_size: size of the largest piece cut from a probe batch; ``None`` when no
            batch is cut.
        peak_graph_bytes: estimated bytes of gradient graphs alive at once under this plan.
        budget_bytes: the budget the plan was fitted to (``None`` for an explicit engine).
        training_step_bytes: estimated activation bytes of a training step on the largest probe
            batch (what its forward pass saves for backward); ``None`` when not measured.
        reason: why this plan, in one line.
    """

    engine: str
    chunks: int
    held_chunks: int
    micro_batch_size: int | None
    peak_graph_bytes: float | None
    budget_bytes: float | None
    training_step_bytes: float | None
    reason: str


class _Unsplittable(Exception):
    pass


_ATOMS = (str, bytes, int, float, bool, complex, type(None))


def split_batch(batch: Any, sizes: Sequence[int]) -> list[Any] | None:
    """Cut ``batch`` into consecutive pieces of ``sizes`` samples, or ``None`` if it cannot be cut.

    Every tensor whose leading dimension is ``sum(sizes)`` is sliced (views, no copy); other
    tensors and plain values are shared by every piece. Containers: tensors, mappings, lists,
    tuples and named tuples; any other object makes the batch unsplittable, as does a batch
    without a tensor of that leading size.
    """
    n = sum(sizes)
    if len(sizes) < 2 or any(s <= 0 for s in sizes):
        return None
    found = False
    bounds = [0]
    for s in sizes:
        bounds.append(bounds[-1] + s)

    def cut(x: Any, lo: int, hi: int) -> Any:
        nonlocal found
        if isinstance(x, Tensor):
            if x.dim() > 0 and x.shape[0] == n:
                found = True
                return x[lo:hi]
            return x
        if isinstance(x, _ATOMS):
            return x
        if isinstance(x, Mapping):
            items = {k: cut(v, lo, hi) for k, v in x.items()}
            rebuild: Any = type(x)
            try:
                return rebuild(items)
            except Exception as err:  # a mapping type we cannot rebuild
                raise _Unsplittable from err
        if isinstance(x, tuple) and hasattr(x, "_fields"):
            return type(x)(*(cut(v, lo, hi) for v in x))
        if type(x) in (list, tuple):
            return type(x)(cut(v, lo, hi) for v in x)
        raise _Unsplittable

    try:
        pieces = [cut(batch, lo, hi) for lo, hi in itertools.pairwise(bounds)]
    except _Unsplittable:
        return None
    return pieces if found else None


def even_sizes(n: int, pieces: int) -> list[int]:
    """``n`` samples in ``pieces`` near-equal consecutive pieces (larger ones first)."""
    pieces = max(1, min(n, pieces))
    return [n // pieces + (1 if i < n % pieces else 0) for i in range(pieces)]


def _storage_key(t: Tensor) -> tuple[int, int]:
    """(address, bytes) of a tensor's storage; its own size when it has no plain storage."""
    try:
        storage = t.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError):  # pragma: no cover - tensor subclasses without storage
        return id(t), t.numel() * t.element_size()


def tensors_in(obj: Any) -> Iterable[Tensor]:
    """Every tensor in a nested batch (mappings, lists, tuples)."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors_in(v)


class SavedBytes:
    """Count the distinct storage bytes autograd saves for backward while active (a context manager).

    Storages of ``exclude`` (parameters, buffers, the batch: memory that exists anyway) are not
    counted. The pack hook keeps a detached alias, so no reference cycle delays freeing.
    """

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        self._exclude = {_storage_key(t)[0] for t in exclude}
        self._seen: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    def _pack(self, t: Tensor) -> Tensor:
        key, nbytes = _storage_key(t)
        if key not in self._exclude and key != 0:
            self._seen[key] = max(self._seen.get(key, 0), nbytes)
        return t.detach()

    @property
    def total(self) -> int:
        """Bytes counted so far."""
        return sum(self._seen.values())

    def __enter__(self) -> SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


def _unpack(t: Tensor) -> Tensor:
    return t


@dataclass(frozen=True)
class GraphCost:
    """Bytes as an affine function of the number of samples: ``fixed + per_sample * n``."""

    fixed: float
    per_sample: float

    def __call__(self, n: int) -> float:
        return self.fixed + self.per_sample * n

    @staticmethod
    def fit(n1: int, b1: float, n2: int, b2: float) -> GraphCost:
        """Line through two measurements (``n1 < n2``); one measurement (``n1 == n2``) means no fixed part."""
        if n2 <= n1:
            return GraphCost(0.0, b2 / max(n2, 1))
        slope = max(0.0, (b2 - b1) / (n2 - n1))
        return GraphCost(max(0.0, b2 - slope * n2), slope)

    def largest_within(self, budget: float, cap: int) -> int:
        """Most samples whose bytes fit ``budget`` (at least 1, at most ``cap``)."""
        if self.per_sample <= 0:
            return cap
        return max(1, min(cap, math.floor((budget - self.fixed) / self.per_sample)))


def plan_pieces(
    sizes: Sequence[int], graph: GraphCost, budget: float, splittable: bool
) -> tuple[list[int], int | None, int]:
    """Choose micro-batch counts per batch and how many chunks to hold, for graphs within ``budget``.

    Returns ``(pieces_per_batch, micro_batch_size, held)``. An empty ``pieces_per_batch`` means
    one chunk for the whole probe set, held (the fastest plan, when it fits). Otherwise every
    batch ``i`` is cut into ``pieces_per_batch[i]`` chunks of at most ``micro_batch_size`` samples
    (``None``: batches are not cut), and the first ``held`` chunks keep their graphs while one
    more is being rebuilt, so that ``held`` graphs plus the largest rebuilt one fit the budget.
    """
    if sum(graph(n) for n in sizes) <= budget:
        return [], None, 1
    largest = max(sizes)
    micro = largest
    if splittable and graph(largest) > budget:
        micro = graph.largest_within(budget, largest)
    counts = [max(1, math.ceil(n / micro)) for n in sizes]
    chunk_bytes = [graph(s) for n, c in zip(sizes, counts) for s in even_sizes(n, c)]
    return counts, (micro if micro < largest else None), held_within(chunk_bytes, budget)


def held_within(chunk_bytes: Sequence[float], budget: float) -> int:
    """How many leading chunks can keep their graphs while the largest other one is rebuilt, within ``budget``."""
    held = 0
    while held < len(chunk_bytes) - 1 and sum(chunk_bytes[: held + 1]) + max(chunk_bytes[held + 1 :]) <= budget:
        held += 1
    return held
