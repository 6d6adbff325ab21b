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

import keras
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
    "optimizer_variables",
    "update_loss_tracker",
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
