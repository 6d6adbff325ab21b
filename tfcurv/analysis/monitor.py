"""Logging Hessian eigenvalues and traces during ``fit`` without changing training.

:class:`CurvatureMonitor` measures, every ``every`` epochs, the top eigenvalues
and the trace of the Hessian of the loss on a fixed held-out batch or dataset,
for the whole model and optionally per layer, and adds them to the epoch logs
(so they appear in ``History`` and in Keras' own TensorBoard callback) and, with
``log_dir``, to TensorBoard scalars of its own.

It only reads the model: :class:`tfcurv.Hessian` evaluates the model inside a
``keras.StatelessScope`` (no BatchNormalization moving statistics, no seed
generator state is updated) and draws its random vectors from stateless seeds,
so the global random state that training uses is not consumed either.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from tfcurv._checks import check_choice, check_integer
from tfcurv.curvature.layers import layers_with_weights
from tfcurv.curvature.losses import compiled_loss
from tfcurv.curvature.operators import Hessian

_TRACE_METHODS = ("hutchinson", "hutch++", "exact")


class CurvatureMonitor(keras.callbacks.Callback):
    """Keras callback logging Hessian curvature into the training logs.

    Logged names (``prefix`` defaults to ``"hessian"``):

    * ``hessian_top_eigenvalue``; with ``top_n > 1`` also ``hessian_eigenvalue_2``, ...;
    * ``hessian_trace`` (unless ``trace=None``);
    * with ``per_layer=True``, the same for every layer with trainable weights,
      as ``<layer name>_hessian_top_eigenvalue`` and ``<layer name>_hessian_trace``.

    On epochs that are not measured the values are NaN, so ``History`` keeps one
    entry per epoch; the monitor's own ``history`` attribute holds only the measured epochs.

    Args:
        data: ``(x, y)`` batch or ``tf.data.Dataset`` the curvature is measured on
            (held out, fixed: the same data every time).
        every: measure after every ``every``-th epoch (positive integer).
        top_n: number of top (largest algebraic) eigenvalues, by Lanczos.
        loss: the loss; ``None`` uses the loss the model was compiled with.
        trace: ``"hutchinson"`` (default), ``"hutch++"``, ``"exact"`` or ``None``.
        trace_samples: products per trace estimate.
        per_layer: also measure each layer's own Hessian block.
        log_dir: if given, write the values as TensorBoard scalars (step = epoch).
        training: evaluate the model in training mode (batch statistics, live
            Dropout, nothing updated) instead of inference mode.
        tol, max_iter, seed: passed to ``Hessian.eigenvalues`` and ``trace``.
        prefix: start of every logged name.
    """

    def __init__(
        self,
        data,
        every: int = 1,
        top_n: int = 1,
        loss=None,
        trace: str | None = "hutchinson",
        trace_samples: int = 20,
        per_layer: bool = False,
        log_dir: str | None = None,
        training: bool = False,
        tol: float = 1e-4,
        max_iter: int | None = None,
        seed: int = 0,
        prefix: str = "hessian",
    ):
        super().__init__()
        for name, value in (
            ("every", every),
            ("top_n", top_n),
            ("trace_samples", trace_samples),
        ):
            check_integer(name, value)
        if trace is not None:
            check_choice("trace", trace, tuple(_TRACE_METHODS))
        self.data = data
        self.every = int(every)
        self.top_n = int(top_n)
        self.loss = loss
        self.trace = trace
        self.trace_samples = int(trace_samples)
        self.per_layer = per_layer
        self.log_dir = log_dir
        self.training = training
        self.eigen_options = {"tol": tol, "max_iter": max_iter, "seed": seed}
        self.prefix = prefix
        self.history: dict[str, list[float]] = {}
        self._operators: dict[str, Hessian] | None = None
        self._writer = None

    def on_train_begin(self, logs=None):
        if self._operators is None:
            self._operators = self._build_operators()
        if self.log_dir is not None and self._writer is None:
            self._writer = tf.summary.create_file_writer(str(self.log_dir))

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        measured = (epoch + 1) % self.every == 0
        values = (
            self.measure() if measured else {name: math.nan for name in self._names()}
        )
        logs.update(values)
        if measured:
            self.history.setdefault("epoch", []).append(epoch)
            for name, value in values.items():
                self.history.setdefault(name, []).append(value)
            if self._writer is not None:
                with self._writer.as_default():
                    for name, value in values.items():
                        _write_scalar(name, value, epoch)
                self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.flush()

    def measure(self) -> dict[str, float]:
        """The logged values at the model's current weights."""
        if self._operators is None:
            self._operators = self._build_operators()
        values = {}
        for label, hessian in self._operators.items():
            top_n = min(self.top_n, hessian.size)
            eigenvalues, _ = hessian.eigenvalues(
                top_n, method="lanczos", **self.eigen_options
            )
            for rank, value in enumerate(eigenvalues, start=1):
                values[self._name(label, rank)] = float(value)
            if self.trace is not None:
                values[self._name(label, "trace")] = float(
                    hessian.trace(
                        self.trace, self.trace_samples, seed=self.eigen_options["seed"]
                    )
                )
        return values

    def _build_operators(self) -> dict[str, Hessian]:
        loss = compiled_loss(self.model, self.loss)
        operators = {"": Hessian(self.model, loss, self.data, training=self.training)}
        if self.per_layer:
            for layer in layers_with_weights(self.model):
                operators[layer.name] = Hessian(
                    self.model, loss, self.data, training=self.training, variables=layer
                )
        return operators

    def _name(self, label: str, what) -> str:
        suffix = (
            "top_eigenvalue"
            if what == 1
            else ("trace" if what == "trace" else f"eigenvalue_{what}")
        )
        base = f"{self.prefix}_{suffix}"
        return f"{label}_{base}" if label else base

    def _names(self) -> list[str]:
        names = []
        for label, hessian in (self._operators or {}).items():
            names += [
                self._name(label, rank)
                for rank in range(1, min(self.top_n, hessian.size) + 1)
            ]
            if self.trace is not None:
                names.append(self._name(label, "trace"))
        return names


def _write_scalar(name: str, value: float, step: int) -> None:
    """A TensorBoard scalar, written with TF alone (``tf.summary.scalar`` needs the
    ``tensorboard`` package; this is what it writes: a float32 tensor tagged for
    the scalars plugin)."""
    tf.summary.write(
        tag=name,
        tensor=tf.constant(value, tf.float32),
        step=step,
        metadata=summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
        ),
    )


