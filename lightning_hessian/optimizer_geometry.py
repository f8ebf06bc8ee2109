"""The geometry an optimizer imposes, read from its state: per-coordinate step scales, stability constants, next update.

Adaptive methods step ``theta <- theta - lr * P^{-1} m`` with a diagonal preconditioner ``P``
(Adam's ``sqrt(v_hat) + eps``, RMSprop's ``sqrt(v) + eps``, Adagrad's ``sqrt(sum) + eps``; ``P = I``
for SGD) and some momentum ``m`` of the gradient. On a quadratic with Hessian ``H`` and a frozen
``P``, the iteration is stable while the top eigenvalue of ``D^{1/2} H D^{1/2}``, with the
*step scale* ``D = lr_eff / P`` per coordinate, stays below a dimensionless constant ``k`` fixed
by the momentum rule (the linear recurrence's Jury conditions):

===========================================  =======================================
rule                                          ``k``
===========================================  =======================================
gradient descent, Adagrad, RMSprop            ``2``
heavy ball (torch SGD), momentum ``b``,       ``(2 + 2 b) / (1 - dampening)``
dampening
Nesterov (torch SGD), momentum ``b``,         ``(2 + 2 b) / (1 + b + b (1 - dampening))``,
dampening                                     ``(2 + 2 b) / (1 + 2 b)`` without dampening
RMSprop with momentum ``b``                   ``2 + 2 b``
Adam / AdamW, ``beta1``                       ``(2 + 2 beta1) / (1 - beta1)`` (38 at 0.9)
===========================================  =======================================

Adam's ``lr_eff = lr / (1 - beta1^t)`` folds the first-moment bias correction into the step
(Cohen et al. 2022's ``P_t = (1 - beta1^t)(sqrt(v_hat) + eps)``); Adagrad's folds in its
``lr_decay``; elsewhere ``lr_eff = lr``. The state is the one the last step left (``t`` steps,
``v_t``): the next step's preconditioner also depends on the next gradient, unknown here.

Nothing here writes to an optimizer: state tensors are read with out-of-place operations only,
``optimizer.state`` is looked up with ``.get`` (its ``defaultdict`` would otherwise grow), and no
result holds a reference to a state tensor. Coupled weight decay (``weight_decay`` of SGD, Adam,
RMSprop, Adagrad) adds ``weight_decay`` to every curvature and decoupled decay (AdamW) shrinks
the step by ``1 - lr * weight_decay``; neither is part of the stability operator (both are tiny
next to the curvatures at the edge), but :func:`next_update` includes both in the update.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_hessian.objective import Objective

Rule = Literal["sgd", "heavy_ball", "nesterov", "adam", "rmsprop", "adagrad"]
Status = Literal["ok", "unsupported", "no_state", "degenerate"]
OptimizerLike = Any  # a torch.optim.Optimizer, a wrapper with an ``.optimizer`` attribute, or a sequence of them

SUPPORTED = (
    "torch.optim.SGD (plain, heavy-ball or Nesterov momentum), Adam, AdamW (amsgrad included), "
    "RMSprop (plain, centered, with momentum) and Adagrad"
)


class GeometryUnavailableError(ValueError):
    """The optimizer's geometry cannot be read (unsupported optimizer, no state yet, degenerate preconditioner)."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


@dataclass(frozen=True)
class GroupGeometry:
    """One parameter group as the stability analysis sees it.

    Attributes:
        optimizer: class name of the optimizer holding the group.
        index: position of the group in that optimizer's ``param_groups``.
        rule: the update rule (``"sgd"``, ``"heavy_ball"``, ``"nesterov"``, ``"adam"``, ``"rmsprop"``,
            ``"adagrad"``).
        lr: the group's learning rate.
        momentum: heavy-ball / Nesterov / RMSprop momentum, Adam's ``beta1``; 0 without momentum.
        threshold_constant: ``k``: the group is stable while ``lambda_max(D^{1/2} H D^{1/2}) < k``.
        names: the selected parameters in the group, in flat order.
        numel: number of selected scalar parameters in the group.
        step: the largest step count in the group's state (``None`` for stateless SGD).
    """

    optimizer: str
    index: int
    rule: Rule
    lr: float
    momentum: float
    threshold_constant: float
    names: tuple[str, ...]
    numel: int
    step: int | None

    @property
    def threshold(self) -> float:
        """The classic threshold on the (preconditioned) sharpness: ``k / lr`` (2/lr for GD, 38/lr for Adam)."""
        return self.threshold_constant / self.lr if self.lr > 0 else math.inf


@dataclass(frozen=True)
class Preconditioner:
    """The optimizer's per-coordinate geometry for an objective's parameters (flat, in its order).

    Attributes:
        status: ``"ok"``; ``"unsupported"`` (an optimizer or option this module does not model);
            ``"no_state"`` (an adaptive optimizer has not stepped yet, so it has no preconditioner);
            ``"degenerate"`` (a zero preconditioner entry, e.g. ``eps=0`` with a zero second moment).
        message: what is wrong when the status is not ``"ok"`` (empty otherwise).
        inverse_preconditioner: ``1 / P`` (ones for SGD), objective's dtype and device.
        effective_lr: ``lr_eff`` per coordinate (0 where no optimizer steps the parameter).
        threshold_constant: ``k`` per coordinate (1 where no optimizer steps the parameter).
        groups: the parameter groups holding selected parameters.
        untracked: selected parameters no optimizer updates (step scale 0).
        without_state: selected parameters of an adaptive optimizer with no state yet (step scale 0).
    """

    status: Status
    message: str
    inverse_preconditioner: Tensor | None
    effective_lr: Tensor | None
    threshold_constant: Tensor | None
    groups: tuple[GroupGeometry, ...]
    untracked: tuple[str, ...] = ()
    without_state: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when the geometry is available."""
        return self.status == "ok"

    @property
    def step_scale(self) -> Tensor:
        """``D = lr_eff / P``: the optimizer's momentum-free step is ``-D * g``."""
        return self._need(self.effective_lr) * self._need(self.inverse_preconditioner)

    @property
    def stability_scale(self) -> Tensor:
        """``D / k``: the top eigenvalue of ``(D/k)^{1/2} H (D/k)^{1/2}`` is the stability ratio (edge at 1)."""
        return self.step_scale / self._need(self.threshold_constant)

    @property
    def reference(self) -> GroupGeometry:
        """The group holding the most selected parameters: its ``lr`` and ``k`` express mixed groups in one unit."""
        if not self.groups:
            raise ValueError(f"no geometry ({self.status}): {self.message}")
        return max(self.groups, key=lambda g: g.numel)  # first of equals

    def _need(self, t: Tensor | None) -> Tensor:
        if t is None:
            raise ValueError(f"the optimizer geometry is not available ({self.status}): {self.message}")
        return t


@dataclass(frozen=True)
class _GroupRule:
    """The hyperparameters of one group that the geometry needs (plain floats, nothing from the state)."""

    optimizer: str
    index: int
    rule: Rule
    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    beta2: float = 0.0
    eps: float = 0.0
    weight_decay: float = 0.0
    decoupled: bool = False
    amsgrad: bool = False
    centered: bool = False
    lr_decay: float = 0.0

    @property
    def adaptive(self) -> bool:
        return self.rule in ("adam", "rmsprop", "adagrad")

    @property
    def threshold_constant(self) -> float:
        b, tau = self.momentum, self.dampening
        if self.rule == "heavy_ball":
            return (2 + 2 * b) / (1 - tau) if tau < 1 else math.inf
        if self.rule == "nesterov":
            return (2 + 2 * b) / (1 + b + b * (1 - tau))
        if self.rule == "adam":
            return (2 + 2 * b) / (1 - b)
        if self.rule == "rmsprop":
            return 2 + 2 * b
        return 2.0


def _float(x: Any) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def _rule(optimizer: torch.optim.Optimizer, index: int, group: dict[str, Any]) -> _GroupRule | str:
    """The group's rule, or the reason it is not modelled."""
    name = type(optimizer).__name__
    if group.get("maximize", False):
        return f"{name} with maximize=True (ascent) is not modelled"
    lr = _float(group["lr"])
    wd = _float(group.get("weight_decay", 0.0))
    kind = type(optimizer)  # exact types: a subclass may change the update rule
    if kind in (torch.optim.Adam, torch.optim.AdamW):
        decoupled = bool(group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW)))
        beta1, beta2 = (_float(b) for b in group["betas"])
        return _GroupRule(
            name, index, "adam", lr, momentum=beta1, beta2=beta2, eps=_float(group["eps"]), weight_decay=wd,
            decoupled=decoupled, amsgrad=bool(group.get("amsgrad", False)),
        )  # fmt: skip
    if kind is torch.optim.RMSprop:
        return _GroupRule(
            name, index, "rmsprop", lr, momentum=_float(group.get("momentum", 0.0)), beta2=_float(group["alpha"]),
            eps=_float(group["eps"]), weight_decay=wd, centered=bool(group.get("centered", False)),
        )  # fmt: skip
    if kind is torch.optim.Adagrad:
        return _GroupRule(
            name, index, "adagrad", lr, eps=_float(group["eps"]), weight_decay=wd,
            lr_decay=_float(group.get("lr_decay", 0.0)),
        )  # fmt: skip
    if kind is torch.optim.SGD:
        momentum = _float(group.get("momentum", 0.0))
        rule: Rule = "sgd" if momentum == 0 else ("nesterov" if group.get("nesterov", False) else "heavy_ball")
        return _GroupRule(
            name, index, rule, lr, momentum=momentum, dampening=_float(group.get("dampening", 0.0)), weight_decay=wd
        )
    return f"{name} is not supported (supported: {SUPPORTED})"


def unwrap_optimizers(optimizer: OptimizerLike) -> list[torch.optim.Optimizer]:
    """One or several optimizers; wrappers exposing ``.optimizer`` (e.g. Lightning's) are unwrapped."""
    items = list(optimizer) if isinstance(optimizer, Sequence) else [optimizer]
    if not items:
        raise ValueError("no optimizer given")
    out = []
    for item in items:
        inner = item
        while not isinstance(inner, torch.optim.Optimizer) and hasattr(inner, "optimizer"):
            inner = inner.optimizer
        if not isinstance(inner, torch.optim.Optimizer):
            raise TypeError(f"expected a torch.optim.Optimizer (or a sequence of them), got {type(item).__name__}")
        out.append(inner)
    return out


def _owners(
    optimizers: list[torch.optim.Optimizer],
) -> dict[int, tuple[torch.optim.Optimizer, int, dict[str, Any]]]:
    """Parameter identity -> (optimizer, group index, group); a parameter held twice is a user error."""
    owners: dict[int, tuple[torch.optim.Optimizer, int, dict[str, Any]]] = {}
    for opt in optimizers:
        for gi, group in enumerate(opt.param_groups):
            for p in group["params"]:
                if id(p) in owners:
                    raise ValueError(
                        f"a parameter is held by two parameter groups ({type(owners[id(p)][0]).__name__} group "
                        f"{owners[id(p)][1]} and {type(opt).__name__} group {gi}); its step is ambiguous"
                    )
                owners[id(p)] = (opt, gi, group)
    return owners


def _selected(objective: Objective) -> list[tuple[str, Tensor]]:
    params = dict(objective.model.named_parameters())
    return [(n, params[n]) for n in objective.param_names]


def _step_count(state: dict[str, Any]) -> int:
    step = state.get("step")
    return 0 if step is None else int(_float(step))


def _preconditioner_of(rule: _GroupRule, state: dict[str, Any] | None) -> tuple[Tensor, float] | None:
    """``(P, lr_eff)`` for one parameter in float64, or ``None`` when an adaptive method has no state yet."""
    if not rule.adaptive:
        return None
    if not state:
        return None
    t = _step_count(state)
    if t < 1:
        return None
    if rule.rule == "adam":
        key = "max_exp_avg_sq" if rule.amsgrad else "exp_avg_sq"
        v = state[key].detach().to(torch.float64)
        p = (v / (1 - rule.beta2**t)).sqrt() + rule.eps
        return p, rule.lr / (1 - rule.momentum**t) if rule.momentum > 0 else rule.lr
    if rule.rule == "rmsprop":
        v = state["square_avg"].detach().to(torch.float64)
        if rule.centered:
            mean = state["grad_avg"].detach().to(torch.float64)
            v = (v - mean * mean).clamp(min=0.0)
        return v.sqrt() + rule.eps, rule.lr
    total = state["sum"].detach().to(torch.float64)  # adagrad
    return total.sqrt() + rule.eps, rule.lr / (1 + (t - 1) * rule.lr_decay)


def read_preconditioner(objective: Objective, optimizer: OptimizerLike) -> Preconditioner:
    """The optimizer's preconditioner, effective learning rates and stability constants for ``objective``'s parameters.

    Parameters are matched by identity (``objective.model``'s parameter objects against the
    optimizers' ``param_groups``). Never changes the optimizer. Unsupported optimizers and
    adaptive ones that have not stepped yet give a result whose ``status`` says so (the tensors are
    ``None``); configuration errors (a parameter in two groups, not an optimizer) raise.
    """
    optimizers = unwrap_optimizers(optimizer)
    owners = _owners(optimizers)
    rules: dict[tuple[int, int], _GroupRule] = {}
    for _, p in _selected(objective):
        if id(p) not in owners:
            continue
        opt, gi, group = owners[id(p)]
        key = (id(opt), gi)
        if key not in rules:
            rule = _rule(opt, gi, group)
            if isinstance(rule, str):
                return Preconditioner("unsupported", rule, None, None, None, ())
            rules[key] = rule
    inv_parts, lr_parts, k_parts = [], [], []
    untracked, without_state = [], []
    members: dict[tuple[int, int], list[tuple[str, int, int]]] = {}
    for name, p in _selected(objective):
        n = p.numel()
        if id(p) not in owners:
            untracked.append(name)
            inv_parts.append(torch.ones(n, dtype=torch.float64, device=p.device))
            lr_parts.append(torch.zeros(n, dtype=torch.float64, device=p.device))
            k_parts.append(torch.ones(n, dtype=torch.float64, device=p.device))
            continue
        opt, gi, _ = owners[id(p)]
        rule = rules[(id(opt), gi)]
        state = opt.state.get(p)
        members.setdefault((id(opt), gi), []).append((name, n, _step_count(state) if state else 0))
        found = _preconditioner_of(rule, state)
        if rule.adaptive and found is None:
            without_state.append(name)
            inv, lr_eff = torch.ones(n, dtype=torch.float64, device=p.device), 0.0
        elif found is None:
            inv, lr_eff = torch.ones(n, dtype=torch.float64, device=p.device), rule.lr
        else:
            inv, lr_eff = 1.0 / found[0].reshape(-1).to(p.device), found[1]
        inv_parts.append(inv)
        lr_parts.append(torch.full((n,), lr_eff, dtype=torch.float64, device=p.device))
        k_parts.append(torch.full((n,), rule.threshold_constant, dtype=torch.float64, device=p.device))
    groups = tuple(
        GroupGeometry(
            optimizer=rule.optimizer,
            index=rule.index,
            rule=rule.rule,
            lr=rule.lr,
            momentum=rule.momentum,
            threshold_constant=rule.threshold_constant,
            names=tuple(m[0] for m in members[key]),
            numel=sum(m[1] for m in members[key]),
            step=max(m[2] for m in members[key]) if rule.adaptive else None,
        )
        for key, rule in rules.items()
    )
    if not groups:
        return Preconditioner("unsupported", "no selected parameter is held by the optimizer(s)", None, None, None, ())
    adaptive = [name for g in groups if g.rule in ("adam", "rmsprop", "adagrad") for name in g.names]
    if adaptive and len(without_state) == len(adaptive):
        return Preconditioner(
            "no_state",
            "the optimizer has no state for these parameters yet (it has not taken a step): "
            "there is no preconditioner before the first step",
            None, None, None, groups, tuple(untracked), tuple(without_state),
        )  # fmt: skip
    dtype, device = objective.dtype, objective.device
    inverse = torch.cat([t.to(device) for t in inv_parts])
    if not bool(torch.isfinite(inverse).all()):
        return Preconditioner(
            "degenerate",
            "the preconditioner has zero entries (eps=0 and a zero second moment): the step scale is infinite",
            None, None, None, groups, tuple(untracked), tuple(without_state),
        )  # fmt: skip
    return Preconditioner(
        status="ok",
        message="",
        inverse_preconditioner=inverse.to(dtype),
        effective_lr=torch.cat([t.to(device) for t in lr_parts]).to(dtype),
        threshold_constant=torch.cat([t.to(device) for t in k_parts]).to(dtype),
        groups=groups,
        untracked=tuple(untracked),
        without_state=tuple(without_state),
    )


def stability_threshold(optimizer: OptimizerLike, group: int | None = None) -> float:
    """The sharpness at which the optimizer's iteration on a quadratic turns unstable: ``k / lr``.

    ``2 / lr`` for gradient descent, ``(2 + 2 b) / lr`` for heavy-ball momentum ``b``,
    ``(2 + 2 b) / ((1 + 2 b) lr)`` for Nesterov, ``(2 + 2 beta1) / ((1 - beta1) lr)`` for Adam (38/lr
    at ``beta1 = 0.9``), compared with ``lambda_max(H)`` for SGD and with
    ``lambda_max(P^{-1/2} H P^{-1/2})`` for adaptive methods. ``group`` picks a parameter group of a
    single optimizer; by default the group with the most parameter entries across all optimizers.
    Raises ``ValueError`` for optimizers this module does not model.
    """
    optimizers = unwrap_optimizers(optimizer)
    if group is not None:
        if len(optimizers) != 1:
            raise ValueError("group= picks a group of a single optimizer; pass one optimizer")
        groups = optimizers[0].param_groups
        if not 0 <= group < len(groups):
            raise ValueError(f"group={group} but the optimizer has {len(groups)} parameter group(s)")
        candidates = [(optimizers[0], group, groups[group])]
    else:
        candidates = [(opt, gi, g) for opt in optimizers for gi, g in enumerate(opt.param_groups)]
    opt, gi, chosen = max(candidates, key=lambda c: sum(p.numel() for p in c[2]["params"]))
    rule = _rule(opt, gi, chosen)
    if isinstance(rule, str):
        raise ValueError(rule)
    return rule.threshold_constant / rule.lr if rule.lr > 0 else math.inf


def reference_lr(objective: Objective, optimizer: OptimizerLike) -> float:
    """Learning rate of the parameter group holding the most of ``objective``'s parameters (any optimizer type)."""
    owners = _owners(unwrap_optimizers(optimizer))
    sizes: dict[tuple[int, int], tuple[float, int]] = {}
    for _, p in _selected(objective):
        if id(p) in owners:
            opt, gi, group = owners[id(p)]
            lr, count = sizes.get((id(opt), gi), (_float(group["lr"]), 0))
            sizes[(id(opt), gi)] = (lr, count + p.numel())
    if not sizes:
        raise ValueError("no selected parameter is held by the optimizer(s)")
    return max(sizes.values(), key=lambda s: s[1])[0]


@dataclass(frozen=True)
class NextUpdate:
    """The displacement the optimizer's next step would make, given a gradient, without stepping.

    Attributes:
        status: ``"ok"`` or ``"unsupported"`` (then ``displacement`` is ``None`` and ``message`` says why).
        message: the reason when not ``"ok"``.
        displacement: ``theta_next - theta`` (flat, objective order; 0 for parameters no optimizer holds).
        reference_lr: the ``lr`` of the group holding the most selected parameters.
    """

    status: Status
    message: str
    displacement: Tensor | None
    reference_lr: float


def next_update(objective: Objective, optimizer: OptimizerLike, gradient: Tensor) -> NextUpdate:
    """What ``optimizer.step()`` would add to the parameters if the gradient were ``gradient``.

    Replays the update rule on copies: momentum buffers and moment estimates advanced by one step
    with ``gradient``, bias corrections for step ``t + 1``, AMSGrad's maximum, centering, weight
    decay (coupled and decoupled), Nesterov. Adam and RMSprop without state take their first step
    from zero moments, exactly as ``step()`` would. The optimizer is not changed.
    """
    if gradient.shape != (objective.num_params,):
        raise ValueError(f"gradient must have shape ({objective.num_params},), got {tuple(gradient.shape)}")
    optimizers = unwrap_optimizers(optimizer)
    owners = _owners(optimizers)
    parts = []
    sizes: dict[tuple[int, int], tuple[float, int]] = {}
    for (_, p), g in zip(_selected(objective), objective.split(gradient)):
        if id(p) not in owners:
            parts.append(torch.zeros(p.numel(), dtype=torch.float64, device=p.device))
            continue
        opt, gi, group = owners[id(p)]
        rule = _rule(opt, gi, group)
        if isinstance(rule, str):
            return NextUpdate("unsupported", rule, None, math.nan)
        lr, count = sizes.get((id(opt), gi), (rule.lr, 0))
        sizes[(id(opt), gi)] = (lr, count + p.numel())
        update = _replay(rule, opt.state.get(p) or {}, p.detach().to(torch.float64), g.detach().to(torch.float64))
        parts.append(update.reshape(-1))
    if not sizes:
        return NextUpdate("unsupported", "no selected parameter is held by the optimizer(s)", None, math.nan)
    reference_lr = max(sizes.values(), key=lambda s: s[1])[0]
    flat = torch.cat([t.to(objective.device) for t in parts]).to(objective.dtype)
    return NextUpdate("ok", "", flat, reference_lr)


def _state64(state: dict[str, Any], key: str, like: Tensor) -> Tensor:
    """A float64 copy of a state tensor (zeros when absent): never the state tensor itself."""
    t = state.get(key)
    if t is None:
        return torch.zeros_like(like)
    copied: Tensor = t.detach().to(dtype=torch.float64, device=like.device, copy=True)
    return copied


def _replay(rule: _GroupRule, state: dict[str, Any], theta: Tensor, grad: Tensor) -> Tensor:
    """One step of ``rule`` on float64 copies; returns the displacement."""
    g = grad + rule.weight_decay * theta if rule.weight_decay and not rule.decoupled else grad
    if rule.rule in ("sgd", "heavy_ball", "nesterov"):
        if rule.rule == "sgd":
            return -rule.lr * g
        buf = state.get("momentum_buffer")
        if buf is None:
            new_buf = g.clone()
        else:
            new_buf = _state64(state, "momentum_buffer", g) * rule.momentum + (1 - rule.dampening) * g
        direction = g + rule.momentum * new_buf if rule.rule == "nesterov" else new_buf
        return -rule.lr * direction
    t = _step_count(state) + 1
    if rule.rule == "adam":
        m = rule.momentum * _state64(state, "exp_avg", g) + (1 - rule.momentum) * g
        v = rule.beta2 * _state64(state, "exp_avg_sq", g) + (1 - rule.beta2) * g * g
        if rule.amsgrad:
            v = torch.maximum(_state64(state, "max_exp_avg_sq", g), v)
        denom = (v / (1 - rule.beta2**t)).sqrt() + rule.eps
        update = -(rule.lr / (1 - rule.momentum**t)) * m / denom
        if rule.weight_decay and rule.decoupled:
            update = update - rule.lr * rule.weight_decay * theta
        return update
    if rule.rule == "rmsprop":
        square = rule.beta2 * _state64(state, "square_avg", g) + (1 - rule.beta2) * g * g
        if rule.centered:
            mean = rule.beta2 * _state64(state, "grad_avg", g) + (1 - rule.beta2) * g
            square = square - mean * mean
        avg = square.clamp(min=0.0).sqrt() + rule.eps
        if rule.momentum > 0:
            return -rule.lr * (rule.momentum * _state64(state, "momentum_buffer", g) + g / avg)
        return -rule.lr * g / avg
    total = _state64(state, "sum", g) + g * g  # adagrad
    clr = rule.lr / (1 + (t - 1) * rule.lr_decay)
    return -clr * g / (total.sqrt() + rule.eps)
