"""lightning_hessian: Hessian eigenvalues, traces and loss landscapes of a model, during training or standalone."""

from lightning_hessian.callback import HessianMonitor
from lightning_hessian.measure import MeasureConfig, Measurement, measure
from lightning_hessian.objective import HvpFallbackWarning, NonFiniteLossError, Objective
from lightning_hessian.spectrum import EigenResult, extremal_eigenpairs
from lightning_hessian.trace import TraceEstimate, hutchinson_trace, slope_fit_trace

__version__ = "0.1.0.dev0"

__all__ = [
    "EigenResult",
    "HessianMonitor",
    "MeasureConfig",
    "Measurement",
    "HvpFallbackWarning",
    "NonFiniteLossError",
    "Objective",
    "TraceEstimate",
    "__version__",
    "extremal_eigenpairs",
    "hutchinson_trace",
    "measure",
    "slope_fit_trace",
]
