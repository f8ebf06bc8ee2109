"""TrustRegionLogger for ``pytorch_lightning``: the core logic on ``pytorch_lightning.Callback``."""

from __future__ import annotations

from pytorch_lightning import Callback

from lightning_hessian.optim._callback_core import _TrustRegionLoggerCore


class TrustRegionLogger(_TrustRegionLoggerCore, Callback):  # type: ignore[misc]
    __doc__ = _TrustRegionLoggerCore.__doc__


__all__ = ["TrustRegionLogger"]
