"""A curvature report of a trained model: what ``tfcurv report`` prints and draws.

:func:`curvature_report` measures, on one model and one data set:

* the top Hessian eigenvalues (thick-restart Lanczos);
* the trace, by Hutchinson's estimator;
* per layer that owns trainable variables: its parameter count, the top
  eigenvalue of its own Hessian block, and its share of the trace (the sum of
  the same Hutchinson estimate of the diagonal over its parameters, divided by
  the total: the shares add up to one);
* the spectral density (stochastic Lanczos quadrature).

The result is a plain dataclass that saves to ``.npz``; its :meth:`~CurvatureReport.table`
is the text the command line prints.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from tfcurv.analysis.results import SavableResult
from tfcurv.curvature import vectors as vec
from tfcurv.curvature.density import SpectralDensity
from tfcurv.curvature.layers import layers_with_weights
from tfcurv.curvature.operators import Hessian


@dataclasses.dataclass
class CurvatureReport(SavableResult):
    """The numbers of one report.

    Attributes:
        num_parameters: trainable parameters measured.
        top_eigenvalues: the largest Hessian eigenvalues, descending.
        trace: Hutchinson's estimate of the Hessian trace.
        trace_samples: the probes it used.
        layer_names: one entry per layer owning trainable variables.
        layer_parameters: their parameter counts.
        layer_top_eigenvalues: the top eigenvalue of each layer's Hessian block.
        layer_trace_shares: each layer's share of ``trace`` (sums to 1).
        density_nodes, density_weights: the spectral density's quadrature
            (see :class:`~tfcurv.curvature.SpectralDensity`).
    """

    num_parameters: int
    top_eigenvalues: np.ndarray
    trace: float
    trace_samples: int
    layer_names: np.ndarray
    layer_parameters: np.ndarray
    layer_top_eigenvalues: np.ndarray
    layer_trace_shares: np.ndarray
    density_nodes: np.ndarray
    density_weights: np.ndarray

    @property
    def density(self) -> SpectralDensity:
        return SpectralDensity(self.density_nodes, self.density_weights)

    def table(self) -> str:
        """The report as text: eigenvalues, trace, one row per layer."""
        values = ", ".join(f"{v:.6g}" for v in self.top_eigenvalues)
        lines = [
            f"parameters        {self.num_parameters:,}",
            f"top eigenvalues   {values}",
            f"trace             {self.trace:.6g}  "
            f"(Hutchinson, {self.trace_samples} samples)",
            "",
        ]
        width = max([len("layer")] + [len(str(n)) for n in self.layer_names])
        lines.append(
            f"{'layer':<{width}}  {'parameters':>10}  {'top eigenvalue':>14}  "
            f"{'trace share':>11}"
        )
        for name, count, top, share in zip(
            self.layer_names,
            self.layer_parameters,
            self.layer_top_eigenvalues,
            self.layer_trace_shares,
        ):
            lines.append(
                f"{str(name):<{width}}  {int(count):>10,}  {top:>14.6g}  "
                f"{100 * share:>10.1f}%"
            )
        return "\n".join(lines)


def curvature_report(
    model: keras.Model,
    data,
    loss=None,
    top_n: int = 3,
    trace_samples: int = 100,
    density_iter: int = 100,
    training: bool = False,
    seed: int = 0,
    tol: float = 1e-4,
    verbose="auto",
) -> CurvatureReport:
    """Measures a :class:`CurvatureReport` of ``model`` on ``data``.

    Args:
        model: a built Keras model.
        data: ``(x, y)``, ``(x, y, sample_weight)`` or a ``tf.data.Dataset``.
        loss: the loss; ``None`` for the one the model was compiled with.
        top_n: eigenvalues of the whole Hessian.
        trace_samples: Hutchinson probes for the trace and the layers' shares.
        density_iter: Lanczos steps of the spectral density.
        training: measure in training mode (batch statistics, live Dropout).
        seed: seed of every random probe.
        tol: relative residual at which an eigenvalue counts as converged.
        verbose: progress bars, one per estimate (as ``model.fit``'s).
    """
    hessian = Hessian(model, loss, data, training=training)
    top_n = min(top_n, hessian.size)
    top, _ = hessian.eigenvalues(top_n, tol=tol, seed=seed, verbose=verbose)
    diagonal = hessian.diagonal(
        "hutchinson", num_samples=trace_samples, seed=seed, verbose=verbose
    )
    trace = float(np.sum(diagonal))
    offsets, start = {}, 0
    for variable, count in zip(hessian.variables, vec.sizes(hessian.shapes)):
        offsets[id(variable)] = (start, start + count)
        start += count
    names, counts, tops, shares = [], [], [], []
    for layer in layers_with_weights(model):
        owned = [v for v in layer.trainable_variables if id(v) in offsets]
        if not owned:
            continue
        block = Hessian(model, hessian.loss, data, training=training, variables=owned)
        value, _ = block.eigenvalues(1, tol=tol, seed=seed, verbose=verbose)
        part = sum(float(np.sum(diagonal[slice(*offsets[id(v)])])) for v in owned)
        names.append(layer.path if hasattr(layer, "path") else layer.name)
        counts.append(block.size)
        tops.append(float(value[0]))
        shares.append(part / trace if trace else np.nan)
    density = hessian.density(
        num_iter=min(density_iter, hessian.size), seed=seed, verbose=verbose
    )
    return CurvatureReport(
        num_parameters=hessian.size,
        top_eigenvalues=np.asarray(top, np.float64),
        trace=trace,
        trace_samples=trace_samples,
        layer_names=np.array(names),
        layer_parameters=np.array(counts, np.int64),
        layer_top_eigenvalues=np.array(tops, np.float64),
        layer_trace_shares=np.array(shares, np.float64),
        density_nodes=density.nodes,
        density_weights=density.weights,
    )
