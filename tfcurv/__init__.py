"""tfcurv: curvature-aware optimisation and curvature analysis for Keras 3.

Public names (see ``docs/api.md``):

* :mod:`tfcurv.optimizers`: AGD, AdaFisher, AdaFisherW, SGDPH.
* :class:`tfcurv.Model`, :class:`tfcurv.Sequential`, :func:`tfcurv.attach`: models
  whose ``fit`` delivers curvature to the optimizers that need it.
* :class:`tfcurv.Hessian`, :class:`tfcurv.GaussNewton`, :class:`tfcurv.Fisher`:
  curvature of a loss at a model's current weights.
* :mod:`tfcurv.curvature`: the estimates those three share (eigenpairs, traces,
  diagonals, densities, solves) and what they return.
* :mod:`tfcurv.analysis`: weight trajectories, PCA, Hessian overlaps, callbacks.
"""

__version__ = "0.2.0.dev0"

from tfcurv import analysis, curvature, optimizers
from tfcurv.curvature.fisher import Fisher
from tfcurv.curvature.operators import GaussNewton, Hessian
from tfcurv.training import Model, Sequential, attach

__all__ = [
    "Fisher",
    "GaussNewton",
    "Hessian",
    "Model",
    "Sequential",
    "__version__",
    "analysis",
    "attach",
    "curvature",
    "optimizers",
]
