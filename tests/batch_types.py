"""Batch containers users train with (namedtuple, UserDict, a plain class), importable so checkpoints name them."""

from __future__ import annotations

from collections import UserDict, namedtuple
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_models import TanhModule, make_data

XY = namedtuple("XY", ["x", "y"])


class Opaque:
    """A user's own batch class: no container protocol, nothing a weights_only checkpoint can hold."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x = x
        self.y = y


def _collate_namedtuple(items: list[tuple[Tensor, Tensor]]) -> XY:
    return XY(torch.stack([x for x, _ in items]), torch.stack([y for _, y in items]))


def _collate_userdict(items: list[tuple[Tensor, Tensor]]) -> UserDict:
    return UserDict(x=torch.stack([x for x, _ in items]), y=torch.stack([y for _, y in items]))


def _collate_opaque(items: list[tuple[Tensor, Tensor]]) -> Opaque:
    return Opaque(torch.stack([x for x, _ in items]), torch.stack([y for _, y in items]))


COLLATES = {"namedtuple": _collate_namedtuple, "userdict": _collate_userdict, "opaque": _collate_opaque}


def container_loader(kind: str, batch_size: int = 32) -> DataLoader:
    """The tests' training data (unshuffled) as batches of the given container kind."""
    return DataLoader(make_data(192, seed=0), batch_size=batch_size, shuffle=False, collate_fn=COLLATES[kind])


def unpack(batch: Any) -> tuple[Tensor, Tensor]:
    if isinstance(batch, (XY, Opaque)):
        return batch.x, batch.y
    return batch["x"], batch["y"]


def container_loss(module: nn.Module, batch: Any) -> Tensor:
    x, y = unpack(batch)
    return nn.functional.cross_entropy(module(x), y)


class ContainerModule(TanhModule):
    """TanhModule trained on container batches."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return container_loss(self, batch)
