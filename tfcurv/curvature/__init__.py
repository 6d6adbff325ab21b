"""Curvature of losses of Keras models: products, diagonals, spectra, solves.

The operators themselves are :class:`tfcurv.Hessian`, :class:`tfcurv.GaussNewton`
and :class:`tfcurv.Fisher`; this package documents what they share and return:
:class:`CurvatureOperator` (every estimate: eigenpairs, traces, diagonals,
densities, linear solves, SciPy operators), :class:`SolveResult` and
:class:`SpectralDensity`.
"""

from tfcurv.curvature.density import SpectralDensity
from tfcurv.curvature.operators import CurvatureOperator, SolveResult

__all__ = ["CurvatureOperator", "SolveResult", "SpectralDensity"]
