"""Resolving the loss whose curvature is wanted, as Keras' ``fit`` computes it.

A loss may be a ``keras.losses.Loss`` object, a string Keras knows
(``"sparse_categorical_crossentropy"``, ``"mse"``, ...) or a callable
``fn(y_true, y_pred)`` returning per-example values. Strings and callables are
reduced like ``compile`` reduces them (mean over the batch, ``sample_weight``
applied), and the model's regularisation losses (``model.losses``: weight
regularisers and ``add_loss`` terms) are added, as ``fit`` adds them.

Second derivatives: on TF 2.21 every Keras cross-entropy path (sparse or
categorical, from logits or from probabilities) has a usable second derivative,
including the fused ``SparseSoftmaxCrossEntropyWithLogits`` op whose gradient
registration now differentiates its softmax output. No substitute is therefore
applied; ``tests/curvature/test_curvature_operators.py`` checks every path against a plain
``log_softmax`` form so that a regression in TF is caught.

:func:`loss_kind` recognises the three losses whose output curvature has a
closed form (softmax cross-entropy, sigmoid binary cross-entropy, mean squared
error), which Curvature Propagation and the Fisher products need.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import keras
import tensorflow as tf

LossFunction = Callable[..., tf.Tensor]

_SOFTMAX_CROSSENTROPY = ("categorical_crossentropy", "sparse_categorical_crossentropy")


class _FunctionLoss(keras.losses.Loss):
    """A per-example loss function, reduced as ``compile`` reduces it."""

    def __init__(self, fn: LossFunction, name: str | None = None, dtype=None):
        super().__init__(name=name or getattr(fn, "__name__", "loss"), dtype=dtype)
        self.fn = fn

    def call(self, y_true, y_pred):
        return self.fn(y_true, y_pred)


def _in_dtype(loss: keras.losses.Loss, dtype: str | None) -> keras.losses.Loss:
    """``loss`` computing in ``dtype``: a Loss built while floatx was float32 would
    otherwise round a float64 model's outputs to float32."""
    if dtype is None or loss.dtype == dtype:
        return loss
    try:
        return type(loss).from_config({**loss.get_config(), "dtype": dtype})
    except (TypeError, ValueError, NotImplementedError):
        raise ValueError(
            f"loss computes in {loss.dtype} but the model's variables are {dtype}; "
            f"build the loss with dtype={dtype!r}"
        ) from None


def resolve(loss, dtype: str | None = None) -> keras.losses.Loss:
    """A ``keras.losses.Loss`` that reduces like ``model.compile(loss=...)``.

    ``dtype`` (the variables' dtype) is the precision the loss computes in.
    """
    if isinstance(loss, keras.losses.Loss):
        return _in_dtype(loss, dtype)
    if isinstance(loss, str):
        try:
            function = keras.losses.get(loss)
        except ValueError as error:
            raise ValueError(
                f"loss={loss!r} is not a loss Keras knows: {error}"
            ) from None
        if isinstance(function, keras.losses.Loss):
            return function
        return _FunctionLoss(function, name=loss, dtype=dtype)
    if callable(loss):
        return _FunctionLoss(loss, dtype=dtype)
    raise ValueError(
        "loss must be a keras.losses.Loss, a loss name or a callable "
        f"fn(y_true, y_pred); got {type(loss).__name__}"
    )


@dataclasses.dataclass(frozen=True)
class LossKind:
    """A loss whose curvature with respect to the model output has a closed form.

    ``name`` is ``"softmax_crossentropy"``, ``"sigmoid_crossentropy"`` or
    ``"squared_error"``; ``sparse`` says whether labels are integer classes.
    """

    name: str
    sparse: bool = False


def loss_kind(loss: keras.losses.Loss) -> LossKind:
    """Which closed-form loss ``loss`` is; ``ValueError`` if none (or not from logits).

    Curvature Propagation and sampled Fisher products start at the model's
    logits, so cross-entropies must be built with ``from_logits=True``.
    """
    config = loss.get_config() if hasattr(loss, "get_config") else {}
    function = getattr(loss, "fn", None)
    name = getattr(function, "__name__", "") or config.get("name", "")
    from_logits = config.get("from_logits", False)
    if isinstance(loss, keras.losses.MeanSquaredError) or name in (
        "mean_squared_error",
        "mse",
    ):
        return LossKind("squared_error")
    if name in _SOFTMAX_CROSSENTROPY or isinstance(
        loss,
        (
            keras.losses.CategoricalCrossentropy,
            keras.losses.SparseCategoricalCrossentropy,
        ),
    ):
        if not from_logits:
            raise ValueError(
                f"loss {name!r} must be built with from_logits=True (the model "
                "must output logits) for this curvature method"
            )
        sparse = "sparse" in name or isinstance(
            loss, keras.losses.SparseCategoricalCrossentropy
        )
        return LossKind("softmax_crossentropy", sparse=sparse)
    if name == "binary_crossentropy" or isinstance(
        loss, keras.losses.BinaryCrossentropy
    ):
        if not from_logits:
            raise ValueError(
                "loss 'binary_crossentropy' must be built with from_logits=True "
                "for this curvature method"
            )
        return LossKind("sigmoid_crossentropy")
    raise ValueError(
        f"loss {name or type(loss).__name__!r} is not supported here; supported: "
        "softmax cross-entropy and sigmoid binary cross-entropy (from_logits=True) "
        "and mean squared error"
    )


def compiled_loss(model: keras.Model, loss):
    """``loss``, or the loss ``model`` was compiled with when ``loss`` is ``None``."""
    if loss is not None:
        return loss
    compiled = getattr(model, "loss", None)
    if compiled is None:
        raise ValueError(
            "`loss` is None and the model was not compiled with a loss; pass `loss=`"
        )
    if isinstance(compiled, (dict, list, tuple)):
        raise TypeError(
            "the model was compiled with one loss per output; pass a single `loss=` callable"
        )
    return compiled
