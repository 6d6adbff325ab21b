"""Per-layer diagonal Kronecker factors of the empirical Fisher, as AdaFisher codes them.

For one supported layer, AdaFisher keeps two vectors: ``H`` from the layer's
input (the diagonal of the input-side factor, one entry per kernel row plus one
for the bias) and ``S`` from the gradient of the loss with respect to the layer's
pre-activation output (one entry per output unit). The preconditioner of the
layer's weights is ``F[j, i] = S[i] * H[j] + damping``.

This module holds the math of the official implementation
(``AtlasAnalyticsLab/AdaFisher``, ``optimizers/AdaFisher.py``), translated to
Keras layouts:

* :func:`factor_layout` decides whether a layer is supported and which slice of
  ``H`` belongs to which of its variables;
* :func:`batch_sums` and :func:`factors_from_sums` compute the fresh ``(h, s)``
  of one step, split at the all-reduce across replicas so that several
  replicas give the statistics of the whole batch;
* :func:`min_max_normalize` is the official normalisation (``+1e-6``).

Deliberate differences from the official code (documented in
``docs/optimizers/adafisher.md``): Conv2D statistics use the layer's own
padding and dilation (the official code ignores dilation), and ``H`` of a
Conv2D kernel is stored in Keras' ``(kh, kw, c_in)`` row order, not torch's
``(c_in, kh, kw)``.
"""

from __future__ import annotations

import dataclasses
import math

import keras
import tensorflow as tf

#: Absolute term in the official min-max normalisation.
MIN_MAX_EPSILON = 1e-6


@dataclasses.dataclass(frozen=True)
class VariablePart:
    """One variable of a supported layer and its slice ``H[start:stop]``."""

    variable: keras.Variable
    start: int
    stop: int


@dataclasses.dataclass(frozen=True)
class FactorLayout:
    """How one supported layer's factors ``H`` (length ``h_size``) and ``S`` map
    onto its variables. ``kind`` is one of ``dense``, ``conv2d``, ``batch_norm``,
    ``layer_norm``."""

    layer: keras.layers.Layer
    kind: str
    h_size: int
    parts: tuple[VariablePart, ...]


def factor_layout(layer: keras.layers.Layer, inputs) -> FactorLayout | str:
    """The layout of ``layer``'s factors, or the reason it is not supported."""
    if isinstance(layer, keras.layers.Dense):
        if getattr(layer, "lora_enabled", False) or layer.quantization_mode:
            return "LoRA or quantized Dense"
        return _kernel_layout(layer, "dense")
    if isinstance(layer, keras.layers.Conv2D):
        if getattr(layer, "lora_enabled", False) or getattr(
            layer, "quantization_mode", None
        ):
            return "LoRA or quantized Conv2D"
        return _kernel_layout(layer, "conv2d")
    if isinstance(layer, keras.layers.BatchNormalization):
        if len(inputs.shape) != 4:
            return (
                f"BatchNormalization on a rank-{len(inputs.shape)} input (the official "
                "code supports BatchNorm2d only)"
            )
        return _normalization_layout(layer, "batch_norm")
    if isinstance(layer, keras.layers.LayerNormalization):
        axes = [a % len(inputs.shape) for a in layer.axis]
        if axes != [len(inputs.shape) - 1] or len(inputs.shape) < 2:
            return "LayerNormalization over axes other than the last one"
        return _normalization_layout(layer, "layer_norm")
    return f"{type(layer).__name__} is not a supported layer type"


def _kernel_layout(layer, kind: str) -> FactorLayout:
    kernel_rows = math.prod(layer.kernel.shape[:-1])
    parts = [VariablePart(layer.kernel, 0, kernel_rows)]
    if layer.bias is not None:
        parts.append(VariablePart(layer.bias, kernel_rows, kernel_rows + 1))
    return FactorLayout(
        layer, kind, kernel_rows + (layer.bias is not None), tuple(parts)
    )


def _normalization_layout(layer, kind: str) -> FactorLayout:
    parts = [
        VariablePart(variable, index, index + 1)
        for index, variable in enumerate((layer.gamma, layer.beta))
        if variable is not None
    ]
    return FactorLayout(layer, kind, 2, tuple(parts))


def batch_sums(layout: FactorLayout, inputs, output_gradients, dtype) -> list:
    """This replica's sums from which :func:`factors_from_sums` builds ``(h, s)``.

    Every returned tensor is a sum over this replica's samples, so summing them
    across replicas gives exactly the sums of the whole global batch; the
    non-linear steps (squares of sums, divisions by the batch size) come after
    that reduction. ``output_gradients`` is the gradient of the mean training
    loss with respect to the layer's pre-activation output.
    """
    x = tf.cast(inputs, dtype)
    g = tf.cast(output_gradients, dtype)
    compute = {
        "dense": _dense_sums,
        "conv2d": _conv2d_sums,
        "batch_norm": _batch_norm_sums,
        "layer_norm": _layer_norm_sums,
    }[layout.kind]
    return compute(layout.layer, x, g)


def factors_from_sums(layout: FactorLayout, sums) -> tuple:
    """The official raw ``(h, s)`` of one layer (before min-max normalisation)."""
    layer = layout.layer
    if layout.kind == "dense":
        # Rows R = all leading dims; h_j = sum_r [x, 1]_rj^2 / R, s_i = sum_r G_ri^2 / R.
        x_squares, g_squares, rows = sums
        h = _append_bias_entry(x_squares, rows, layer.bias is not None)
        return h / rows, g_squares / rows
    if layout.kind == "conv2d":
        # Rows: one per (sample, group, output position); the official normaliser
        # is batch * (output positions * d), where the factor `d` is a quirk.
        x_squares, g_squares, positions = sums
        patch_length = layout.h_size - (layer.bias is not None)
        h = _append_bias_entry(
            x_squares, positions * layer.groups, layer.bias is not None
        )
        return h / (positions * patch_length), g_squares / positions
    # BatchNorm / LayerNorm: h = [sum u^2, len(u)] / B^2, s = (sum G)^2 / B.
    u, g_sum, batch = sums
    h = tf.stack([tf.reduce_sum(u * u), tf.cast(tf.size(u), u.dtype)]) / (batch * batch)
    return h, g_sum * g_sum / batch


def _append_bias_entry(sum_of_squares, bias_entry, has_bias: bool):
    if not has_bias:
        return sum_of_squares
    return tf.concat([sum_of_squares, tf.reshape(bias_entry, (1,))], axis=0)


def _count(tensor, axes) -> tf.Tensor:
    return tf.cast(tf.reduce_prod(tf.gather(tf.shape(tensor), axes)), tensor.dtype)


def _dense_sums(layer, x, g):
    x = tf.reshape(x, (-1, x.shape[-1]))
    g = tf.reshape(g, (-1, g.shape[-1]))
    return [tf.reduce_sum(x * x, axis=0), tf.reduce_sum(g * g, axis=0), _count(x, [0])]


def _conv2d_sums(layer, x, g):
    if layer.data_format == "channels_first":
        x = tf.transpose(x, (0, 2, 3, 1))
        g = tf.transpose(g, (0, 2, 3, 1))
    kh, kw = layer.kernel_size
    # Patches only select (zero-padded) pixels, so the sum over the batch of the
    # squared patches is the patches of the batch-summed squares: one image.
    squares = tf.reduce_sum(x * x, axis=0, keepdims=True)
    patches = tf.image.extract_patches(
        squares,
        sizes=(1, kh, kw, 1),
        strides=(1, *layer.strides, 1),
        rates=(1, *layer.dilation_rate, 1),
        padding=layer.padding.upper(),
    )  # (1, out_h, out_w, kh * kw * channels), in (kh, kw, channel) order
    per_offset = tf.reshape(
        tf.reduce_sum(patches, axis=(0, 1, 2)), (kh, kw, layer.groups, -1)
    )
    # Each group's patch is one more row of the official (rows, d) matrix.
    x_squares = tf.reshape(tf.reduce_sum(per_offset, axis=2), (-1,))
    return [x_squares, tf.reduce_sum(g * g, axis=(0, 1, 2)), _count(g, [0, 1, 2])]


def _batch_norm_sums(layer, x, g):
    # u_c = sum_{n,y,x} x / (H W)^2 (BatchNorm2d on a rank-4 input).
    other_axes = [a for a in range(4) if a != layer.axis % 4]
    spatial = _count(x, other_axes[1:])
    u = tf.reduce_sum(x, axis=other_axes) / (spatial * spatial)
    return [u, tf.reduce_sum(g, axis=other_axes), _count(x, [0])]


def _layer_norm_sums(layer, x, g):
    # Literally the official LayerNorm branch: u reduces over every dim except
    # dim 1 (whatever that axis is) and is divided by the square of the product
    # of the reduced sizes other than the batch; S sums G over all but the last.
    rank = len(x.shape)
    norm = _count(x, list(range(2, rank))) if rank > 2 else tf.ones((), x.dtype)
    u = tf.reduce_sum(x, axis=[a for a in range(rank) if a != 1]) / (norm * norm)
    return [u, tf.reduce_sum(g, axis=list(range(rank - 1))), _count(x, [0])]


def min_max_normalize(vector):
    """``(v - min v) / (max v - min v + 1e-6)`` after ``+inf -> 1``, ``-inf -> 0``."""
    one = tf.ones_like(vector)
    vector = tf.where(tf.equal(vector, math.inf), one, vector)
    vector = tf.where(tf.equal(vector, -math.inf), tf.zeros_like(vector), vector)
    low = tf.reduce_min(vector)
    return (vector - low) / (tf.reduce_max(vector) - low + MIN_MAX_EPSILON)
