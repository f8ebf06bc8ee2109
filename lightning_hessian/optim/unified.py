"""TrustRegionLogger for the unified ``lightning`` package (``import lightning.pytorch as pl``)."""

from __future__ import annotations

from lightning_hessian.optim._callback_core import _TrustRegionLoggerCore

try:
    from lightning.pytorch import Callback
except ModuleNotFoundError as err:  # pragma: no cover - depends on the environment
    raise ModuleNotFoundError(
        "lightning_hessian.optim.unified needs the 'lightning' package (pip install lightning); with "
        "'pytorch_lightning' use `from lightning_hessian.optim.callback import TrustRegionLogger` instead"
    ) from err


class TrustRegionLogger(_TrustRegionLoggerCore, Callback):  # type: ignore[misc]
    __doc__ = _TrustRegionLoggerCore.__doc__


__all__ = ["TrustRegionLogger"]
