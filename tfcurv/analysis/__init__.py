"""Training analysis: weight trajectories, PCA, Hessian overlaps, callbacks, plots.

The measurements of Haink (2023), "Hessian Eigenvectors and Principal Component
Analysis of Neural Network Weight Matrices", for any Keras model, as callbacks
(:class:`WeightTrajectory`, :class:`CurvatureMonitor`), functions returning plain
dataclasses of numpy arrays (each with ``save``/``load`` to ``.npz``), and
matplotlib figures (:mod:`tfcurv.analysis.plots`, matplotlib imported only when
a figure is drawn). See ``docs/analysis.md`` for a tutorial.
"""

from tfcurv.analysis import plots
from tfcurv.analysis.monitor import CurvatureMonitor
from tfcurv.analysis.overlaps import (
    SingularDirections,
    as_rows,
    best_overlap,
    extended_singular_vectors,
    localisation,
    overlap_matrix,
    weight_alignment,
)
from tfcurv.analysis.pca import (
    DriftMode,
    PCAResult,
    drift_mode,
    drift_ratio,
    pca,
    update_pca,
)
from tfcurv.analysis.reconstruction import (
    ReconstructionCurve,
    projected_weights,
    reconstruction_curve,
)
from tfcurv.analysis.report import CurvatureReport, curvature_report
from tfcurv.analysis.spectra import (
    Eigenpairs,
    LayerComparison,
    compare_layers,
    hessian_eigenpairs,
)
from tfcurv.analysis.trajectory import (
    Trajectory,
    TrajectoryBudgetError,
    WeightTrajectory,
)

__all__ = [
    "CurvatureMonitor",
    "CurvatureReport",
    "DriftMode",
    "Eigenpairs",
    "LayerComparison",
    "PCAResult",
    "ReconstructionCurve",
    "SingularDirections",
    "Trajectory",
    "TrajectoryBudgetError",
    "WeightTrajectory",
    "as_rows",
    "best_overlap",
    "compare_layers",
    "curvature_report",
    "drift_mode",
    "drift_ratio",
    "extended_singular_vectors",
    "hessian_eigenpairs",
    "localisation",
    "overlap_matrix",
    "pca",
    "plots",
    "projected_weights",
    "reconstruction_curve",
    "update_pca",
    "weight_alignment",
]
