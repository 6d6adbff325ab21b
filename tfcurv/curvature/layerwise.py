"""Per-layer curvature: the top eigenvalue and trace of each layer's diagonal block."""

from __future__ import annotations

import keras

from tfcurv.curvature.operators import CurvatureOperator, Hessian


def _blocks(model: keras.Model):
    """The model's layers in order, nested models expanded into their layers."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _blocks(layer)
        else:
            yield layer


def layerwise_summary(
    model: keras.Model,
    loss,
    data,
    curvature: type[CurvatureOperator] = Hessian,
    training: bool = False,
    trace_method: str = "hutchinson",
    num_samples: int = 100,
    tol: float = 1e-6,
    seed: int = 0,
) -> list[dict]:
    """One row per layer with trainable weights, in model order.

    Each row holds ``layer`` (name), ``parameters``, ``top_eigenvalue``
    (largest algebraic, Lanczos) and ``trace`` of the block of ``curvature``
    (``tfcurv.Hessian`` or ``tfcurv.GaussNewton``) restricted to that layer's
    variables. Rows are plain dicts, ready for ``pandas.DataFrame(rows)``.
    """
    rows = []
    for layer in _blocks(model):
        if not layer.trainable_variables:
            continue
        block = curvature(model, loss, data, training=training, variables=layer)
        values, _ = block.eigenvalues(top_n=1, tol=tol, seed=seed)
        rows.append(
            {
                "layer": layer.name,
                "parameters": block.size,
                "top_eigenvalue": float(values[0]),
                "trace": block.trace(trace_method, num_samples=num_samples, seed=seed),
            }
        )
    return rows
