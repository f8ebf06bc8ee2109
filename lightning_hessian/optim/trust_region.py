"""TrustRegion: the adaptive-norm (ellipsoidal) trust-region Newton optimizer, on cached-graph HVPs of the loss.

One step: run the closure once with the gradient graph kept (``create_graph=True``), fold the gradient
into the norm's second moment, solve the trust-region subproblem in that norm with Steihaug-Toint CG
(every product a double backward through the one cached graph), evaluate the loss at the trial point
with a second closure call, and accept the step when rho = actual / predicted decrease is large
enough. The radius grows on very successful steps and shrinks on failed ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_hessian._params import flatten, unflatten
from lightning_hessian.optim.norms import DEFAULT_BETA, check_norm, metric_diagonal, update_second_moment
from lightning_hessian.optim.steihaug import SubproblemResult, negative_curvature_step, steihaug_cg

BACKPROP_COST: dict[str, float] = {"gradient": 1.0, "hvp": 2.0, "loss": 0.5}
"""Backprop-equivalents per operation: a gradient 1, an HVP 2 (the nominal double backward), a
forward-only loss evaluation 0.5. Nominal weights, so counts compare across machines; the benchmark
also reports wall time."""

DEFAULT_RADIUS: dict[str, float] = {"uniform": 5e-3, "rms": 1e-4, "adagrad": 1e-4, "adam": 1e-4}
"""Initial radius per norm, as in the authors' public code (the ellipsoidal norms measure in units of
sqrt(|g|), so their radius is smaller)."""

_STATE_KEY = "trust_region"
Status = Literal["accepted", "rejected", "stationary", "skipped"]


@dataclass(frozen=True)
class TrustRegionStats:
    """What one :meth:`TrustRegion.step` did, for logging and for tests.

    ``status``: ``accepted`` (parameters moved, loss went down), ``rejected`` (rho below the threshold:
    parameters restored bit-identically, radius shrunk), ``stationary`` (no step with a predicted decrease
    was found: zero gradient and no negative curvature) or ``skipped`` (the closure gave no loss).
    ``radius`` is the radius this step was solved in, ``next_radius`` the one the next step uses.
    ``step_norm`` is measured in the trust-region norm. ``lanczos_iterations`` counts the products of the
    negative-curvature search (run only where the gradient norm is below ``gradient_tol``). Costs are this
    step's; ``total_backprops`` counts since the optimizer was created (it survives ``state_dict``).
    """

    step: int
    status: Status
    loss: float
    trial_loss: float
    rho: float
    radius: float
    next_radius: float
    predicted_decrease: float
    actual_decrease: float
    step_norm: float
    cg_iterations: int
    lanczos_iterations: int
    boundary: bool
    negative_curvature: bool
    n_grad: int
    n_hvp: int
    n_loss: int
    backprops: float
    total_backprops: float

    @property
    def accepted(self) -> bool:
        """Whether the parameters moved in this step."""
        return self.status == "accepted"

    def metrics(self) -> dict[str, float]:
        """The numeric fields as floats (booleans as 0/1), ready for a logger."""
        return {k: float(v) for k, v in asdict(self).items() if k != "status"} | {"accepted": float(self.accepted)}


class _BackwardCapture:
    """While active, ``torch.autograd.backward`` (hence ``loss.backward()``) records the loss instead of
    running a plain backward.

    With ``create_graph`` it takes the gradient of that loss with respect to ``params`` keeping the graph
    (for the HVPs) and accumulates its detached value into ``.grad`` as a backward would; without, it only
    records the loss (the trial point needs the value, not the gradient). Only ``params`` receive gradients.
    """

    def __init__(self, params: Sequence[Tensor], create_graph: bool) -> None:
        self.params = list(params)
        self.create_graph = create_graph
        self.losses: list[Tensor] = []
        self.grads: list[Tensor | None] | None = None
        self._original: Callable[..., Any] | None = None

    def __enter__(self) -> _BackwardCapture:
        self._original = torch.autograd.backward
        torch.autograd.backward = self._backward  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        torch.autograd.backward = self._original  # type: ignore[assignment]

    def _backward(
        self,
        tensors: Tensor | Sequence[Tensor],
        grad_tensors: Tensor | Sequence[Tensor | None] | None = None,
        retain_graph: bool | None = None,
        create_graph: bool = False,
        grad_variables: Any = None,
        inputs: Any = None,
    ) -> None:
        outputs = [tensors] if isinstance(tensors, Tensor) else list(tensors)
        if grad_tensors is None:
            seeds: list[Tensor | None] = [None] * len(outputs)
        elif isinstance(grad_tensors, Tensor):
            seeds = [grad_tensors]
        else:
            seeds = list(grad_tensors)
        for out, seed in zip(outputs, seeds):
            if seed is None and out.numel() != 1:
                raise RuntimeError("TrustRegion: the closure called backward on a non-scalar without a gradient")
            self.losses.append((out if seed is None else (out * seed).sum()).reshape(()))
        if self.create_graph:
            self._accumulate(outputs, seeds)

    def _accumulate(self, outputs: list[Tensor], seeds: Sequence[Tensor | None]) -> None:
        grads = torch.autograd.grad(outputs, self.params, grad_outputs=seeds, create_graph=True, allow_unused=True)
        if self.grads is None:
            self.grads = list(grads)
        else:
            self.grads = [a if b is None else (b if a is None else a + b) for a, b in zip(self.grads, grads)]
        for p, g in zip(self.params, grads):
            if g is not None:
                p.grad = g.detach().clone() if p.grad is None else p.grad + g.detach()

    def loss(self, returned: Any) -> Tensor | None:
        """The loss the step works on: what the closure backpropagated, else what it returned."""
        if self.losses:
            return torch.stack(self.losses).sum()
        if isinstance(returned, Tensor):
            return returned.reshape(())
        if isinstance(returned, (int, float)):
            return torch.tensor(float(returned))
        return None

    def gradient_graph(self, returned: Any) -> tuple[Tensor | None, list[Tensor | None]]:
        """(loss, gradients with their graph); from the returned loss when the closure did not call backward."""
        if self.grads is None and isinstance(returned, Tensor) and returned.requires_grad:
            self._backward(returned)
        loss = self.loss(returned)
        grads: list[Tensor | None] = list(self.grads) if self.grads is not None else [None] * len(self.params)
        return loss, grads


class TrustRegion(torch.optim.Optimizer):
    """Adaptive-norm trust-region Newton method (Kohler, Adolphs & Lucchi): ``step(closure)`` like LBFGS.

    Each step minimises the mini-batch model g.s + s.Hs/2 subject to ||s||_M <= radius by preconditioned
    Steihaug-Toint CG, where M is the ``norm``: ``"uniform"`` (sphere), ``"rms"`` (sqrt of the EMA of
    g^2, + eps), ``"adagrad"`` (sqrt of the sum of g^2, + eps) or ``"adam"`` (sqrt of the bias-corrected
    second moment, + eps). Every HVP is a double backward through the closure's gradient graph, built
    once per step. The step is kept when rho = (loss - trial loss) / predicted decrease >= ``accept_threshold``;
    otherwise the parameters are restored bit-identically. rho >= ``expand_threshold`` multiplies the
    radius by ``expand_factor`` (capped at ``max_radius``), rho < ``accept_threshold`` divides it by
    ``shrink_factor``.

    Defaults follow the paper (Table 1: maximum radius 10, expand threshold 0.95, expand factor 1.1,
    shrink factor 1.5, Krylov tolerance 0.1) and the authors' code (accept threshold 0.01, at most 50 CG
    steps, RMS decay 0.8, initial radius 1e-4, 5e-3 for the sphere). Where the gradient norm is below
    ``gradient_tol`` (a saddle or a minimum), ``lanczos_steps`` Lanczos products look for negative
    curvature from a random start seeded by ``seed``; this is our addition, the paper's CG alone stops there.

    The closure runs twice per step: once for the gradient (while it runs, ``loss.backward()`` computes
    the gradient with ``create_graph=True`` for this optimizer's parameters only and fills ``.grad``) and
    once, forward only, at the trial point. It must compute the same function both times (dropout makes
    rho noisy); gradient clipping and AMP gradient scaling do not apply. ``last_stats`` says what the
    last step did.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        norm: str = "rms",
        *,
        radius: float | None = None,
        max_radius: float = 10.0,
        accept_threshold: float = 0.01,
        expand_threshold: float = 0.95,
        expand_factor: float = 1.1,
        shrink_factor: float = 1.5,
        beta: float | None = None,
        eps: float = 1e-8,
        krylov_tol: float = 0.1,
        max_cg_iters: int = 50,
        gradient_tol: float = 1e-6,
        lanczos_steps: int = 10,
        seed: int = 0,
    ) -> None:
        norm = check_norm(norm)
        radius = DEFAULT_RADIUS[norm] if radius is None else radius
        beta = DEFAULT_BETA.get(norm, 0.0) if beta is None else beta
        _check_options(
            radius, max_radius, accept_threshold, expand_threshold, expand_factor, shrink_factor, beta, eps, krylov_tol
        )
        for name, value, low in (("max_cg_iters", max_cg_iters, 1), ("lanczos_steps", lanczos_steps, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
        if isinstance(gradient_tol, bool) or not isinstance(gradient_tol, (int, float)) or not gradient_tol >= 0:
            raise ValueError(f"gradient_tol must be a number >= 0 (math.inf: search every step); got {gradient_tol!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int; got {seed!r}")
        defaults = {
            "norm": norm,
            "max_radius": float(max_radius),
            "accept_threshold": float(accept_threshold),
            "expand_threshold": float(expand_threshold),
            "expand_factor": float(expand_factor),
            "shrink_factor": float(shrink_factor),
            "beta": float(beta),
            "eps": float(eps),
            "krylov_tol": float(krylov_tol),
            "max_cg_iters": max_cg_iters,
            "gradient_tol": float(gradient_tol),
            "lanczos_steps": lanczos_steps,
        }
        super().__init__(params, defaults)
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(seed)
        self.state[_STATE_KEY] = {  # type: ignore[index]
            "radius": float(radius),
            "step": 0,
            "n_grad": 0,
            "n_hvp": 0,
            "n_loss": 0,
            "accepted": 0,
            "rejected": 0,
        }
        self.last_stats: TrustRegionStats | None = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add the single parameter group; a second one is refused (one trust region spans all parameters)."""
        if self.param_groups:
            raise ValueError(
                "TrustRegion takes one parameter group: its trust region spans all parameters, so per-group "
                "options have no meaning; pass the parameters as one iterable"
            )
        params = [param_group["params"]] if isinstance(param_group["params"], Tensor) else param_group["params"]
        tensors = list(params)
        if tensors and any(not isinstance(p, Tensor) or not p.is_floating_point() for p in tensors):
            raise TypeError("TrustRegion optimizes floating-point tensors only")
        if len({(p.dtype, p.device) for p in tensors}) > 1:
            raise ValueError("TrustRegion needs all parameters on one device with one dtype (it works on flat vectors)")
        super().add_param_group(param_group)

    @property
    def radius(self) -> float:
        """The trust-region radius the next step will use (in the norm's units)."""
        return float(self._global()["radius"])

    @property
    def total_backprops(self) -> float:
        """Backprop-equivalents spent so far (see :data:`BACKPROP_COST`)."""
        g = self._global()
        return float(
            g["n_grad"] * BACKPROP_COST["gradient"]
            + g["n_hvp"] * BACKPROP_COST["hvp"]
            + g["n_loss"] * BACKPROP_COST["loss"]
        )

    def metric(self) -> Tensor | None:
        """The diagonal M of the norm the last step measured in, flat in parameter order (``None``: the sphere).

        This is the preconditioner an optimizer-geometry analysis needs: the curvature this optimizer
        meets is that of M^{-1/2} H M^{-1/2}. Before the first step it is ``eps`` everywhere.
        """
        group = self.param_groups[0]
        if group["norm"] == "uniform":
            return None
        params = [p for p in group["params"] if p.requires_grad]
        t = max(int(self._global()["step"]), 1)
        diags = []
        for p in params:
            moment = self.state[p].get("second_moment") if p in self.state else None
            moment = torch.zeros_like(p) if moment is None else moment
            diag = metric_diagonal(moment, group["norm"], group["beta"], group["eps"], t)
            assert diag is not None
            diags.append(diag)
        return flatten(diags)

    def _global(self) -> dict[str, Any]:
        return self.state[_STATE_KEY]  # type: ignore[index, no-any-return]

    def state_dict(self) -> dict[str, Any]:
        """The usual optimizer state plus the radius, the counters and the Lanczos generator's state."""
        self._global()["rng_state"] = self._generator.get_state()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, so that training resumes exactly where it stopped."""
        if _STATE_KEY not in state_dict.get("state", {}):
            raise ValueError("this state_dict was not written by TrustRegion (no 'trust_region' entry in its state)")
        super().load_state_dict(state_dict)
        saved = dict(self.state[_STATE_KEY])  # type: ignore[index]
        rng = saved.pop("rng_state", None)
        if rng is not None:
            self._generator.set_state(rng.detach().to("cpu", torch.uint8).clone())
        self.state[_STATE_KEY] = saved  # type: ignore[index]
        for p in self.param_groups[0]["params"]:
            if "second_moment" in self.state.get(p, {}):
                self.state[p]["second_moment"] = self.state[p]["second_moment"].clone()

    def step(self, closure: Callable[[], Any] | None = None) -> Tensor | None:  # type: ignore[override]
        """One trust-region step; ``closure`` (required) zeroes the gradients, computes the loss and
        calls ``backward()`` on it (or just returns the loss). Returns the loss at the starting point."""
        if closure is None:
            raise ValueError(
                "TrustRegion.step needs a closure: it evaluates the loss twice per step and takes HVPs of it. "
                "Pass `step(closure)` where closure zeroes the gradients, computes the loss, calls "
                "loss.backward() and returns the loss (Lightning's automatic optimization does this for you)"
            )
        if not callable(closure):
            raise TypeError(f"closure must be callable; got {type(closure).__name__}")
        group = self.param_groups[0]
        params = [p for p in group["params"] if p.requires_grad]
        glob = self._global()
        with _BackwardCapture(params, create_graph=True) as capture, torch.enable_grad():
            returned = closure()
            loss_t, graph = capture.gradient_graph(returned)
        if loss_t is None or not params:
            self._record_skip(glob, math.nan)
            return None
        glob["n_grad"] += 1
        loss = float(loss_t.detach())
        if not math.isfinite(loss):
            self._record_skip(glob, loss)
            return None
        grads = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, graph)]
        flat_grad = flatten(grads)
        glob["step"] += 1
        metric = self._update_metric(group, params, grads, glob["step"])
        radius = float(glob["radius"])
        hvp = _cached_hvp(params, graph)
        result = steihaug_cg(
            flat_grad, hvp, radius, metric, krylov_tol=group["krylov_tol"], max_iters=group["max_cg_iters"]
        )
        n_hvp, cg_iterations, lanczos_iterations = result.n_hvp, result.iterations, 0
        if float(torch.linalg.vector_norm(flat_grad)) <= group["gradient_tol"]:
            found = negative_curvature_step(
                flat_grad, hvp, radius, metric, steps=group["lanczos_steps"], generator=self._generator
            )
            n_hvp += found.n_hvp
            lanczos_iterations = found.iterations
            if found.predicted_decrease > result.predicted_decrease:
                result = found
        del hvp, graph
        glob["n_hvp"] += n_hvp
        if not result.predicted_decrease > 0.0:
            iters = (cg_iterations, lanczos_iterations)
            return self._record(
                glob, "stationary", loss, math.nan, result, radius, n_hvp, iters, 0, loss_t, params, grads
            )
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, s in zip(params, unflatten(result.step.to(params[0].dtype), params)):
                p.add_(s)
        try:
            with _BackwardCapture(params, create_graph=False) as trial_capture, torch.no_grad():
                trial_t = trial_capture.loss(closure())
        except BaseException:  # leave the parameters where the step found them
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
            raise
        glob["n_loss"] += 1
        trial = math.nan if trial_t is None else float(trial_t.detach())
        rho = (loss - trial) / result.predicted_decrease
        accepted = math.isfinite(rho) and rho >= group["accept_threshold"]
        if not accepted:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
        if accepted and rho >= group["expand_threshold"]:
            glob["radius"] = min(radius * group["expand_factor"], group["max_radius"])
        elif not accepted:
            glob["radius"] = radius / group["shrink_factor"]
        glob["accepted" if accepted else "rejected"] += 1
        status: Status = "accepted" if accepted else "rejected"
        iters = (cg_iterations, lanczos_iterations)
        return self._record(glob, status, loss, trial, result, radius, n_hvp, iters, 1, loss_t, params, grads)

    def _update_metric(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], t: int) -> Tensor | None:
        norm = group["norm"]
        if norm == "uniform":
            return None
        diags = []
        for p, g in zip(params, grads):
            st = self.state[p]
            if "second_moment" not in st:
                st["second_moment"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            update_second_moment(st["second_moment"], g, norm, group["beta"])
            diag = metric_diagonal(st["second_moment"], norm, group["beta"], group["eps"], t)
            assert diag is not None
            diags.append(diag)
        return flatten(diags)

    def _record_skip(self, glob: dict[str, Any], loss: float) -> None:
        radius = float(glob["radius"])
        self.last_stats = TrustRegionStats(
            step=int(glob["step"]),
            status="skipped",
            loss=loss,
            trial_loss=math.nan,
            rho=math.nan,
            radius=radius,
            next_radius=radius,
            predicted_decrease=math.nan,
            actual_decrease=math.nan,
            step_norm=0.0,
            cg_iterations=0,
            lanczos_iterations=0,
            boundary=False,
            negative_curvature=False,
            n_grad=int(math.isfinite(loss)),
            n_hvp=0,
            n_loss=0,
            backprops=BACKPROP_COST["gradient"] * math.isfinite(loss),
            total_backprops=self.total_backprops,
        )

    def _record(
        self,
        glob: dict[str, Any],
        status: Status,
        loss: float,
        trial: float,
        result: SubproblemResult,
        radius: float,
        n_hvp: int,
        iterations: tuple[int, int],
        n_loss: int,
        loss_t: Tensor,
        params: list[Tensor],
        grads: list[Tensor],
    ) -> Tensor:
        for p, g in zip(params, grads):  # .grad holds the gradient the step used, whatever the trial call did
            p.grad = g.clone()
        self.last_stats = TrustRegionStats(
            step=int(glob["step"]),
            status=status,
            loss=loss,
            trial_loss=trial,
            rho=(loss - trial) / result.predicted_decrease if n_loss else math.nan,
            radius=radius,
            next_radius=float(glob["radius"]),
            predicted_decrease=result.predicted_decrease,
            actual_decrease=loss - trial,
            step_norm=result.step_norm if status == "accepted" else 0.0,
            cg_iterations=iterations[0],
            lanczos_iterations=iterations[1],
            boundary=result.boundary,
            negative_curvature=result.negative_curvature,
            n_grad=1,
            n_hvp=n_hvp,
            n_loss=n_loss,
            backprops=BACKPROP_COST["gradient"] + BACKPROP_COST["hvp"] * n_hvp + BACKPROP_COST["loss"] * n_loss,
            total_backprops=self.total_backprops,
        )
        return loss_t.detach()


def _cached_hvp(params: list[Tensor], graph: list[Tensor | None]) -> Callable[[Tensor], Tensor]:
    """Hv by a double backward through the gradient graph built once for this step (kept between products)."""
    live = [i for i, g in enumerate(graph) if g is not None and g.requires_grad]
    outputs = [g for g in graph if g is not None and g.requires_grad]

    def hvp(vector: Tensor) -> Tensor:
        if not live:
            return torch.zeros_like(vector)
        pieces = unflatten(vector.to(params[0].dtype), params)
        outs = torch.autograd.grad(
            outputs,
            params,
            grad_outputs=[pieces[i] for i in live],
            retain_graph=True,
            allow_unused=True,
        )
        return flatten([torch.zeros_like(p) if h is None else h for p, h in zip(params, outs)])

    return hvp


def _finite_at_least(value: object, low: float, strict: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return value > low if strict else value >= low


def _check_options(
    radius: float,
    max_radius: float,
    accept: float,
    expand: float,
    expand_factor: float,
    shrink_factor: float,
    beta: float,
    eps: float,
    krylov_tol: float,
) -> None:
    """Fail at construction, saying what was wrong and what is allowed."""
    if not _finite_at_least(radius, 0.0, strict=True):
        raise ValueError(f"radius must be a positive finite number; got {radius!r}")
    if not _finite_at_least(max_radius, 0.0, strict=True) or max_radius < radius:
        raise ValueError(f"max_radius must be finite and >= radius ({radius}); got {max_radius!r}")
    if not (_finite_at_least(accept, 0.0, strict=True) and _finite_at_least(expand, 0.0) and accept <= expand < 1):
        raise ValueError(
            "need 0 < accept_threshold <= expand_threshold < 1 (rho thresholds); "
            f"got accept_threshold={accept!r}, expand_threshold={expand!r}"
        )
    if not _finite_at_least(expand_factor, 1.0):
        raise ValueError(f"expand_factor must be a finite number >= 1; got {expand_factor!r}")
    if not _finite_at_least(shrink_factor, 1.0, strict=True):
        raise ValueError(f"shrink_factor must be a finite number > 1 (it divides the radius); got {shrink_factor!r}")
    if not (_finite_at_least(beta, 0.0) and beta < 1.0):
        raise ValueError(f"beta must be in [0, 1); got {beta!r}")
    if not _finite_at_least(eps, 0.0, strict=True):
        raise ValueError(f"eps must be a positive finite number (it keeps the norm positive definite); got {eps!r}")
    if not _finite_at_least(krylov_tol, 0.0, strict=True):
        raise ValueError(f"krylov_tol must be a positive finite number; got {krylov_tol!r}")


__all__ = ["BACKPROP_COST", "DEFAULT_RADIUS", "TrustRegion", "TrustRegionStats"]
