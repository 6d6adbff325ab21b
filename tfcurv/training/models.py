"""Models whose ``fit`` delivers curvature: ``Model``, ``Sequential``, ``attach``.

Three ways to get the tfcurv train step (:mod:`tfcurv.training.train_step`):

* ``tfcurv.Model``: subclass it like ``keras.Model``, or call it functionally,
  ``tfcurv.Model(inputs, outputs)``;
* ``tfcurv.Sequential([...])``;
* ``tfcurv.attach(model)`` for a model that already exists (Sequential,
  Functional, subclassed, loaded from a ``.keras`` file, from
  ``keras.applications``...). Attaching binds the step to that one instance; it
  is not saved, so attach again after ``keras.models.load_model``.

Whatever the route, the step is Keras' own unless the compiled optimizer needs
curvature, so the same model trains with ``keras.optimizers.Adam`` exactly as a
plain Keras model does.

Functional construction mirrors ``keras.Model``: ``keras.Model.__new__`` turns
``keras.Model(inputs, outputs)`` into a ``Functional`` instance, and for a
subclass called the same way Keras rewrites the subclass' bases to put
``Functional`` in (``inject_functional_model_class``). Keras' rewrite walks up
to ``keras.Model`` and would rewrite ``tfcurv.Model`` itself, after which every
subclassed ``tfcurv.Model`` would be Functional. tfcurv therefore stops the walk
at ``tfcurv.Model``: it returns a :class:`FunctionalModel` (a ``tfcurv.Model``
that is also a Keras ``Functional``), and rewrites only the user's own classes.
"""

from __future__ import annotations

import types

import keras

from tfcurv import _keras as keras_internals
from tfcurv.training.train_step import curvature_train_step, needs_curvature

_KERAS_TRAIN_STEP = keras.Model.train_step


class CurvatureTrainStep:
    """Mixin giving a Keras model the tfcurv train step."""

    def train_step(self, data):
        if needs_curvature(self):
            return keras_internals.multi_worker_logs(curvature_train_step(self, data))
        return keras_internals.multi_worker_logs(super().train_step(data))

    def make_train_function(self, force=False):
        build_curvature_optimizer(self)
        return super().make_train_function(force)


keras_internals.install_multi_worker_fixes(CurvatureTrainStep)


def build_curvature_optimizer(model: keras.Model) -> None:
    """Build a curvature optimizer's slots before the train function is traced.

    Keras builds the optimizer inside the first trace (unless a strategy is
    set), and a ``tf.function`` whose first trace creates variables is traced
    a second time: for a curvature step, whose graph holds a second backward
    pass, that doubles the first ``fit``'s tracing. A built model with a
    curvature optimizer gets its slots here, eagerly, in the model's strategy
    scope; anything else is left to Keras.
    """
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or optimizer.built or not model.built:
        return
    variables = model.trainable_variables
    if variables and needs_curvature(model):
        with model.distribute_strategy.scope():
            optimizer.build(variables)


@keras.saving.register_keras_serializable(package="tfcurv")
class Model(CurvatureTrainStep, keras.Model):
    """A ``keras.Model`` whose ``fit`` delivers curvature to the optimizers that need it.

    Use it exactly like ``keras.Model``: subclass it (define ``__init__`` and
    ``call``), or build it functionally with ``tfcurv.Model(inputs, outputs)``.
    """

    def __new__(cls, *args, **kwargs):
        if cls is Model and keras_internals.functional_init_arguments(args, kwargs):
            return FunctionalModel.__new__(FunctionalModel, *args, **kwargs)
        return super().__new__(cls, *args, **kwargs)

    def __init__(self, *args, **kwargs):
        if keras_internals.functional_init_arguments(args, kwargs):
            if not isinstance(self, keras_internals.Functional):
                # A user subclass called as MySubclass(inputs, outputs).
                _make_functional(type(self))
            keras_internals.Functional.__init__(self, *args, **kwargs)
        else:
            super().__init__(*args, **kwargs)


@keras.saving.register_keras_serializable(package="tfcurv")
class FunctionalModel(Model, keras_internals.Functional):
    """What ``tfcurv.Model(inputs, outputs)`` returns: a Functional ``tfcurv.Model``."""


@keras.saving.register_keras_serializable(package="tfcurv")
class Sequential(CurvatureTrainStep, keras.Sequential):
    """A ``keras.Sequential`` whose ``fit`` delivers curvature to the optimizers that need it."""


def _make_functional(cls: type) -> type:
    """Replace ``tfcurv.Model`` by :class:`FunctionalModel` among ``cls``' ancestors.

    Only the user's classes between ``cls`` and ``tfcurv.Model`` are rewritten,
    as Keras rewrites a ``keras.Model`` subclass called functionally.
    """
    if cls is Model:
        return FunctionalModel
    if cls is FunctionalModel or not issubclass(cls, Model):
        return cls
    cls.__bases__ = tuple(_make_functional(base) for base in cls.__bases__)
    return cls


def _attached_train_step(self, data):
    if needs_curvature(self):
        return keras_internals.multi_worker_logs(curvature_train_step(self, data))
    return keras_internals.multi_worker_logs(type(self).train_step(self, data))


def _attached_make_train_function(self, force=False):
    build_curvature_optimizer(self)
    return type(self).make_train_function(self, force)


def attach(model: keras.Model) -> keras.Model:
    """Give an existing model the tfcurv train step; returns the same model.

    Works for any ``keras.Model`` (Sequential, Functional, subclassed, loaded
    from ``.keras``) whose class uses Keras' own ``train_step``. Idempotent, and
    a no-op for ``tfcurv.Model``/``tfcurv.Sequential``. The model's cached train
    function is reset, so it may be called after ``compile`` or ``fit``. The
    attachment lives on this instance only: it is not saved in ``.keras`` files.

    Raises:
        TypeError: if ``model`` is not a ``keras.Model``.
        ValueError: if the model's class defines
            its own ``train_step`` (tfcurv cannot add curvature to a step it does
            not own; derive from ``tfcurv.Model`` and call
            ``tfcurv.training.curvature_train_step`` there instead).
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"`model` must be a keras.Model. Received: model={model!r} "
            f"of type {type(model).__name__}"
        )
    if isinstance(model, CurvatureTrainStep) or is_attached(model):
        return model
    if type(model).train_step is not _KERAS_TRAIN_STEP:
        raise ValueError(
            f"`model` ({type(model).__name__}) defines its own `train_step`, which "
            "tfcurv.attach would replace. Keep your step and compute curvature "
            "there with `tfcurv.training.curvature_train_step(self, data)`, or "
            "drop the override."
        )
    model.train_step = types.MethodType(_attached_train_step, model)
    model.make_train_function = types.MethodType(_attached_make_train_function, model)
    keras_internals.install_multi_worker_fixes(model)
    model.train_function = None
    return model


def is_attached(model: keras.Model) -> bool:
    """Whether ``model`` trains with the tfcurv step (by class or by ``attach``)."""
    bound = model.__dict__.get("train_step")
    return isinstance(model, CurvatureTrainStep) or (
        isinstance(bound, types.MethodType) and bound.__func__ is _attached_train_step
    )
