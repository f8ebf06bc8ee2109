"""The monitor's probe set: captured from training or loaded from a loader, stored in checkpoints, restored per rank.

Reaches Lightning only through the ``trainer`` it is handed (rank, world size, the batch pipeline).

- Captured probes are copies of the first ``probe_batches`` training batches each process sees.
- In a checkpoint they are stored as ``weights_only``-loadable data
  (:mod:`lightning_hessian._batch_codec`); a batch type that cannot be stored is re-captured after
  the resume, with a message.
- Under DDP rank zero writes the checkpoint, so it gathers every rank's shard once, when the probe
  is complete; after a resume each rank takes its own shard again (re-split if the world size
  changed: the objective is the mean over all shards, so any split gives the same operator).
- A run too short to fill the probe (``limit_train_batches``, ``fast_dev_run``, ``max_steps``) is
  measured with what was captured, and says so once.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from lightning_utilities.core.rank_zero import rank_zero_info

from lightning_hessian._batch_codec import UnsupportedBatchError, decode, encode_batches
from lightning_hessian._probe import detached_copy, load_probe_dataloader, to_device


class ProbeSet:
    """This process's probe batches and how they reach a checkpoint and come back from one."""

    def __init__(self, loader: Iterable[Any] | None, n_batches: int, label: str) -> None:
        self.loader = loader
        self.n_batches = n_batches
        self.label = label
        self.reset()

    def reset(self) -> None:
        self.batches: list[Any] = []
        self.from_training = False
        self.settled = False  # an incomplete captured probe accepted as it is
        self._encoded: list[Any] | None = None
        self._note: str | None = None
        self._shards: list[list[Any]] | None = None  # every rank's encoded shard (rank zero, DDP)
        self._restored: dict[str, Any] | None = None

    @property
    def complete(self) -> bool:
        if self.loader is not None or self.settled:
            return bool(self.batches)
        return len(self.batches) >= self.n_batches

    # ------------------------------------------------------------------ filling
    def load(self, trainer: Any, pl_module: Any) -> None:
        """At fit start: the user's loader through the batch pipeline, or this rank's share of a checkpoint's probe."""
        if self.loader is not None:
            self.batches = load_probe_dataloader(self.loader, trainer, pl_module)
            self.from_training = False
        elif self._restored is not None:
            self._restore(trainer, pl_module, self._restored)
        self._restored = None

    def capture(self, trainer: Any, batch: Any) -> bool:
        """Keep a copy of a training batch; True when this one completed the probe set."""
        if self.loader is not None or self.complete:
            return False
        self.batches.append(detached_copy(batch))
        self.from_training = True
        if self.complete:
            self._captured(trainer)
            return True
        return False

    def settle(self, trainer: Any, where: str) -> str | None:
        """Accept an incomplete captured probe (short runs); returns the message to warn with, once."""
        if self.loader is not None or self.complete or self.settled:
            return None
        if not self.batches:
            return (
                f"HessianMonitor({self.label}): nothing was measured: no training batch was seen to capture a probe "
                "set from. Pass probe_dataloader=... to measure anyway."
            )
        self.settled = True
        self._captured(trainer)
        n = len(self.batches)
        return (
            f"HessianMonitor({self.label}): the run reached {where} after only {n} of probe_batches={self.n_batches} "
            f"batches (limit_train_batches, fast_dev_run or max_steps cut it short); measuring with those {n}. Lower "
            "probe_batches or pass probe_dataloader=... to choose the probe set."
        )

    def _captured(self, trainer: Any) -> None:
        """Encode for checkpoints; under DDP rank zero collects every rank's shard (one matched collective:
        the probe completes at the same batch on every rank)."""
        self._encode()
        world = int(trainer.world_size)
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * world
            torch.distributed.all_gather_object(gathered, self._encoded)
            complete = all(g is not None for g in gathered)
            self._shards = gathered if complete and trainer.is_global_zero else None

    def _encode(self) -> None:
        try:
            self._encoded, self._note = encode_batches(self.batches), None
        except UnsupportedBatchError as err:
            self._encoded, self._note = None, str(err)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The captured probe as ``weights_only``-loadable data, or a note why it is not stored."""
        if self._restored is not None:  # loaded, not yet used by a fit: hand it back unchanged
            return dict(self._restored["raw"])
        if not self.from_training or not self.complete:
            return {"probe": []}
        if self._encoded is None and self._note is None:
            self._encode()
        if self._encoded is None:
            return {"probe": [], "probe_note": self._note}
        return {"probe": self._encoded, "probe_shards": self._shards, "probe_settled": self.settled}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restored = {
            "raw": {k: v for k, v in state.items() if k.startswith("probe")},
            "probe": list(state.get("probe", [])),
            "shards": state.get("probe_shards"),
            "note": state.get("probe_note"),
            "settled": state.get("probe_settled", False),
        }

    def _restore(self, trainer: Any, pl_module: Any, stored: dict[str, Any]) -> None:
        shards = stored.get("shards") or ([stored["probe"]] if stored.get("probe") else [])
        rank, world = int(trainer.global_rank), int(trainer.world_size)
        reason = stored.get("note")
        mine: list[Any] = []
        if shards:
            if len(shards) != world:
                every = [b for shard in shards for b in shard]
                shards = [every[r::world] for r in range(world)]
            mine = list(shards[rank])
            if not all(shards):
                mine, reason = [], f"the checkpoint's probe set has fewer batches than the {world} processes"
        if mine:
            try:
                self.batches = [to_device(decode(b), pl_module.device) for b in mine]
                self.from_training = True
                self.settled = bool(stored.get("settled", False))
                self._encoded, self._note = mine, None
                self._shards = [list(s) for s in shards] if world > 1 else None
                return
            except Exception as err:  # a batch class that no longer imports
                reason = f"its probe batches could not be rebuilt ({type(err).__name__}: {err})"
        if reason:
            rank_zero_info(
                f"HessianMonitor({self.label}): the probe set is captured again from the next training batches "
                f"after the resume: {reason}. Measurements after the resume use different probe batches."
            )
        self.batches, self.from_training, self._shards = [], False, None
