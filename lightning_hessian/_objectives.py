"""The probe objectives of one fit: the training probe's, and a validation probe's per landscape.

Built at the first measurement that needs them and kept while the trainable parameters stay the
same (a frozen or unfrozen layer rebuilds them), so measurements at later steps reuse the probe's
batches and the HVP engine's memory plan. A failed measurement releases them, so that every DDP
rank rebuilds alike from scratch; the end of training releases them too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning_hessian._params import ParamSpec
from lightning_hessian.objective import HvpEngine, Objective, ObjectiveMode


class ProbeObjectives:
    """One fit's :class:`~lightning_hessian.objective.Objective` objects and their HVP counts."""

    def __init__(self, params: ParamSpec, hvp: HvpEngine, mode: ObjectiveMode) -> None:
        self.params = params
        self.hvp: HvpEngine = hvp
        self.mode: ObjectiveMode = mode
        self.loss: Callable[[Any, Any], Any] | None = None  # set at setup, once the probe loss is resolved
        self.all_reduce_sum: Callable[[Any], Any] | None = None  # under DDP: the agreement's all-reduce
        self.val_probes: dict[str, list[Any]] = {}  # a landscape's validation batches, by instrument name
        self.training: Objective | None = None
        self._names: list[str] = []
        self._validation: dict[str, Objective] = {}

    def for_module(self, pl_module: Any, batches: list[Any]) -> Objective:
        """The training probe's objective, rebuilt when the trainable parameters changed."""
        names = [n for n, p in pl_module.named_parameters() if p.requires_grad]
        if self.training is None or self._names != names:
            self.training = self.build(pl_module, batches)
            self._validation = {}
            self._names = names
        return self.training

    def validation(self, name: str) -> Objective | None:
        """Instrument ``name``'s validation-probe objective (``None`` when it has no validation probe)."""
        if name not in self.val_probes or self.training is None:
            return None
        if name not in self._validation:
            self._validation[name] = self.build(self.training.model, self.val_probes[name])
        return self._validation[name]

    def build(self, pl_module: Any, batches: list[Any]) -> Objective:
        """An objective over ``batches``; under DDP its all-reduces go through the agreement protocol."""
        if self.loss is None:
            raise RuntimeError("the probe loss is resolved at setup, before any objective is built")
        return Objective(
            pl_module,
            self.loss,
            batches,
            params=self.params,
            hvp=self.hvp,
            mode=self.mode,
            all_reduce_sum=self.all_reduce_sum,
        )

    def hvp_count(self) -> int:
        """Products made so far by every live objective, the symmetry checks included."""
        live = [self.training, *self._validation.values()]
        return sum(o.n_hvp + o.n_hvp_check for o in live if o is not None)

    def release(self) -> None:
        """Free every objective's graphs and buffers; the next measurement builds them afresh."""
        for objective in (self.training, *self._validation.values()):
            if objective is not None:
                objective.release()
        self.training = None
        self._validation = {}
