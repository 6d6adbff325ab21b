"""The one place where tfcurv owns the Keras train step.

``Model``, ``Sequential`` and ``attach`` (re-exported as ``tfcurv.Model``,
``tfcurv.Sequential``, ``tfcurv.attach``) give a model the step of
:func:`curvature_train_step`, which hands gradients, Hessian-vector products and
layer statistics from one forward pass to the optimizers that need them.
"""

from tfcurv.training.models import (
    FunctionalModel,
    Model,
    Sequential,
    attach,
    is_attached,
)
from tfcurv.training.train_step import curvature_train_step

__all__ = [
    "FunctionalModel",
    "Model",
    "Sequential",
    "attach",
    "curvature_train_step",
    "is_attached",
]
