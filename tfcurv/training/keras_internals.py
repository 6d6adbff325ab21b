"""The private Keras attributes the tfcurv train step relies on, in one place.

The train step must compute the loss, update the loss tracker and call the
model exactly as Keras' own ``TensorFlowTrainer.train_step`` does, and
``tfcurv.Model(inputs, outputs)`` must become a Functional model the way
``keras.Model(inputs, outputs)`` does. Keras exposes none of this publicly, so
each piece is read here, and ``tests/training/test_keras_internals.py`` checks
on every Keras version that each one still exists and still means what the
train step assumes (the tfcurv step and Keras' step give identical numbers).
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
    "optimizer_variables",
    "update_loss_tracker",
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
