"""The loss on a fixed probe set as a function of the parameters, with gradient, HVP engines and batched evaluation.

Everything is functional: parameters are substituted with :func:`torch.func.functional_call`,
never written into the model, and every public method restores the model's modes and the
global RNG streams (see :mod:`lightning_hessian._guard`).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_hessian._guard import analysis_mode
from lightning_hessian._params import ParamSpec, flatten, select_parameters, unflatten

LossFn = Callable[[nn.Module, Any], Tensor]
HvpEngine = Literal["auto", "cached", "double_backward", "forward_over_reverse", "finite_difference"]
ObjectiveMode = Literal["eval", "batch_stats"]
AllReduceSum = Callable[[Tensor], Tensor]

_ENGINES: tuple[str, ...] = get_args(HvpEngine)
_CHECK_VECTORS = 4  # 4 products give 6 pairs u'Hw, w'Hu


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


class Objective:
    """Sample-weighted mean of ``loss_fn(model, batch)`` over fixed ``batches``, as a function of parameters.

    Args:
        model: any ``nn.Module``; it is never mutated.
        loss_fn: ``loss_fn(model, batch) -> scalar Tensor``, the mean loss over the batch.
        batches: the probe set; each batch is weighted by its size (``batch_size_fn``).
        params: ``None`` for all parameters with ``requires_grad``, or a glob / list of globs on
            parameter names (``"fc1.*"``) to analyse a subset.
        hvp: ``"auto"`` (cached gradient graph, finite differences if the model has no double
            backward), ``"cached"``, ``"double_backward"`` (fresh graph per product, lowest memory),
            ``"forward_over_reverse"`` (``torch.func``) or ``"finite_difference"``. ``"auto"`` checks
            once that double backward runs and is symmetric (four products of random vectors,
            counted in ``n_hvp_check``).
        mode: ``"eval"`` (dropout off, BatchNorm on running statistics: one fixed symmetric
            operator) or ``"batch_stats"`` (BatchNorm on batch statistics over copied buffers).
        batch_size_fn: weight of a batch; default: leading dimension of its first tensor.
        all_reduce_sum: for distributed use, a function summing a tensor over all processes
            (every process then sees the same operator); ``None`` for a single process.

    Flat vectors follow ``model.named_parameters()`` order restricted to the selected parameters.
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
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {loss_fn!r}")
        self.batches = list(batches)
        if not self.batches:
            raise ValueError("batches is empty: the objective needs at least one probe batch")
        self.model = model
        self.loss_fn = loss_fn
        self.mode: ObjectiveMode = mode
        self.hvp_engine: HvpEngine = hvp
        self._all_reduce_sum = all_reduce_sum
        selected = select_parameters(model, params)
        self.param_names = [n for n, _ in selected]
        self._params = [p for _, p in selected]
        dtypes = {p.dtype for p in self._params}
        if len(dtypes) > 1:
            raise ValueError(f"selected parameters mix dtypes {sorted(map(str, dtypes))}; select one dtype")
        size_fn = batch_size_fn or default_batch_size
        self._weights = [float(size_fn(b)) for b in self.batches]
        if any(w <= 0 for w in self._weights):
            raise ValueError(f"every batch needs a positive size, got {self._weights}")
        self._total_weight = float(
            self._reduce(torch.tensor(sum(self._weights), dtype=torch.float64, device=self.device)).item()
        )
        self._call = _LossCall(model, loss_fn)
        self._cache: tuple[tuple[tuple[int, int], ...], list[Tensor], Tensor] | None = None
        self._fallback_reason: str | None = None
        self._verified = False
        self.asymmetry_estimate: float | None = None
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
        """The HVP engine in use: ``hvp_engine`` with ``"auto"`` resolved (after the first HVP)."""
        if self.hvp_engine != "auto":
            return self.hvp_engine
        return "finite_difference" if self._fallback_reason else "cached"

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
        with self.session(), torch.no_grad():
            value = self._reduce(self._local_losses([None]))[0] / self._total_weight
        self.n_loss += 1
        result = float(value.item())
        if not math.isfinite(result):
            raise NonFiniteLossError(f"the probe loss is {result} at the current parameters")
        return result

    def grad(self) -> Tensor:
        """Gradient of the objective at the current parameters, as a flat vector."""
        with self.session():
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
        v = v.to(device=self.device, dtype=self.dtype)
        with self.session():
            hv = self._local_hvp(v)
        self.n_hvp += 1
        return self._reduce(hv)

    def losses_at(self, displacements: Tensor | Iterable[Tensor], *, absolute: bool = False) -> Tensor:
        """Objective values at ``theta + d`` for each displacement ``d`` (rows of a 2-D tensor, or an iterable).

        With ``absolute=True`` the vectors are parameter points themselves (saves a pass over the
        parameters when the caller forms ``theta + ...`` anyway). Vectors are streamed: an iterable
        is consumed one at a time, so grids of any size fit in memory. Non-finite losses are
        returned as they are (never raised), so that a landscape can show where the loss diverges.
        Costs one forward pass of the probe set per point.
        """
        with self.session(), torch.no_grad():
            local = self._local_losses(displacements, absolute=absolute)
        values = self._reduce(local) / self._total_weight
        self.n_loss += int(values.numel())
        return values.to(torch.float64).cpu()

    def release(self) -> None:
        """Drop the cached gradient graph (it is rebuilt on the next HVP if needed)."""
        self._cache = None

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Enter the analysis mode once for many operations (what every algorithm here does).

        Inside a session the model's modes, grad mode and RNG streams are set up once rather than
        per product, and the parameters are assumed not to change; on exit everything is
        restored. Sessions nest.
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
                self._buffers = {}

    # ------------------------------------------------------------------ internals
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

    def _local_hvp(self, v: Tensor) -> Tensor:
        engine = self.hvp_engine
        if engine == "auto":
            if self._fallback_reason is None:
                try:
                    if not self._verified:
                        self._verify_double_backward()
                    if self._fallback_reason is None:
                        return self._hvp_cached(v)
                except SecondOrderUnavailableError as err:
                    self._fall_back(str(err))
            engine = "finite_difference"
        if engine == "cached":
            return self._hvp_cached(v)
        if engine == "double_backward":
            return self._hvp_double_backward(v)
        if engine == "forward_over_reverse":
            return self._hvp_forward_over_reverse(v)
        return self._hvp_finite_difference(v)

    def _verify_double_backward(self) -> None:
        """Check once that double backward gives a symmetric operator; fall back (with a warning) if not.

        Ops without a second derivative either raise, or (``@once_differentiable`` custom
        functions, the weight-norm parametrization's kernel) are silently cut out of or wrong in
        the graph, which leaves a wrong, non-symmetric operator. The check multiplies
        ``_CHECK_VECTORS`` seeded Gaussian vectors and compares every pair ``u'Hw`` with ``w'Hu``
        (see :func:`asymmetry`). The products are counted in ``n_hvp_check``, not ``n_hvp``, so
        that results of repeated calls stay comparable.
        """
        gen = torch.Generator().manual_seed(2**31 - 1)
        vectors = torch.randn(_CHECK_VECTORS, self.num_params, generator=gen, dtype=torch.float64)
        vectors = vectors.to(self.device, self.dtype)
        self.n_hvp_check += _CHECK_VECTORS
        products = torch.stack([self._reduce(self._hvp_cached(u)) for u in vectors])
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

    def _fall_back(self, reason: str) -> None:
        self._cache = None
        self._fallback_reason = reason
        self._verified = True
        warnings.warn(
            f"Hessian-vector products fall back to central finite differences of gradients: {reason}. They are "
            "accurate on smooth models but can be far off across non-smooth points (ReLU kinks, max-pooling). "
            "Pass hvp='finite_difference' to choose this explicitly and silence the warning.",
            HvpFallbackWarning,
            stacklevel=5,
        )

    def _state_key(self) -> tuple[tuple[int, int], ...]:
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        return tuple((t.data_ptr(), t._version) for t in tensors)

    def _hvp_cached(self, v: Tensor) -> Tensor:
        # Inside a session the parameters are fixed: check the in-place version counters once.
        key = self._session_key if self._session_key is not None else self._state_key()
        if self._session_depth > 0:
            self._session_key = key
        if self._cache is None or self._cache[0] != key:
            self._cache = None
            leaves = self._leaves()
            values = self._values(leaves=leaves)
            loss = sum(
                (self._weighted(w, self._batch_loss(values, b)) for w, b in zip(self._weights, self.batches)),
                torch.zeros((), dtype=self.dtype, device=self.device),
            )
            with _second_order("differentiable gradient graph"):
                flat_grad = flatten(self._grads(loss, leaves, create_graph=True))
            self._cache = (key, leaves, flat_grad)
        _, leaves, flat_grad = self._cache
        if not flat_grad.requires_grad:
            return torch.zeros_like(v)
        with _second_order("double backward"):
            hv = torch.autograd.grad(flat_grad, leaves, grad_outputs=v, retain_graph=True, allow_unused=True)
        return flatten([torch.zeros_like(x) if h is None else h for h, x in zip(hv, leaves)])

    def _hvp_double_backward(self, v: Tensor) -> Tensor:
        total = torch.zeros_like(v)
        for w, batch in zip(self._weights, self.batches):
            leaves = self._leaves()
            loss = self._weighted(w, self._batch_loss(self._values(leaves=leaves), batch))
            flat_grad = flatten(self._grads(loss, leaves, create_graph=True))
            if flat_grad.requires_grad:
                total += flatten(self._grads(flat_grad @ v, leaves, create_graph=False))
        return total

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
