"""Every private Keras attribute tfcurv relies on, in one place (the bottom floor).

Any tfcurv package may import this module; no other module touches a private
Keras name. What is here and why:

* the train step must compute the loss, update the loss tracker and call the
  model exactly as Keras' own ``TensorFlowTrainer.train_step`` does, and
  ``tfcurv.Model(inputs, outputs)`` must become a Functional model the way
  ``keras.Model(inputs, outputs)`` does;
* "every layer of this model" (nested models and layers held by custom layers)
  has no public listing: :func:`flatten_layers`;
* optimizers find a variable's slots and its weight-decay exclusion with the
  base optimizer's own bookkeeping (:func:`variable_index`,
  :func:`uses_weight_decay`), and tfcurv optimizers whose decay is part of
  their update override the hook ``_apply_weight_decay`` with a no-op.

``tests/test_keras_internals.py`` checks on every Keras version that each piece
still exists and still means what tfcurv assumes; a canary there fails when
Keras makes one public or changes it.
"""

from __future__ import annotations

import types

import keras
import tensorflow as tf
from keras.src.backend.tensorflow.trainer import TensorFlowTrainer
from keras.src.losses.loss import unscale_loss_for_distribution
from keras.src.models.functional import Functional
from keras.src.models.model import functional_init_arguments

# Public as ``keras.optimizers.MultiOptimizer`` in Keras 3.15; Keras 3.13 has no
# MultiOptimizer at all. There the empty tuple stands in for it, so that
# ``isinstance(optimizer, MultiOptimizer)`` is simply False.
MultiOptimizer = getattr(keras.optimizers, "MultiOptimizer", ())

__all__ = [
    "Functional",
    "MultiOptimizer",
    "call_for_training",
    "compute_loss",
    "functional_init_arguments",
    "flatten_layers",
    "install_multi_worker_fixes",
    "is_multi_worker",
    "multi_worker_logs",
    "optimizer_variables",
    "update_loss_tracker",
    "unscale_loss_for_distribution",
    "uses_weight_decay",
    "variable_index",
]


def call_for_training(model: keras.Model, x):
    """``model(x, training=True)``, or ``model(x)`` when ``call`` has no ``training``."""
    if model._call_has_training_arg:
        return model(x, training=True)
    return model(x)


def compute_loss(model: keras.Model, x, y, y_pred, sample_weight):
    """The training loss as Keras' ``train_step`` computes it (``Trainer._compute_loss``)."""
    return model._compute_loss(
        x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
    )


def update_loss_tracker(model: keras.Model, loss, batch_size) -> None:
    """Feed the ``loss`` metric exactly as Keras' ``train_step`` does."""
    model._loss_tracker.update_state(
        unscale_loss_for_distribution(loss), sample_weight=batch_size
    )


def optimizer_variables(optimizer: keras.optimizers.Optimizer) -> list:
    """The model variables a built optimizer updates, in the order it was built with."""
    return list(optimizer._trainable_variables)


def flatten_layers(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    """``layer`` and every layer inside it (nested models, layers held by custom
    layers, layers in lists and dicts), outermost first, each once."""
    return list(layer._flatten_layers(include_self=True, recursive=True))


def variable_index(optimizer: keras.optimizers.Optimizer, variable) -> int:
    """The position of ``variable`` in the list ``optimizer`` was built with.

    Raises:
        KeyError: if ``optimizer`` was not built with ``variable``.
    """
    return optimizer._get_variable_index(variable)


def uses_weight_decay(optimizer: keras.optimizers.Optimizer, variable) -> bool:
    """Whether ``variable`` is decayed (not excluded with ``exclude_from_weight_decay``)."""
    return optimizer._use_weight_decay(variable)


# --------------------------------------------------- MultiWorkerMirroredStrategy
def is_multi_worker(strategy) -> bool:
    """Whether ``strategy`` is a MultiWorkerMirroredStrategy over several workers."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return False
    resolver = strategy.cluster_resolver
    spec = resolver.cluster_spec().as_dict() if resolver is not None else {}
    return len(spec.get("worker", [])) + len(spec.get("chief", [])) > 1


def _local_batch(strategy, batch):
    def local(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    return tf.nest.map_structure(local, batch)


def _symbolic_build_from_local_batch(self, iterator=None, data_batch=None):
    """Keras' ``TensorFlowTrainer._maybe_symbolic_build`` without its defect
    under MultiWorkerMirroredStrategy (keras-team/keras#20585): Keras averages
    the first batch across workers (``strategy.reduce``, which fails on the
    per-replica batch before the first step); only its shapes are needed, so the
    local values serve. Elsewhere Keras' own method runs."""
    strategy = self.distribute_strategy
    if self._distribute_strategy is None or not is_multi_worker(strategy):
        return TensorFlowTrainer._maybe_symbolic_build(self, iterator, data_batch)
    if iterator is not None:
        for _, _, batches in iterator:
            data_batch = _local_batch(strategy, next(batches))
            break
    with strategy.scope():
        self._symbolic_build(data_batch=data_batch)


def install_multi_worker_fixes(target) -> None:
    """Give a model class, or one model instance, the fix of
    :func:`_symbolic_build_from_local_batch`.

    The other Keras defect under MultiWorkerMirroredStrategy, scalar logs
    reduced with ``axis=0``, is avoided in the tfcurv train step itself
    (:func:`multi_worker_logs`)."""
    if isinstance(target, type):
        target._maybe_symbolic_build = _symbolic_build_from_local_batch
    else:
        target._maybe_symbolic_build = types.MethodType(
            _symbolic_build_from_local_batch, target
        )


def multi_worker_logs(logs):
    """Logs shaped ``(1,)`` under MultiWorkerMirroredStrategy: Keras' train
    function reduces them with ``strategy.reduce("MEAN", v, axis=0)``, which
    fails on scalars; on ``(1,)`` tensors it gives the scalar mean."""
    if not is_multi_worker(tf.distribute.get_strategy()):
        return logs
    return tf.nest.map_structure(
        lambda v: tf.reshape(v, (1,)) if isinstance(v, tf.Tensor) and v.shape.rank == 0 else v,
        logs,
    )
