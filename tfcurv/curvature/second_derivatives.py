"""Layers whose second derivatives TensorFlow computes wrongly: one table, one check.

Every product of tfcurv that differentiates a gradient (Hessian-, Gauss-Newton-
and Fisher-vector products, SGD-PH's product inside ``fit``) goes through the
second derivatives TensorFlow registers for each op. For a few Keras layers those
are wrong, without any error. Measured on TF 2.21 against central finite
differences of the gradient (float64, ``tests/curvature/test_second_derivatives.py``
keeps each entry honest: it fails once TensorFlow is right there):

* max pooling whose output has its input's shape (strides 1 and
  ``padding="same"``, or ``pool_size`` 1): inside ``tf.function``, the
  reverse-over-reverse Hessian-vector product is 53–77 % off and the
  Gauss-Newton product 55 % off (eagerly they are right). Pooling that changes
  the shape (``MaxPooling2D(2)``, ``MaxPooling2D(3, strides=2)``, stride 1 with
  ``padding="valid"``) is exact.
* bilinear resizing (``UpSampling2D(interpolation="bilinear")``, ``Resizing``
  with its default ``interpolation="bilinear"``): 60–90 % off in every mode,
  eager and graph, reverse-over-reverse and forward-over-reverse. Other
  interpolations either are exact (``nearest`` in ``UpSampling``) or have no
  registered second derivative, which TensorFlow reports itself (a
  ``LookupError``).

Rather than return such numbers, tfcurv refuses, naming the layer and the way
out: :func:`check_second_derivatives` runs whenever a curvature operator is
built and whenever the train step is asked for products. The other pooling,
padding, cropping, reshaping and upsampling layers of Keras were checked the
same way and are exact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import keras

from tfcurv.curvature.layers import matching_layers


def _max_pooling_keeps_shape(layer) -> bool:
    strides = tuple(layer.strides)
    pool_size = tuple(layer.pool_size)
    return all(s == 1 for s in strides) and (
        layer.padding == "same" or all(p == 1 for p in pool_size)
    )


def _bilinear(layer) -> bool:
    return getattr(layer, "interpolation", None) == "bilinear"


@dataclasses.dataclass(frozen=True)
class _Defect:
    layer_types: tuple[type, ...]
    applies: Callable[[keras.layers.Layer], bool]
    what: str
    way_out: str


_DEFECTS = (
    _Defect(
        (
            keras.layers.MaxPooling1D,
            keras.layers.MaxPooling2D,
            keras.layers.MaxPooling3D,
        ),
        _max_pooling_keeps_shape,
        "TensorFlow's second derivative of max pooling whose output has its input's "
        "shape (strides 1 with padding='same', or pool_size 1) is wrong inside "
        "tf.function (53-77 % relative error against finite differences)",
        "with pool_size 1 and strides 1 the layer is the identity: remove it; "
        "otherwise use padding='valid' or strides that change the shape",
    ),
    _Defect(
        (keras.layers.UpSampling2D, keras.layers.Resizing),
        _bilinear,
        "TensorFlow's second derivative of bilinear resizing is wrong (60-90 % "
        "relative error against finite differences, eager and graph, both product "
        "modes)",
        "use interpolation='nearest', or resize in the input pipeline "
        "(tf.data) instead of inside the model",
    ),
)


def second_derivative_defects(model: keras.layers.Layer) -> list[str]:
    """One line per layer of ``model`` whose second derivatives TensorFlow gets wrong."""
    found = []
    for defect in _DEFECTS:
        for layer in matching_layers(model, defect.layer_types):
            if defect.applies(layer):
                found.append(
                    f"layer '{layer.name}' ({type(layer).__name__}): {defect.what}; "
                    f"{defect.way_out}"
                )
    return found


def check_second_derivatives(model: keras.layers.Layer, purpose: str) -> None:
    """Raise ``ValueError`` if a product through ``model`` would be silently wrong.

    Args:
        model: the model whose loss is differentiated twice.
        purpose: what needs the products, for the message (e.g. ``"tfcurv.Hessian"``).
    """
    defects = second_derivative_defects(model)
    if defects:
        raise ValueError(
            f"{purpose} needs exact second derivatives of `model`, which TensorFlow "
            "does not compute for:\n- " + "\n- ".join(defects)
        )
