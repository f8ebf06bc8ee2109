"""Second-order optimizers on the project's HVPs: the adaptive-norm (ellipsoidal) trust region and its CG solver.

Imports torch only; the Lightning callback that logs the optimizer's per-step statistics lives in
:mod:`lightning_hessian.optim.callback` (``pytorch_lightning``) and :mod:`lightning_hessian.optim.unified`
(``lightning.pytorch``), imported only by those who use them.
"""

from lightning_hessian.optim.norms import NORMS
from lightning_hessian.optim.steihaug import SubproblemResult, negative_curvature_step, steihaug_cg
from lightning_hessian.optim.trust_region import BACKPROP_COST, DEFAULT_RADIUS, TrustRegion, TrustRegionStats

__all__ = [
    "BACKPROP_COST",
    "DEFAULT_RADIUS",
    "NORMS",
    "SubproblemResult",
    "TrustRegion",
    "TrustRegionStats",
    "negative_curvature_step",
    "steihaug_cg",
]
