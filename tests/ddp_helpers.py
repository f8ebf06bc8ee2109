"""Module-level helpers for the ddp_spawn tests: ddp_spawn pickles the Trainer, so nothing here may be a closure."""

from __future__ import annotations

import json
import os
from argparse import Namespace
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger
from torch.utils.data import DataLoader

from lightning_models import make_data


class RankRecordingLogger(Logger):
    """Records every ``log_metrics`` call on *every* rank, one JSON line per call in ``rank{r}.jsonl``.

    Lightning's own loggers are ``rank_zero_only``, so they cannot show that another rank logged
    too; this one does not filter, so a metric logged by rank 1 shows up in ``rank1.jsonl``.
    """

    def __init__(self, directory: str) -> None:
        super().__init__()
        self.directory = directory

    @property
    def name(self) -> str:
        return "rank_recorder"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        return None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        os.makedirs(self.directory, exist_ok=True)
        with open(os.path.join(self.directory, f"rank{rank}.jsonl"), "a") as fh:
            fh.write(json.dumps({"step": step, "metrics": {k: float(v) for k, v in metrics.items()}}) + "\n")


def ddp_train_loader(n: int = 192, batch_size: int = 32) -> DataLoader:
    """``lightning_models.train_loader`` without its ``torch.Generator``.

    Under ddp_spawn the loader is pickled into the workers, and with torch's default
    ``file_descriptor`` sharing strategy a pickled ``torch.Generator`` fails to rebuild in the
    child here (``RuntimeError: unable to resize file <filename not specified> to the right size``).
    DDP swaps the sampler for a seeded ``DistributedSampler`` anyway, so the shuffle stays deterministic.
    """
    return DataLoader(make_data(n, seed=0), batch_size=batch_size, shuffle=True)


class DestroyProcessGroupAtTeardown(pl.Callback):
    """Tear the gloo process group down inside each ddp_spawn worker, before the interpreter exits.

    Left alive, it is finalised during interpreter shutdown, where (about one run in five here)
    a still-joinable native thread makes the worker abort with "terminate called without an
    active exception" after training has finished. Lightning uses no collective after teardown.
    """

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def rank_one_fails_loss(module: pl.LightningModule, batch: Any) -> torch.Tensor:
    """The probe loss, failing on rank 1 only: out of memory at step 0, a NaN at step 2, fine from step 4.

    Rank 0 computes normally all along, so it would wait in the next all-reduce for a rank 1 that
    has left the measurement, unless the failure is agreed on.
    """
    x, y = batch
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    step = module.trainer.global_step
    if rank == 1 and step == 0:
        raise torch.OutOfMemoryError("injected: rank 1 ran out of memory")
    loss = torch.nn.functional.cross_entropy(module(x), y)
    if rank == 1 and step == 2:
        return loss * float("nan")
    return loss
