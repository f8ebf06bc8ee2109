"""Test models with independent ground truth (dense Hessians from torch.func.hessian in float64)."""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call


def ce_loss(model: nn.Module, batch: Any) -> Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def dict_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return nn.functional.mse_loss(model(batch["inputs"]), batch["targets"])


class DictModel(nn.Module):
    """A regression model with LayerNorm, fed dict batches."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 24), nn.LayerNorm(24), nn.Tanh(), nn.Linear(24, 2))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class QuadraticModel(nn.Module):
    """loss(theta) = 0.5 (theta - c)' A (theta - c): the Hessian is A, whatever theta is."""

    def __init__(self, eigenvalues: np.ndarray, seed: int = 0) -> None:
        super().__init__()
        n = len(eigenvalues)
        gen = np.random.default_rng(seed)
        q, _ = np.linalg.qr(gen.standard_normal((n, n)))
        a = (q * eigenvalues) @ q.T
        self.register_buffer("a", torch.tensor((a + a.T) / 2, dtype=torch.float64))
        self.register_buffer("c", torch.tensor(gen.standard_normal(n), dtype=torch.float64))
        self.theta = nn.Parameter(torch.zeros(n, dtype=torch.float64))

    def forward(self, _: Any) -> Tensor:
        d = self.theta - self.c
        return 0.5 * d @ (self.a @ d)


def quadratic_loss(model: nn.Module, batch: Any) -> Tensor:
    return model(batch)


@dataclass
class Case:
    name: str
    model: nn.Module
    loss_fn: Callable[[nn.Module, Any], Tensor]
    batches: list[Any]


def tanh_mlp_case(seed: int = 0) -> Case:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 4))
    x, y = torch.randn(96, 8), torch.randint(0, 4, (96,))
    # Unequal batch sizes: the objective must weight by sample count, not per batch.
    return Case("tanh_mlp", model, ce_loss, [(x[:64], y[:64]), (x[64:], y[64:])])


def bn_cnn_case(seed: int = 0) -> Case:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    )
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x, y = torch.randn(48, 1, 8, 8), torch.randint(0, 3, (48,))
    return Case("bn_cnn", model, ce_loss, [(x[:32], y[:32]), (x[32:], y[32:])])


def dict_case(seed: int = 0) -> Case:
    torch.manual_seed(seed)
    model = DictModel()
    x, t = torch.randn(40, 6), torch.randn(40, 2)
    return Case(
        "dict_batches", model, dict_loss, [{"inputs": x[:25], "targets": t[:25]}, {"inputs": x[25:], "targets": t[25:]}]
    )


ALL_CASES = [tanh_mlp_case, bn_cnn_case, dict_case]


def _to_double(batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return batch.double() if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: _to_double(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_double(b) for b in batch)
    return batch


def batch_size(batch: Any) -> int:
    first = batch["inputs"] if isinstance(batch, dict) else batch[0]
    return int(first.shape[0])


_DENSE_CACHE: dict[tuple[Any, ...], Tensor] = {}


def dense_hessian(case: Case, names: Sequence[str] | None = None) -> Tensor:
    """Memoised :func:`compute_dense_hessian`, keyed by the case, the names and the parameter values."""
    key = (
        case.name,
        None if names is None else tuple(names),
        tuple(float(p.detach().double().sum()) for p in case.model.parameters()),
    )
    if key not in _DENSE_CACHE:
        _DENSE_CACHE[key] = compute_dense_hessian(case, names)
    return _DENSE_CACHE[key]


def compute_dense_hessian(case: Case, names: Sequence[str] | None = None) -> Tensor:
    """Exact float64 Hessian of the sample-weighted mean loss, in eval mode, over ``names`` (default: all).

    Built with ``torch.func.hessian``, except for models with LayerNorm: there torch 2.13's
    ``torch.func`` returns a wrong, non-symmetric Hessian (off by 0.19 against float64 finite
    differences on a 3-5-1 net), so ``torch.autograd.functional.hessian`` (one reverse-over-reverse
    pass per column, agreeing with finite differences to 3e-10) is used instead.
    """
    model = copy.deepcopy(case.model).double().eval()
    all_names = [n for n, p in model.named_parameters() if p.requires_grad]
    names = list(all_names if names is None else names)
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    batches = [_to_double(b) for b in case.batches]
    weights = [batch_size(b) if not isinstance(case.model, QuadraticModel) else 1 for b in case.batches]

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, batch: Any) -> Tensor:
            return case.loss_fn(self.model, batch)

    wrapper = Wrapper()

    def f(flat: Tensor) -> Tensor:
        values = {"model." + n: t.view(s) for n, t, s in zip(names, flat.split(sizes), shapes)}
        total = sum(w * functional_call(wrapper, values, (b,)) for w, b in zip(weights, batches))
        return total / sum(weights)

    theta = torch.cat([params[n].detach().reshape(-1) for n in names])
    if any(isinstance(m, nn.LayerNorm) for m in model.modules()):
        return torch.autograd.functional.hessian(f, theta)  # type: ignore[no-any-return]
    return torch.func.hessian(f)(theta)


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything an analysis must leave untouched."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "modes": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "torch_rng": torch.get_rng_state().clone(),
        "numpy_rng": np.random.get_state()[1].copy(),
        "python_rng": random.getstate(),
    }


def assert_untouched(before: dict[str, Any], model: nn.Module) -> None:
    after = snapshot(model)
    for n, p in before["params"].items():
        assert torch.equal(p, after["params"][n]), f"parameter {n} changed"
    for n, g in before["grads"].items():
        if g is None:
            assert after["grads"][n] is None, f".grad of {n} was created"
        else:
            assert torch.equal(g, after["grads"][n]), f".grad of {n} changed"
    for n, b in before["buffers"].items():
        assert torch.equal(b, after["buffers"][n]), f"buffer {n} changed"
    assert before["modes"] == after["modes"], "a submodule's train/eval mode changed"
    assert before["requires_grad"] == after["requires_grad"], "requires_grad changed"
    assert torch.equal(before["torch_rng"], after["torch_rng"]), "global torch RNG advanced"
    assert np.array_equal(before["numpy_rng"], after["numpy_rng"]), "global NumPy RNG advanced"
    assert before["python_rng"] == after["python_rng"], "global Python RNG advanced"
