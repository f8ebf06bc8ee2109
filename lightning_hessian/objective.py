"""The loss on a fixed probe set as a function of the parameters, with gradient, HVP engines and batched evaluation.

Everything is functional: parameters are substituted with :func:`torch.func.functional_call`,
never written into the model, and every public method restores the model's modes and the
global RNG streams (see :mod:`lightning_hessian._guard`).
"""

from __future__ import annotations

import contextlib
import math
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_hessian._engines import (
    EnginePlan,
    GraphCost,
    SavedBytes,
    even_sizes,
    held_within,
    plan_pieces,
    split_batch,
    tensors_in,
)
from lightning_hessian._guard import analysis_mode
from lightning_hessian._params import ParamSpec, flatten, select_parameters, unflatten

LossFn = Callable[[nn.Module, Any], Tensor]
HvpEngine = Literal["auto", "cached", "double_backward", "forward_over_reverse", "finite_difference"]
ObjectiveMode = Literal["eval", "batch_stats"]
AllReduceSum = Callable[[Tensor], Tensor]

_ENGINES: tuple[str, ...] = get_args(HvpEngine)
_CHECK_VECTORS = 4  # 4 products give 6 pairs u'Hw, w'Hu
_CHECK_SAMPLES = 16  # the symmetry check's slice of the first probe batch
# hvp="auto"'s default budget: graphs alive at once within this multiple of a training step's saved
# activations (measured peak: see benchmarks/bench_memory.py), and never below a size at which
# memory is not worth trading time for.
_BUDGET_PER_TRAINING_STEP = 1.0
_MIN_BUDGET = 16 * 2**20


def symmetry_tolerance(dtype: torch.dtype) -> float:
    """Largest relative asymmetry accepted as rounding: ``30 sqrt(eps)`` (1e-2 in float32), at most 0.05.

    Rounding leaves about 1e-7 in float32 on the tested models; a wrong double backward leaves
    0.04-0.6 (weight_norm) or more (``@once_differentiable``).
    """
    return min(0.05, 30.0 * math.sqrt(torch.finfo(dtype).eps))


def asymmetry(vectors: Tensor, products: Tensor) -> float:
    """Estimate ``||H - H^T||_F / ||H||_F`` from products ``H u_i`` of independent Gaussian vectors ``u_i``.

    For Gaussian ``u, w``: ``E (u'Aw)^2 = ||A||_F^2`` for any ``A``, so
    ``sqrt(sum (u'Hw - w'Hu)^2 / sum ((u'Hw)^2 + (w'Hu)^2) / 2)`` over all pairs estimates the
    relative asymmetry whatever the dimension. 0 when every product is 0 (a loss linear in the
    parameters).
    """
    m = vectors.to(torch.float64) @ products.to(torch.float64).T  # m[i, j] = u_i' H u_j
    i, j = torch.triu_indices(len(vectors), len(vectors), 1)
    a, b = m[i, j], m[j, i]
    scale = float(((a * a + b * b) / 2).sum())
    if scale == 0.0:
        return 0.0
    return math.sqrt(float(((a - b) ** 2).sum()) / scale)


class NonFiniteLossError(FloatingPointError):
    """The probe loss (or its gradient) is NaN or infinite, so curvature is undefined here."""


class SecondOrderUnavailableError(RuntimeError):
    """Autograd could not differentiate the gradient (an op without double backward)."""


@contextlib.contextmanager
def _second_order(what: str) -> Iterator[None]:
    """Tag errors raised while building or differentiating a gradient graph, and only those.

    The forward pass and the user's loss run outside this context, so their errors are never
    mistaken for a missing double backward.
    """
    try:
        yield
    except (RuntimeError, NotImplementedError) as err:
        if isinstance(err, (torch.OutOfMemoryError, SecondOrderUnavailableError)):
            raise
        raise SecondOrderUnavailableError(f"{what} failed: {type(err).__name__}: {err}".splitlines()[0]) from err


class DetachedLossError(RuntimeError):
    """``loss_fn`` returned a loss that autograd cannot differentiate with respect to the selected parameters."""


def _require_differentiable(loss: Tensor) -> None:
    """Refuse a loss without a gradient path: its gradient and Hessian would be silently zero."""
    if loss.requires_grad:
        return
    if not (loss.is_floating_point() or loss.is_complex()):
        cause = f"it is an integer tensor ({loss.dtype}), which carries no gradient"
    elif loss.is_inference():
        cause = "it was computed under torch.inference_mode()"
    else:
        cause = (
            "it was computed under torch.no_grad(), .detach()ed, rebuilt from a number (.item(), float(), "
            "torch.tensor(...)), or it does not use any of the selected parameters"
        )
    raise DetachedLossError(
        f"loss_fn returned a loss that does not require grad ({cause}), so its gradient and Hessian would be "
        "silently zero. Return the loss computed from the model's output with autograd on (no torch.no_grad(), "
        "inference_mode(), .detach(), .item() or integer casts inside loss_fn), and check that params= selects "
        "parameters the loss uses."
    )


def _math_attention() -> contextlib.AbstractContextManager[None]:
    """Scaled dot-product attention on its math kernel: the fused kernels have no double backward."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])  # type: ignore[no-any-return]


class HvpFallbackWarning(UserWarning):
    """Double backward is unavailable for this model; HVPs fall back to finite differences."""


def default_batch_size(batch: Any) -> int:
    """Leading dimension of the first tensor found in ``batch`` (depth first), or 1 if none."""
    found = _first_tensor_size(batch)
    return 1 if found is None else found


def _first_tensor_size(batch: Any) -> int | None:
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else 1
    if not isinstance(batch, (Mapping, list, tuple)):
        return None
    for item in batch.values() if isinstance(batch, Mapping) else batch:
        found = _first_tensor_size(item)
        if found is not None:
            return found
    return None


class _LossCall(nn.Module):
    """Lets ``functional_call`` substitute parameters around an arbitrary ``loss_fn(model, batch)``."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self, batch: Any, weights: Sequence[float] | None = None) -> Tensor:
        """One batch's loss; with ``weights``, ``batch`` is a list and the result their weighted sum (float64).

        The second form evaluates a whole probe set under one parameter substitution, which is what
        a grid point needs (no per-batch substitution overhead).
        """
        if weights is None:
            return _checked(self._loss_fn(self.model, batch))
        losses = torch.stack([_checked(self._loss_fn(self.model, b)).detach() for b in batch]).to(torch.float64)
        return (losses * torch.tensor(weights, dtype=torch.float64, device=losses.device)).sum()


def _checked(loss: Any) -> Tensor:
    """The loss as a 0-dim tensor, or a clear error when ``loss_fn`` returned something else."""
    if not isinstance(loss, Tensor):
        raise TypeError(f"loss_fn must return a scalar Tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(
            f"loss_fn must return a scalar (the mean loss over the batch), got shape {tuple(loss.shape)}; "
            "reduce it, e.g. with .mean()"
        )
    return loss.reshape(())


def _graph_products(leaves: list[Tensor], flat_grad: Tensor, vectors: Tensor, keep: bool) -> Tensor:
    """Rows ``H v`` by double backward through one gradient graph; ``keep`` holds the graph afterwards."""
    out = torch.zeros_like(vectors)
    if not flat_grad.requires_grad:  # linear in the parameters: this graph's Hessian is zero
        return out
    last = len(vectors) - 1
    for r, v in enumerate(vectors):
        with _second_order("double backward"):
            hv = torch.autograd.grad(
                flat_grad, leaves, grad_outputs=v, retain_graph=keep or r < last, allow_unused=True
            )
        out[r] = flatten([torch.zeros_like(x) if h is None else h for h, x in zip(hv, leaves)])
    return out


class Objective:
    """Sample-weighted mean of ``loss_fn(model, batch)`` over fixed ``batches``, as a function of parameters.

    Args:
        model: any ``nn.Module``; it is never mutated.
        loss_fn: ``loss_fn(model, batch) -> scalar Tensor``, the mean loss over the batch.
        batches: the probe set; each batch is weighted by its size (``batch_size_fn``).
        params: ``None`` for all parameters with ``requires_grad``, or a glob / list of globs on
            parameter names (``"fc1.*"``) to analyse a subset.
        hvp: ``"auto"`` (double backward planned to a memory budget, finite differences if the
            model has no double backward), ``"cached"`` (one gradient graph of the whole probe set
            held for the session: fastest, most memory), ``"double_backward"`` (a fresh graph per
            batch and product), ``"forward_over_reverse"`` (``torch.func``) or
            ``"finite_difference"``. ``"auto"`` checks once that double backward runs and is
            symmetric (four products of random vectors on a slice of at most 16 samples of the
            first batch, counted in ``n_hvp_check``).
        mode: ``"eval"`` (dropout off, BatchNorm on running statistics: one fixed symmetric
            operator) or ``"batch_stats"`` (BatchNorm on batch statistics over copied buffers).
        batch_size_fn: weight of a batch; default: leading dimension of its first tensor.
        all_reduce_sum: for distributed use, a function summing a tensor over all processes
            (every process then sees the same operator); ``None`` for a single process.
        memory_budget: bytes of gradient graphs ``hvp="auto"`` may hold at once; default: what a
            training step on the largest probe batch holds (the activations its forward pass
            saves, measured), at least 16 MiB. ``"auto"`` holds the whole probe set's graph when it fits, else cuts
            batches into micro-batches (exact: HVPs add over samples) and holds what fits.

    Flat vectors follow ``model.named_parameters()`` order restricted to the selected parameters.
    Gradient graphs live at most for the outermost :meth:`session` (every algorithm here opens
    one); nothing is held between sessions.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Sequence[Any],
        params: ParamSpec = None,
        hvp: HvpEngine = "auto",
        *,
        mode: ObjectiveMode = "eval",
        batch_size_fn: Callable[[Any], int] | None = None,
        all_reduce_sum: AllReduceSum | None = None,
        memory_budget: float | None = None,
    ) -> None:
        if hvp not in _ENGINES:
            raise ValueError(f"hvp must be one of {_ENGINES}, got {hvp!r}")
        if mode not in get_args(ObjectiveMode):
            raise ValueError(f"mode must be 'eval' or 'batch_stats', got {mode!r}")
        if hvp == "forward_over_reverse" and mode == "batch_stats":
            raise ValueError(
                "hvp='forward_over_reverse' cannot run BatchNorm on batch statistics (torch.func forbids the "
                "in-place running-statistics update); use hvp='cached' or 'double_backward' with mode='batch_stats'"
            )
        if memory_budget is not None and (
            isinstance(memory_budget, bool)
            or not isinstance(memory_budget, (int, float))
            or not 0 < memory_budget < math.inf
        ):
            raise ValueError(f"memory_budget must be a positive number of bytes or None, got {memory_budget!r}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {loss_fn!r}")
        self.batches = list(batches)
        if not self.batches:
            raise ValueError("batches is empty: the objective needs at least one probe batch")
        self.model = model
        self.loss_fn = loss_fn
        self.mode: ObjectiveMode = mode
        self.hvp_engine: HvpEngine = hvp
        self.memory_budget = None if memory_budget is None else float(memory_budget)
        self._all_reduce_sum = all_reduce_sum
        selected = select_parameters(model, params)
        self.param_names = [n for n, _ in selected]
        self._params = [p for _, p in selected]
        dtypes = {p.dtype for p in self._params}
        if len(dtypes) > 1:
            raise ValueError(f"selected parameters mix dtypes {sorted(map(str, dtypes))}; select one dtype")
        self._size_fn = batch_size_fn or default_batch_size
        self._weights = [float(self._size_fn(b)) for b in self.batches]
        if any(w <= 0 for w in self._weights):
            raise ValueError(f"every batch needs a positive size, got {self._weights}")
        self._total_weight = float(
            self._reduce(torch.tensor(sum(self._weights), dtype=torch.float64, device=self.device)).item()
        )
        self._call = _LossCall(model, loss_fn)
        self._fallback_reason: str | None = None
        self._verified = False
        self.asymmetry_estimate: float | None = None
        self.engine_plan: EnginePlan | None = None
        self.out_of_memory_events = 0
        self._chunks: list[list[tuple[Any, float]]] | None = None
        self._n_held = 0
        self._held: dict[int, tuple[list[Tensor], Tensor]] = {}
        self._held_key: tuple[tuple[int, int], ...] | None = None
        self._session_depth = 0
        self._session_key: tuple[tuple[int, int], ...] | None = None
        self._buffers: dict[str, tuple[Tensor, int]] = {}
        self.n_hvp = 0
        self.n_hvp_check = 0
        self.n_grad = 0
        self.n_loss = 0

    # ------------------------------------------------------------------ properties
    @property
    def num_params(self) -> int:
        """Number of scalar parameters the Hessian is taken over."""
        return sum(p.numel() for p in self._params)

    @property
    def device(self) -> torch.device:
        """Device of the selected parameters (where every flat vector lives)."""
        return self._params[0].device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the selected parameters (and of every flat vector)."""
        return self._params[0].dtype

    @property
    def active_engine(self) -> str:
        """The HVP engine in use, ``"auto"`` resolved once the first HVP has run.

        ``"cached"``, ``"partially_cached"`` or ``"double_backward"`` (see :attr:`engine_plan` for
        micro-batches and held graphs), ``"forward_over_reverse"`` or ``"finite_difference"``;
        ``"auto"`` before the first HVP.
        """
        if self._fallback_reason is not None:
            return "finite_difference"
        if self.hvp_engine == "auto":
            return "auto" if self.engine_plan is None else self.engine_plan.engine
        return self.hvp_engine

    @property
    def held_graphs(self) -> int:
        """Gradient graphs held right now (0 outside a session and after :meth:`release`)."""
        return len(self._held)

    def parameters(self) -> Tensor:
        """Current values of the selected parameters as one flat vector (a copy)."""
        return flatten([p.detach() for p in self._params])

    @property
    def param_shapes(self) -> list[tuple[str, torch.Size]]:
        """``(name, shape)`` of each selected parameter, in flat-vector order."""
        return [(n, p.shape) for n, p in zip(self.param_names, self._params)]

    def split(self, vector: Tensor) -> list[Tensor]:
        """Views of a flat vector shaped like the selected parameters (in ``param_names`` order)."""
        return unflatten(vector, self._params)

    # ------------------------------------------------------------------ public operations
    def loss(self) -> float:
        """Objective value at the current parameters; raises :class:`NonFiniteLossError` if not finite."""
        with self._cleanup_on_error(), self.session(), torch.no_grad():
            value = self._reduce(self._local_losses([None]))[0] / self._total_weight
        self.n_loss += 1
        result = float(value.item())
        if not math.isfinite(result):
            raise NonFiniteLossError(f"the probe loss is {result} at the current parameters")
        return result

    def grad(self) -> Tensor:
        """Gradient of the objective at the current parameters, as a flat vector."""
        with self._cleanup_on_error(), self.session():
            g = self._local_grad(None)
        self.n_grad += 1
        g = self._reduce(g)
        if not bool(torch.isfinite(g).all()):
            raise NonFiniteLossError("the gradient of the probe loss has NaN or infinite entries")
        return g

    def hvp(self, v: Tensor) -> Tensor:
        """Hessian-vector product ``H v`` at the current parameters (``v`` flat, same device and dtype)."""
        if v.shape != (self.num_params,):
            raise ValueError(f"v must have shape ({self.num_params},), got {tuple(v.shape)}")
        return self.hvps(v.reshape(1, -1))[0]

    def hvps(self, vectors: Tensor) -> Tensor:
        """Products ``H v`` for each row ``v`` of ``vectors`` (shape ``(k, N)``), as rows.

        With the double-backward engines each chunk's graph is built once for all ``k`` vectors,
        so a block costs about one graph build plus ``k`` backward passes per chunk. Counts ``k``
        HVPs.
        """
        if vectors.dim() != 2 or vectors.shape[1] != self.num_params:
            raise ValueError(f"vectors must have shape (k, {self.num_params}), got {tuple(vectors.shape)}")
        vectors = vectors.to(device=self.device, dtype=self.dtype)
        with self._cleanup_on_error(), self.session():
            out = self._local_hvps(vectors)
        self.n_hvp += len(vectors)
        return self._reduce(out)

    def losses_at(self, displacements: Tensor | Iterable[Tensor], *, absolute: bool = False) -> Tensor:
        """Objective values at ``theta + d`` for each displacement ``d`` (rows of a 2-D tensor, or an iterable).

        With ``absolute=True`` the vectors are parameter points themselves (saves a pass over the
        parameters when the caller forms ``theta + ...`` anyway). Vectors are streamed: an iterable
        is consumed one at a time, so grids of any size fit in memory. Non-finite losses are
        returned as they are (never raised), so that a landscape can show where the loss diverges.
        Costs one forward pass of the probe set per point.
        """
        with self._cleanup_on_error(), self.session(), torch.no_grad():
            local = self._local_losses(displacements, absolute=absolute)
        values = self._reduce(local) / self._total_weight
        self.n_loss += int(values.numel())
        return values.to(torch.float64).cpu()

    def release(self) -> None:
        """Free everything the objective holds beyond its inputs: gradient graphs and buffer copies.

        Safe at any time; within a session the next HVP rebuilds what it needs. Leaving the
        outermost session does the same.
        """
        self._held = {}
        self._held_key = None
        self._buffers = {}

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Enter the analysis mode once for many operations (what every algorithm here does).

        Inside a session the model's modes, grad mode and RNG streams are set up once rather than
        per product, the parameters are assumed not to change, and gradient graphs are reused
        across products; on exit everything is restored and released. Sessions nest.
        """
        if self._session_depth > 0:
            self._session_depth += 1
            try:
                yield
            finally:
                self._session_depth -= 1
            return
        with analysis_mode(self.model, self.mode):
            self._session_depth = 1
            self._session_key = None
            try:
                yield
            finally:
                self._session_depth = 0
                self._session_key = None
                self.release()

    # ------------------------------------------------------------------ internals
    @contextlib.contextmanager
    def _cleanup_on_error(self) -> Iterator[None]:
        """On any error release what is held; on running out of memory also free the failed pass's tensors.

        The error propagates unchanged (``torch.OutOfMemoryError`` and ``MemoryError`` included),
        so that a caller can recognise it. Its traceback's finished frames are cleared, since
        their locals (activations, graphs) would otherwise live as long as the exception does,
        and ``hvp="auto"`` plans the next products with half the memory budget.
        """
        try:
            yield
        except BaseException as err:
            self.release()
            if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
                traceback.clear_frames(err.__traceback__)
                self.out_of_memory_events += 1
                if self.hvp_engine == "auto":
                    self._chunks = None
                    self.engine_plan = None
            raise

    def _reduce(self, t: Tensor) -> Tensor:
        return self._all_reduce_sum(t) if self._all_reduce_sum is not None else t

    def _values(
        self,
        leaves: Sequence[Tensor] | None = None,
        displacement: Tensor | None = None,
        point: Tensor | None = None,
        buffers: dict[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Substitution dict for ``functional_call``: selected params (leaves, displaced, a point); others detached.

        Buffers are copies (:meth:`_buffer_copies`, or ``buffers`` when the caller made them).
        """
        values: dict[str, Tensor] = {}
        selected = set(self.param_names)
        for name, p in self.model.named_parameters():
            if name not in selected:
                values["model." + name] = p.detach()
        if leaves is not None:
            current: Sequence[Tensor] = leaves
        elif displacement is not None:
            current = [p.detach() + d for p, d in zip(self._params, unflatten(displacement, self._params))]
        elif point is not None:
            current = unflatten(point, self._params)
        else:
            current = [p.detach() for p in self._params]
        for name, t in zip(self.param_names, current):
            values["model." + name] = t
        values.update(self._buffer_copies() if buffers is None else buffers)
        return values

    def _buffer_copies(self) -> dict[str, Tensor]:
        """Copies of every buffer for one call, so that a forward pass never writes the model's own.

        Forward passes may update buffers in place (BatchNorm statistics in ``batch_stats`` mode,
        call counters, quantization observers). Copies live for the session; a copy that a call
        wrote is replaced by a fresh one for the next call (graphs built earlier keep theirs), so
        every call sees the model's buffers as they are, and buffers nobody writes are copied once.
        """
        pool = self._buffers
        out: dict[str, Tensor] = {}
        for name, b in self.model.named_buffers():
            entry = pool.get(name)
            if entry is None or entry[0]._version != entry[1]:
                copy = b.detach().clone()
                entry = pool[name] = (copy, copy._version)
            out["model." + name] = entry[0]
        return out

    def _batch_loss(self, values: dict[str, Tensor], batch: Any) -> Tensor:
        loss: Tensor = functional_call(self._call, values, (batch,), strict=False)
        return loss

    def _local_losses(self, displacements: Iterable[Tensor | None] | Tensor, absolute: bool = False) -> Tensor:
        """Sample-weighted loss sums (not yet divided by the total weight) at each displacement (or point)."""
        out = []
        for d in displacements:
            d = None if d is None else d.to(self.device, self.dtype)
            values = self._values(point=d) if absolute else self._values(displacement=d)
            out.append(functional_call(self._call, values, (self.batches,), {"weights": self._weights}, strict=False))
        if not out:
            return torch.zeros(0, dtype=torch.float64, device=self.device)
        return torch.stack(out)

    def _leaves(self) -> list[Tensor]:
        return [p.detach().requires_grad_(True) for p in self._params]

    def _weighted(self, w: float, loss: Tensor) -> Tensor:
        """The batch's share of the objective; checks that it is finite and differentiable."""
        _require_differentiable(loss)
        if not bool(torch.isfinite(loss.detach())):
            raise NonFiniteLossError(f"the probe loss is {loss.item()} on a probe batch at the current parameters")
        return loss * (w / self._total_weight)

    def _grads(self, loss: Tensor, leaves: list[Tensor], create_graph: bool) -> list[Tensor]:
        grads = torch.autograd.grad(loss, leaves, create_graph=create_graph, allow_unused=True)
        return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]

    def _local_grad(self, displacement: Tensor | None) -> Tensor:
        total = torch.zeros(self.num_params, dtype=self.dtype, device=self.device)
        for w, batch in zip(self._weights, self.batches):
            if displacement is None:
                leaves = self._leaves()
            else:
                leaves = [
                    (p.detach() + d).requires_grad_(True)
                    for p, d in zip(self._params, unflatten(displacement, self._params))
                ]
            loss = self._weighted(w, self._batch_loss(self._values(leaves=leaves), batch))
            total += flatten(self._grads(loss, leaves, create_graph=False))
        return total

    def _local_hvps(self, vectors: Tensor) -> Tensor:
        engine = self.hvp_engine
        if engine == "auto":
            if self._fallback_reason is None:
                try:
                    if self._chunks is None:
                        self._plan_auto()
                    if not self._verified:
                        self._verify_double_backward()
                    if self._fallback_reason is None:
                        return self._chunked_hvps(vectors)
                except SecondOrderUnavailableError as err:
                    self._fall_back(str(err))
            engine = "finite_difference"
        if engine in ("cached", "double_backward"):
            if self._chunks is None:
                self._plan_fixed(engine)
            return self._chunked_hvps(vectors)
        single = self._hvp_forward_over_reverse if engine == "forward_over_reverse" else self._hvp_finite_difference
        return torch.stack([single(v) for v in vectors])

    # ------------------------------------------------------------------ double-backward engines
    def _plan_fixed(self, engine: str) -> None:
        """``"cached"``: one chunk, the whole probe set, held; ``"double_backward"``: one fresh chunk per batch."""
        pairs = list(zip(self.batches, self._weights))
        if engine == "cached":
            self._set_plan([pairs], 1, None, None, None, None, "hvp='cached': the whole probe set's graph is held")
        else:
            chunks = [[pair] for pair in pairs]
            self._set_plan(chunks, 0, None, None, None, None, "hvp='double_backward': a fresh graph per batch")

    def _set_plan(
        self,
        chunks: list[list[tuple[Any, float]]],
        held: int,
        micro: int | None,
        peak: float | None,
        budget: float | None,
        training: float | None,
        reason: str,
    ) -> None:
        self._chunks, self._n_held = chunks, held
        self._held, self._held_key = {}, None
        name = "cached" if held == len(chunks) else ("double_backward" if held == 0 else "partially_cached")
        self.engine_plan = EnginePlan(name, len(chunks), held, micro, peak, budget, training, reason)

    def _plan_auto(self) -> None:
        """Measure the graph bytes of a probe batch and plan chunks within the memory budget."""
        sizes = [default_batch_size(b) for b in self.batches]
        j = max(range(len(sizes)), key=sizes.__getitem__)
        forward, graph, splittable = self._measure_graphs(self.batches[j], sizes[j])
        training = forward(max(sizes))
        default = max(training * _BUDGET_PER_TRAINING_STEP, _MIN_BUDGET)
        budget = (self.memory_budget if self.memory_budget is not None else default) / 2**self.out_of_memory_events
        counts, micro, held = plan_pieces(sizes, graph, budget, splittable)
        if micro is not None and not self._splits_exactly(self.batches[j], sizes[j]):
            splittable = False
            counts, micro, held = plan_pieces(sizes, graph, budget, splittable)
        pairs = list(zip(self.batches, self._weights))
        if not counts:
            peak = sum(graph(n) for n in sizes)
            self._set_plan([pairs], 1, None, peak, budget, training, "the whole probe set's graph fits the budget")
            return
        chunks: list[list[tuple[Any, float]]] = []
        for (batch, w), n, count in zip(pairs, sizes, counts):
            pieces = self._pieces(batch, n, count, w) if count > 1 else None
            chunks.extend([[p] for p in pieces] if pieces else [[(batch, w)]])
        chunk_bytes = [graph(default_batch_size(c[0][0])) for c in chunks]
        held = held_within(chunk_bytes, budget)  # again: a batch that could not be cut stays whole
        peak = sum(chunk_bytes[:held]) + max(chunk_bytes[held:])
        why = (
            f"micro-batches of at most {micro} samples"
            if micro is not None
            else ("whole batches (they cannot be cut exactly)" if not splittable else "whole batches")
        )
        reason = f"{why}; {held} of {len(chunks)} graphs held within the budget"
        self._set_plan(chunks, held, micro, peak, budget, training, reason)

    def _pieces(self, batch: Any, n: int, count: int, weight: float) -> list[tuple[Any, float]] | None:
        """``batch`` cut into ``count`` micro-batches weighted by their share of ``batch_size_fn``, or None."""
        pieces = split_batch(batch, even_sizes(n, count))
        if pieces is None:
            return None
        shares = [float(self._size_fn(p)) for p in pieces]
        if not all(s > 0 for s in shares):
            return None
        total = sum(shares)
        return [(p, weight * s / total) for p, s in zip(pieces, shares)]

    def _splits_exactly(self, batch: Any, n: int) -> bool:
        """Whether cutting ``batch`` keeps the objective (two halves of a slice add up to its loss).

        A loss that couples samples (contrastive losses, BatchNorm on batch statistics, a sum
        divided by a fixed batch size) would change when cut; such batches stay whole. Checked on
        a slice of at most 16 samples (two small forward passes).
        """
        if self.mode == "batch_stats":
            return False
        m = min(n, 16)
        head = batch if m == n else (split_batch(batch, [m, n - m]) or [None])[0]
        pieces = None if head is None else self._pieces(head, m, 2, 1.0)
        if pieces is None:
            return False
        batch = head
        with torch.no_grad():
            values = self._values()
            whole = float(_checked(self._batch_loss(values, batch)))
            parts = [w * float(_checked(self._batch_loss(values, p))) for p, w in pieces]
        scale = abs(whole) + sum(abs(x) for x in parts)
        return abs(whole - sum(parts)) <= 1000 * torch.finfo(self.dtype).eps * scale

    def _measure_graphs(self, batch: Any, n: int) -> tuple[GraphCost, GraphCost, bool]:
        """Bytes saved by the forward pass and by the whole gradient graph, per number of samples.

        Measured on slices of 8 and 16 samples of ``batch`` when it can be cut, else on ``batch``.
        Returns ``(forward, graph, splittable)``.
        """
        fixed = 2.0 * self.num_params * torch.finfo(self.dtype).bits / 8  # the gradient, per parameter and flat
        if self.mode == "eval" and n >= 4:
            n2 = min(n - 1, 16)
            n1 = max(1, n2 // 2)
            try:
                small = [split_batch(batch, [m, n - m]) for m in (n1, n2)]
                if small[0] is not None and small[1] is not None:
                    f1, g1 = self._graph_bytes(small[0][0])
                    f2, g2 = self._graph_bytes(small[1][0])
                    return GraphCost.fit(n1, f1, n2, f2), GraphCost.fit(n1, g1 + fixed, n2, g2 + fixed), True
            except (torch.OutOfMemoryError, MemoryError, SecondOrderUnavailableError):
                raise
            except Exception:  # a model that cannot run a slice: measure the whole batch
                pass
        f, g = self._graph_bytes(batch)
        return GraphCost.fit(n, f, n, f), GraphCost.fit(n, g + fixed, n, g + fixed), False

    def _graph_bytes(self, batch: Any) -> tuple[int, int]:
        """Bytes autograd saves for ``batch``: by the forward pass, and by it plus the differentiable backward."""
        leaves = self._leaves()
        values = self._values(leaves=leaves)
        exclude = [*self._params, *self.model.buffers(), *values.values(), *tensors_in(batch)]
        with SavedBytes(exclude) as meter, _math_attention():
            loss = self._weighted(1.0, self._batch_loss(values, batch))
            forward = meter.total
            with _second_order("differentiable gradient graph"):
                self._grads(loss, leaves, create_graph=True)
            return forward, meter.total

    def _build_graph(self, chunk: list[tuple[Any, float]]) -> tuple[list[Tensor], Tensor]:
        """Leaves and the flat differentiable gradient of one chunk's share of the objective."""
        leaves = self._leaves()
        values = self._values(leaves=leaves)
        with _math_attention():
            loss = sum(
                (self._weighted(w, self._batch_loss(values, b)) for b, w in chunk),
                torch.zeros((), dtype=self.dtype, device=self.device),
            )
            with _second_order("differentiable gradient graph"):
                flat_grad = flatten(self._grads(loss, leaves, create_graph=True))
        return leaves, flat_grad

    def _chunked_hvps(self, vectors: Tensor) -> Tensor:
        """Products over the planned chunks: held graphs are reused, the others rebuilt and freed at once."""
        assert self._chunks is not None
        # Inside a session the parameters are fixed: check the in-place version counters once.
        key = self._session_key if self._session_key is not None else self._state_key()
        if self._session_depth > 0:
            self._session_key = key
        if self._held_key != key:
            self._held, self._held_key = {}, key
        out = torch.zeros_like(vectors)
        for i, chunk in enumerate(self._chunks):
            hold = i < self._n_held
            graph = self._held.get(i)
            if graph is None:
                graph = self._build_graph(chunk)
                if hold:
                    self._held[i] = graph
            leaves, flat_grad = graph
            del graph
            out += _graph_products(leaves, flat_grad, vectors, keep=hold)
            del leaves, flat_grad
        return out

    def _verify_double_backward(self) -> None:
        """Check once that double backward gives a symmetric operator; fall back (with a warning) if not.

        Ops without a second derivative either raise, or (``@once_differentiable`` custom
        functions, the weight-norm parametrization's kernel) are silently cut out of or wrong in
        the graph, which leaves a wrong, non-symmetric operator. The check multiplies
        ``_CHECK_VECTORS`` seeded Gaussian vectors and compares every pair ``u'Hw`` with ``w'Hu``
        (see :func:`asymmetry`). What it tests is how the model's ops differentiate twice, not the
        data, so it runs on at most ``_CHECK_SAMPLES`` samples of the first probe batch (on the
        CIFAR ResNet of ``benchmarks/bench_overhead.py`` the whole-probe check cost 2.8 HVPs, a
        third of a first measurement). The products are counted in ``n_hvp_check``, not
        ``n_hvp``, so that results of repeated calls stay comparable.
        """
        gen = torch.Generator().manual_seed(2**31 - 1)
        vectors = torch.randn(_CHECK_VECTORS, self.num_params, generator=gen, dtype=torch.float64)
        vectors = vectors.to(self.device, self.dtype)
        self.n_hvp_check += _CHECK_VECTORS
        products = self._reduce(self._check_products(vectors))
        ratio = asymmetry(vectors, products)
        self.asymmetry_estimate = ratio
        tol = symmetry_tolerance(self.dtype)
        if not ratio <= tol:
            self._fall_back(
                f"the double-backward operator is not symmetric (estimated ||H - H^T||_F / ||H||_F = {ratio:.3g} "
                f"from {_CHECK_VECTORS} random vectors, tolerance {tol:.2g} for {self.dtype}), so some op's backward "
                "is not correctly differentiable (e.g. a @once_differentiable custom function, or the weight_norm "
                "parametrization)"
            )
        self._verified = True

    def _check_products(self, vectors: Tensor) -> Tensor:
        """``vectors``' products under the Hessian of a slice of the first probe batch (the whole first chunk when
        the batch is small or cannot be cut or run in a slice)."""
        assert self._chunks is not None
        batch = self.batches[0]
        n = _first_tensor_size(batch) or 0
        pieces = split_batch(batch, [_CHECK_SAMPLES, n - _CHECK_SAMPLES]) if n > _CHECK_SAMPLES else None
        if pieces is not None:
            try:
                return self._block_products([(pieces[0], 1.0)], vectors)
            except (torch.OutOfMemoryError, MemoryError, SecondOrderUnavailableError):
                raise
            except Exception:  # a model that cannot run a slice: check on its first chunk
                pass
        return self._block_products(self._chunks[0], vectors)

    def _block_products(self, chunk: list[tuple[Any, float]], vectors: Tensor) -> Tensor:
        """Products of ``vectors`` under one chunk's Hessian, its graph built once and freed."""
        leaves, flat_grad = self._build_graph(chunk)
        return _graph_products(leaves, flat_grad, vectors, keep=False)

    def _fall_back(self, reason: str) -> None:
        self.release()
        self._fallback_reason = reason
        self._verified = True
        warnings.warn(
            f"Hessian-vector products fall back to central finite differences of gradients: {reason}. They are "
            "accurate on smooth models but can be far off across non-smooth points (ReLU kinks, max-pooling). "
            "Pass hvp='finite_difference' to choose this explicitly and silence the warning.",
            HvpFallbackWarning,
            stacklevel=6,
        )

    def _state_key(self) -> tuple[tuple[int, int], ...]:
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        return tuple((t.data_ptr(), t._version) for t in tensors)

    # ------------------------------------------------------------------ other engines
    def _hvp_forward_over_reverse(self, v: Tensor) -> Tensor:
        primals = tuple(p.detach() for p in self._params)
        tangents = tuple(unflatten(v, self._params))
        total = torch.zeros_like(v)
        for w, batch in zip(self._weights, self.batches):

            def loss_of(*leaves: Tensor, batch: Any = batch, w: float = w) -> Tensor:
                # Fresh buffer copies made inside the transforms: torch.func forbids writing a
                # captured tensor, and a copy kept across transforms would escape its level.
                buffers = {"model." + n: b.detach().clone() for n, b in self.model.named_buffers()}
                return self._weighted(w, self._batch_loss(self._values(leaves=leaves, buffers=buffers), batch))

            grad_fn = torch.func.grad(loss_of, argnums=tuple(range(len(primals))))
            with _math_attention():
                hv = torch.func.jvp(grad_fn, primals, tangents)[1]
            total += flatten(list(hv))
        return total

    def _hvp_finite_difference(self, v: Tensor) -> Tensor:
        norm = float(v.norm())
        if norm == 0.0:
            return torch.zeros_like(v)
        theta = self.parameters()
        rms = float(theta.norm()) / math.sqrt(theta.numel())
        step = torch.finfo(self.dtype).eps ** (1.0 / 3.0) * max(1.0, rms)
        u = v * (step / norm)
        g_plus = self._local_grad(u)
        g_minus = self._local_grad(-u)
        hv: Tensor = (g_plus - g_minus) * (norm / (2.0 * step))
        return hv
