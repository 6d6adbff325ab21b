"""Accuracy and loss when a layer is rebuilt from its first i directions (Haink 2023).

The official ``acc_components`` sets a variable to ``sum_{k<i} (w . e_k) e_k`` for
orthonormal directions ``e_k`` (Hessian eigenvectors ordered by ``|lambda|`` or by
signed value, principal components, extended singular vectors) and evaluates the
model. How fast the curve rises tells how much of what the layer does lives in
the first directions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import keras
import numpy as np

from tfcurv.analysis.overlaps import as_rows
from tfcurv.analysis.results import SavableResult
from tfcurv.curvature.layers import select_variables


@dataclasses.dataclass
class ReconstructionCurve(SavableResult):
    """Loss and accuracy of the model with one variable rebuilt from i directions.

    Attributes:
        counts: (m,) numbers of directions i.
        loss: (m,) the compiled loss (``model.evaluate``) at each count.
        accuracy: (m,) the first compiled metric whose name contains
            ``"accuracy"``, or NaN when the model has none.
        original_loss, original_accuracy: the same for the unchanged weights.
    """

    counts: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray
    original_loss: float
    original_accuracy: float


def projected_weights(weights, directions, counts: Sequence[int]) -> np.ndarray:
    """The partial sums ``sum_{k<i} (w·e_k) e_k`` for every i in ``counts``, shape (m, P).

    ``directions`` must have orthonormal rows (checked to 1e-6).
    """
    w = np.ravel(np.asarray(weights, np.float64))
    rows = as_rows(directions)
    if rows.shape[1] != w.size:
        raise ValueError(
            f"`directions` have {rows.shape[1]} parameters but `weights` has {w.size}"
        )
    gram = rows @ rows.T
    if not np.allclose(gram, np.eye(len(rows)), atol=1e-6):
        raise ValueError(
            "`directions` must be orthonormal rows (e.g. eigenvectors or PCs)"
        )
    counts = _checked_counts(counts, len(rows))
    coefficients = rows @ w
    partial = np.cumsum(coefficients[:, None] * rows, axis=0)
    return np.stack([partial[i - 1] if i else np.zeros_like(w) for i in counts])


def reconstruction_curve(
    model: keras.Model,
    variable,
    directions,
    data,
    counts: Sequence[int] | None = None,
    batch_size: int = 1000,
) -> ReconstructionCurve:
    """Evaluate ``model`` with ``variable`` rebuilt from its first i ``directions``.

    Args:
        model: a compiled Keras model (``model.evaluate`` gives loss and metrics).
        variable: the variable (or its layer name / path) to rebuild.
        directions: orthonormal rows in the variable's C-order flattening.
        data: ``(x, y)`` arrays or a ``tf.data.Dataset`` to evaluate on.
        counts: numbers of directions to try (default 0, 1, ..., len(directions)).
        batch_size: evaluation batch size for array ``data``.

    The variable is restored afterwards, also when evaluation fails.
    """
    if not getattr(model, "compiled", False):
        raise ValueError(
            "`model` must be compiled (reconstruction_curve calls model.evaluate)"
        )
    (target,) = select_variables(model, [variable], trainable_only=False)
    original = np.array(keras.ops.convert_to_numpy(target), copy=True)
    available = len(as_rows(directions))
    counts = _checked_counts(
        range(available + 1) if counts is None else counts, available
    )
    rebuilt = projected_weights(original, directions, counts)
    try:
        original_loss, original_accuracy = _evaluate(model, data, batch_size)
        losses, accuracies = [], []
        for weights in rebuilt:
            target.assign(weights.reshape(original.shape).astype(original.dtype))
            loss, accuracy = _evaluate(model, data, batch_size)
            losses.append(loss)
            accuracies.append(accuracy)
    finally:
        target.assign(original)
    return ReconstructionCurve(
        counts=np.asarray(counts),
        loss=np.asarray(losses),
        accuracy=np.asarray(accuracies),
        original_loss=original_loss,
        original_accuracy=original_accuracy,
    )


def _evaluate(model: keras.Model, data, batch_size: int) -> tuple[float, float]:
    if isinstance(data, (tuple, list)):
        results = model.evaluate(
            *data[:2], batch_size=batch_size, verbose=0, return_dict=True
        )
    else:
        results = model.evaluate(data, verbose=0, return_dict=True)
    accuracy_keys = [k for k in results if "accuracy" in k]
    accuracy = float(results[accuracy_keys[0]]) if accuracy_keys else float("nan")
    return float(results["loss"]), accuracy


def _checked_counts(counts, available: int) -> list[int]:
    counts = [int(c) for c in counts]
    if not counts or any(c < 0 or c > available for c in counts):
        raise ValueError(
            f"`counts` must be a non-empty list of integers in [0, {available}]. Received: {counts}"
        )
    return counts
