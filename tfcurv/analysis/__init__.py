"""Training analysis: weight trajectories, PCA, Hessian overlaps, callbacks, plots.

The measurements of Haink (2023), "Hessian Eigenvectors and Principal Component
Analysis of Neural Network Weight Matrices", for any Keras model. See
``docs/analysis.md`` for a tutorial.
"""

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
from tfcurv.analysis.trajectory import (
    Trajectory,
    TrajectoryBudgetError,
    WeightTrajectory,
)

__all__ = [
    "DriftMode",
    "PCAResult",
    "SingularDirections",
    "Trajectory",
    "TrajectoryBudgetError",
    "WeightTrajectory",
    "as_rows",
    "best_overlap",
    "drift_mode",
    "drift_ratio",
    "extended_singular_vectors",
    "localisation",
    "overlap_matrix",
    "pca",
    "update_pca",
    "weight_alignment",
]
