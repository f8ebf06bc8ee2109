"""The callback's probe set and probe loss: fixed batches on the module's device, and how to get a scalar loss."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn


def detached_copy(batch: Any) -> Any:
    """A detached clone of every tensor in ``batch`` (the training loop may reuse or free the original)."""
    return apply_to_collection(batch, Tensor, lambda t: t.detach().clone())


def to_device(batch: Any, device: torch.device) -> Any:
    return apply_to_collection(batch, Tensor, lambda t: t.to(device))


def load_probe_dataloader(loader: Iterable[Any], trainer: Any, pl_module: Any) -> list[Any]:
    """This rank's share of a user probe loader, through the training loop's own batch pipeline.

    Batches go through ``precision_plugin.convert_input``, the module's (and datamodule's)
    ``on_before_batch_transfer`` and ``strategy.batch_to_device``, exactly as training batches do.
    Under DDP rank ``r`` keeps batches ``r, r + W, r + 2W, ...``. Iterating a DataLoader draws
    from the global RNG, so it runs inside ``fork_rng``: the training trajectory is unaffected.
    """
    rank, world = int(trainer.global_rank), int(trainer.world_size)
    devices = [pl_module.device] if pl_module.device.type == "cuda" else []
    before_transfer = getattr(pl_module, "_on_before_batch_transfer", None) or (
        lambda b, idx: pl_module.on_before_batch_transfer(b, idx)
    )
    out = []
    with torch.random.fork_rng(devices=devices), preserved_generators(loader):
        for i, batch in enumerate(loader):
            if i % world != rank:
                continue
            batch = trainer.precision_plugin.convert_input(batch)
            batch = before_transfer(batch, 0)
            out.append(trainer.strategy.batch_to_device(batch, dataloader_idx=0))
    if not out:
        raise ValueError(
            f"probe_dataloader gave no batch for rank {rank} of {world}: it needs at least as many batches "
            "as there are processes (each process measures its share of the probe set)"
        )
    return out


def _loader_generators(loader: Any) -> list[torch.Generator]:
    """The ``torch.Generator`` objects a DataLoader draws from: its own, its sampler's, its batch sampler's."""
    found: list[torch.Generator] = []
    batch_sampler = getattr(loader, "batch_sampler", None)
    for owner in (loader, getattr(loader, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None)):
        gen = getattr(owner, "generator", None)
        if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
            found.append(gen)
    return found


@contextlib.contextmanager
def preserved_generators(loader: Any) -> Iterator[None]:
    """Restore the loader's own generators after iterating it.

    A user may pass the training DataLoader itself as the probe loader; iterating it draws from
    its ``generator=`` (base seed, shuffle order), which would change the training shuffle.
    """
    saved = [(g, g.get_state()) for g in _loader_generators(loader)]
    try:
        yield
    finally:
        for gen, state in saved:
            gen.set_state(state)


def call_hessian_loss(module: nn.Module, batch: Any) -> Tensor:
    """Probe loss from the module's own ``hessian_loss(batch)`` method."""
    return module.hessian_loss(batch)  # type: ignore[operator,no-any-return]


def call_training_step(module: nn.Module, batch: Any) -> Tensor:
    """Probe loss from ``training_step(batch, 0)`` with the module's ``log``/``log_dict`` silenced.

    Only valid under automatic optimization (under manual optimization training_step steps the
    optimizer). Silencing keeps the user's logged metrics exactly as in a run without the probe.
    """
    with silenced_logging(module), preserved_metric_states(module):
        out = module.training_step(batch, 0)  # type: ignore[operator]
    if isinstance(out, Mapping):
        out = out.get("loss")
    if not isinstance(out, Tensor):
        raise ValueError(
            "training_step returned no loss tensor for the probe batch (it must return a Tensor or a dict with "
            "'loss'); pass loss_fn=... to HessianMonitor or define hessian_loss(self, batch) on the module"
        )
    return out


@contextlib.contextmanager
def silenced_logging(module: Any) -> Iterator[None]:
    """Turn ``module.log`` and ``module.log_dict`` into no-ops on this instance, restoring them after."""
    saved = {name: module.__dict__[name] for name in ("log", "log_dict") if name in module.__dict__}

    def _ignore(*args: Any, **kwargs: Any) -> None:
        return None

    module.log = _ignore
    module.log_dict = _ignore
    try:
        yield
    finally:
        for name in ("log", "log_dict"):
            if name in saved:
                module.__dict__[name] = saved[name]
            else:
                module.__dict__.pop(name, None)


def _is_stateful_metric(obj: Any) -> bool:
    """A torchmetrics-style metric: accumulates state in ``update`` (recognised by its interface)."""
    return all(callable(getattr(obj, name, None)) for name in ("update", "compute", "reset")) and isinstance(
        getattr(obj, "_defaults", None), dict
    )


@contextlib.contextmanager
def preserved_metric_states(module: nn.Module) -> Iterator[None]:
    """Restore every stateful metric module (``self.acc = torchmetrics.Accuracy(...)``) after the block.

    The training-step fallback calls the user's ``training_step``, which typically updates such
    metrics (``self.acc(logits, y)``); without this the probe would change the values they log.
    """
    saved = []
    for sub in module.modules():
        if sub is not module and _is_stateful_metric(sub):
            state = {k: copy.deepcopy(v) for k, v in sub.__dict__.items() if _is_data(v)}
            saved.append((sub, state))
    try:
        yield
    finally:
        for sub, state in saved:
            sub.__dict__.update(state)


def _is_data(value: Any) -> bool:
    """Tensors, numbers, strings and containers of them: a metric's state and counters, never its hooks."""
    if isinstance(value, (Tensor, bool, int, float, str, type(None))):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_data(v) for v in value)
    if isinstance(value, dict):
        return all(_is_data(v) for v in value.values())
    return False


def resolve_loss_fn(loss_fn: Callable[[Any, Any], Tensor] | None, pl_module: Any) -> Callable[[nn.Module, Any], Tensor]:
    """The probe loss in order of preference: ``loss_fn``, ``hessian_loss``, then a silenced ``training_step``."""
    if loss_fn is not None:
        return loss_fn
    if callable(getattr(pl_module, "hessian_loss", None)):
        return call_hessian_loss
    if not getattr(pl_module, "automatic_optimization", True):
        raise ValueError(
            f"{type(pl_module).__name__} uses manual optimization, so HessianMonitor cannot call its training_step "
            "(that would step the optimizer). Pass loss_fn=your_loss (a module-level function "
            "loss_fn(pl_module, batch) -> scalar Tensor) or define hessian_loss(self, batch) -> Tensor on the module."
        )
    return call_training_step
