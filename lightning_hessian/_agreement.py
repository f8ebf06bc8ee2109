"""Collectives that never strand a rank: a measurement succeeds or fails on every process together.

Under DDP each ``Objective`` operation all-reduces its result, so every rank must enter the same
collectives in the same order. A rank whose local work raises (a NaN in its probe shard, an
exception in the user's loss, running out of memory) would otherwise leave the measurement while
the others wait in the next all-reduce until the process-group timeout.

The protocol: every payload all-reduce is preceded by a one-element *status* all-reduce (0 from
each rank that is fine). A rank that fails contributes a 1 to the status collective the others
are waiting in, and leaves; they see a non-zero sum, raise :class:`PeerFailedError` and leave too,
without another collective. A rank that finishes its work also enters one final status collective,
so a failure after another rank's last payload collective is still agreed on. Every rank thus
performs exactly the same sequence of collectives and learns the same outcome.

No Lightning here: the caller passes the sum all-reduce of its strategy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

ReduceSum = Callable[[Tensor], Tensor]


class PeerFailedError(RuntimeError):
    """Another process's part of the measurement failed, so this process skips it too."""


class AgreedCollectives:
    """Wraps a sum all-reduce so that a failure on any rank is agreed on by all of them.

    Use :meth:`all_reduce_sum` as the ``Objective``'s ``all_reduce_sum`` and run the whole
    measurement inside :meth:`agreement`.
    """

    def __init__(self, reduce_sum: ReduceSum, device: torch.device) -> None:
        self._reduce_sum = reduce_sum
        self._device = device
        self._failure_known = False
        self.n_collectives = 0

    def _status(self, failed: bool) -> bool:
        """One status collective; True when any rank reported a failure."""
        flag = torch.tensor([1.0 if failed else 0.0], device=self._device)
        self.n_collectives += 1
        return bool(self._reduce_sum(flag).item() > 0)

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """Sum ``t`` over ranks after every rank has confirmed it is still healthy."""
        if self._status(False):
            self._failure_known = True
            raise PeerFailedError("another process failed during this measurement")
        self.n_collectives += 1
        return self._reduce_sum(t)

    @contextlib.contextmanager
    def agreement(self) -> Iterator[None]:
        """Run a measurement: on exit every rank knows whether all succeeded; failures raise everywhere.

        A local exception is reported to the other ranks (one status collective) and re-raised; a
        failure elsewhere raises :class:`PeerFailedError` here, even when this rank had finished.
        """
        self._failure_known = False
        try:
            yield
        except BaseException:
            if not self._failure_known:
                self._failure_known = True
                with contextlib.suppress(Exception):  # a broken process group: keep the original error
                    self._status(True)
            raise
        if self._status(False):
            self._failure_known = True
            raise PeerFailedError("another process failed at the end of this measurement")
