"""The layer table: one block per Keras layer type, for every curvature consumer.

A *block* knows, for one layer instance, which trainable variables it owns and
how they meet the layer's input and its pre-activation output gradient. From
tensors the layer capture (:mod:`tfcurv.curvature.layer_capture`) recorded, a
block computes what the consumers need:

* :meth:`Block.statistic_sums` and :meth:`Block.normalized_factors`: AdaFisher's
  diagonal Kronecker factors. The sums are additive, over the calls of a shared
  layer and over replicas, so a consumer adds them up and all-reduces them once;
  the non-linear steps come after. For Dense, Conv2D, BatchNormalization (rank
  4) and LayerNormalization (last axis) they are the official AdaFisher
  statistics (``AtlasAnalyticsLab/AdaFisher``, ``optimizers/AdaFisher.py``);
  the other layers get the same construction (input second moments times output
  gradient second moments, min-max normalised), see each block.
* :meth:`Block.per_example_gradients`: each example's weight gradient for a
  given output cotangent (Curvature Propagation's backward rule at a
  parameterised layer).

Every variable's factors are a pair ``(lead, last)``: ``lead`` over the
variable's leading axes (``prod(shape[:-1])`` entries, one for a 1-D variable)
and ``last`` over its last axis, so that ``outer(lead, last)`` reshaped is the
variable's diagonal. Slots of these sizes can be built from the variable list
alone. A block whose Kronecker structure does not split a variable this way
(a depthwise kernel with ``depth_multiplier > 1``, an ``EinsumDense`` kernel with
several output axes) gives the closest such pair: the row and column sums of its
diagonal divided by the total (exact whenever the diagonal has rank one).

Parameter-free layers are in the table too, with what Curvature Propagation must
know of them: linear in their input, elementwise, or neither.

:func:`block_for` looks a layer up. A subclass of a registered layer counts only
if it keeps the registered ``call``; anything else is not in the table, and each
consumer says so loudly (Curvature Propagation raises, AdaFisher falls back to a
diagonal block built from the gradient and warns).
"""

from __future__ import annotations

import math
import string

import keras
import tensorflow as tf

__all__ = [
    "ELEMENTWISE_ACTIVATIONS",
    "Block",
    "activation_name",
    "block_for",
    "min_max_normalize",
    "rank_one_factors",
    "supported_layer_types",
]

L = keras.layers
#: Absolute term in the official min-max normalisation.
MIN_MAX_EPSILON = 1e-6


# --------------------------------------------------------------------- helpers
def min_max_normalize(vector, single_entry_is_one: bool = False):
    """``(v - min v) / (max v - min v + 1e-6)`` after ``+inf -> 1``, ``-inf -> 0``.

    The official normalisation, which turns a vector of one entry into 0 (its
    minimum), leaving only the damping. The layers the official code does not
    have pass ``single_entry_is_one=True``: a lone entry is then 1 (its maximum).
    """
    one = tf.ones_like(vector)
    vector = tf.where(tf.equal(vector, math.inf), one, vector)
    vector = tf.where(tf.equal(vector, -math.inf), tf.zeros_like(vector), vector)
    if single_entry_is_one and vector.shape[0] == 1:
        return one
    low = tf.reduce_min(vector)
    return (vector - low) / (tf.reduce_max(vector) - low + MIN_MAX_EPSILON)


def rank_one_factors(diagonal, shape) -> tuple:
    """``(lead, last)`` with ``outer(lead, last)`` the best rank-one split of
    ``diagonal`` (non-negative, of ``shape``) into leading axes x last axis:
    row sums and column sums over the total (exact when it has rank one)."""
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    matrix = tf.reshape(diagonal, (rows, -1))
    lead = tf.reduce_sum(matrix, axis=1)
    last = tf.reduce_sum(matrix, axis=0)
    total = tf.reduce_sum(lead)
    safe = tf.where(total > 0, total, tf.ones_like(total))
    return lead, tf.where(total > 0, last / safe, tf.ones_like(last))


def _normalize(vector):
    """:func:`min_max_normalize` for the layers the official code does not have."""
    return min_max_normalize(vector, single_entry_is_one=True)


def _count(tensor, axes) -> tf.Tensor:
    return tf.cast(tf.reduce_prod(tf.gather(tf.shape(tensor), axes)), tensor.dtype)


def _rows(tensor):
    return tf.reshape(tensor, (-1, tensor.shape[-1]))


def _append_entry(vector, entry, append: bool):
    if not append:
        return vector
    return tf.concat([vector, tf.reshape(tf.cast(entry, vector.dtype), (1,))], axis=0)


def _channels_last(layer, tensor):
    if getattr(layer, "data_format", "channels_last") == "channels_first":
        rank = len(tensor.shape)
        return tf.transpose(tensor, (0, *range(2, rank), 1))
    return tensor


def _patches(tensor, kernel_size, strides, dilation_rate, padding: str):
    """Windows of a channels-last tensor, ``(N, *out_positions, prod(k) * C)`` in
    ``(k..., channel)`` order; ``None`` where TensorFlow has no patch op."""
    rank = len(kernel_size)
    if padding == "causal":
        left = dilation_rate[0] * (kernel_size[0] - 1)
        tensor = tf.pad(tensor, [[0, 0], [left, 0], [0, 0]])
        padding = "valid"
    if rank == 1:
        images = tensor[:, None]
        kernel_size, strides, dilation_rate = (
            (1, *kernel_size), (1, *strides), (1, *dilation_rate)
        )  # fmt: skip
    elif rank == 2:
        images = tensor
    elif rank == 3 and all(d == 1 for d in dilation_rate):
        return tf.extract_volume_patches(
            tensor, (1, *kernel_size, 1), (1, *strides, 1), padding.upper()
        )
    else:
        return None
    patches = tf.image.extract_patches(
        images,
        sizes=(1, *kernel_size, 1),
        strides=(1, *strides, 1),
        rates=(1, *dilation_rate, 1),
        padding=padding.upper(),
    )
    return patches[:, 0] if rank == 1 else patches


def _patch_square_sums(layer, x, dtype):
    """Sum over examples and output positions of the squared input patches of
    a convolution, ``(prod(kernel_size) * C,)`` in ``(k..., C)`` order. Patches
    only select (zero-padded) entries, so this is the patches of the
    batch-summed squares: one image, whatever the batch size."""
    x = _channels_last(layer, tf.cast(x, dtype))
    squares = tf.reduce_sum(x * x, axis=0, keepdims=True)
    patches = _patches(
        squares, layer.kernel_size, layer.strides, layer.dilation_rate, layer.padding
    )
    return tf.reduce_sum(patches, axis=tuple(range(len(layer.kernel_size) + 1)))


def _has_patches(layer) -> bool:
    """Whether :func:`_patches` has an op for the layer's rank and dilation."""
    return len(layer.kernel_size) < 3 or all(d == 1 for d in layer.dilation_rate)


def _vectorized_per_example(variables, function, x, g):
    """Each example's gradient of ``<g_n, function(x_n)>`` by ``variables``."""

    def one(pair):
        x_n, g_n = pair
        with tf.GradientTape() as tape:
            tape.watch(values)
            y = function(x_n[None], values)
            objective = tf.reduce_sum(tf.cast(y, g_n.dtype) * g_n[None])
        return tape.gradient(
            objective, values, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )

    values = [tf.convert_to_tensor(v.value) for v in variables]
    return tf.vectorized_map(one, (x, g), fallback_to_while_loop=True)


# ---------------------------------------------------------------------- blocks
class Block:
    """What the consumers know of one layer instance (see the module docstring).

    Attributes:
        layer: the Keras layer.
        variables: the trainable variables it owns, in a fixed order.
        linear_in_input: the pre-activation output is linear (affine) in the
            layer's input, so a Hessian has no second-derivative term there.
        elementwise: the whole layer is an elementwise function of its input.
    """

    linear_in_input = True
    elementwise = False

    def __init__(self, layer: keras.layers.Layer):
        self.layer = layer

    @property
    def variables(self) -> list:
        """The trainable variables the layer owns (the layer must be built)."""
        return [v for v in self._owned() if v is not None and v.trainable]

    def _owned(self) -> list:
        return []

    # AdaFisher statistics ---------------------------------------------------
    def supports_statistics(self, x) -> bool:
        """Whether a call with input ``x`` can be Kronecker-factored (static
        shapes and configuration only; otherwise the consumer's fallback)."""
        return False

    def statistic_sums(self, x, g, dtype) -> list:
        """Additive sums for :meth:`normalized_factors` of one call."""
        raise NotImplementedError

    def normalized_factors(self, sums) -> list[tuple]:
        """``(lead, last)`` per variable, from the sums of all calls and replicas."""
        raise NotImplementedError

    # Curvature Propagation ------------------------------------------------
    def per_example_gradients(self, x, g) -> list:
        """``(N, *variable.shape)`` per variable: each example's weight gradient
        of ``<g, pre-activation output>``."""
        return _vectorized_per_example(
            self.variables, self._linear_call, x, g
        )

    def _linear_call(self, x, values):
        """The pre-activation output with the variables replaced by ``values``."""
        raise NotImplementedError


class _KernelBias(Block):
    def _owned(self):
        return [self.layer.kernel, getattr(self.layer, "bias", None)]

    @property
    def _has_bias(self) -> bool:
        return getattr(self.layer, "bias", None) is not None and self.layer.bias.trainable

    def _split(self, h, s, kernel_rows: int) -> list[tuple]:
        """``(h[:kernel_rows], s)`` for the kernel, then the bias entry with ``s``."""
        pairs = [(h[:kernel_rows], s)]
        if self._has_bias:
            pairs.append((h[kernel_rows:], s))
        return pairs

    def _row_gradients(self, rows, g) -> list:
        """Per-example gradients of a kernel met as ``rows @ kernel``: the
        kernel's as ``(N, inputs, outputs)``, then the bias'."""
        count = tf.shape(g)[0]
        flat_in = tf.reshape(rows, [count, -1, rows.shape[-1]])
        flat_out = tf.reshape(g, [count, -1, g.shape[-1]])
        result = [tf.einsum("npi,npo->nio", flat_in, flat_out)]
        if self._has_bias:
            result.append(tf.reduce_sum(flat_out, axis=1))
        return result

    def _linear_call(self, x, values):
        kernel = values[0]
        y = self._kernel_op(x, kernel)
        if self._has_bias and len(values) > 1:
            y = y + _broadcast_bias(self.layer, values[1], len(y.shape))
        return y

    def _kernel_op(self, x, kernel):
        """The layer's linear map of ``x`` with ``kernel``, before the bias."""
        raise NotImplementedError


class DenseBlock(_KernelBias):
    """``y = x W + b`` over the last axis. Official AdaFisher: rows are all
    leading positions, ``H = mean [x, 1]^2``, ``S = mean G^2``."""

    def supports_statistics(self, x) -> bool:
        return True

    def statistic_sums(self, x, g, dtype):
        x, g = _rows(tf.cast(x, dtype)), _rows(tf.cast(g, dtype))
        return [tf.reduce_sum(x * x, 0), tf.reduce_sum(g * g, 0), _count(x, [0])]

    def raw_factors(self, sums):
        """The official ``(h, s)`` before normalisation."""
        x_squares, g_squares, rows = sums
        return _append_entry(x_squares, rows, self._has_bias) / rows, g_squares / rows

    def normalized_factors(self, sums):
        h, s = (min_max_normalize(f) for f in self.raw_factors(sums))
        return self._split(h, s, sums[0].shape[0])

    def per_example_gradients(self, x, g):
        return self._row_gradients(x, g)


class ConvBlock(_KernelBias):
    """Conv1D/2D/3D. Official AdaFisher (Conv2d): rows are (sample, group,
    output position); ``H`` over ``(k..., C_in / groups)`` plus the bias entry,
    divided by ``positions * patch length`` (the official normaliser), ``S`` per
    output channel. tfcurv uses the layer's own padding and dilation."""

    def _geometry(self):
        layer = self.layer
        return layer.kernel_size, layer.strides, layer.dilation_rate, layer.padding

    def supports_statistics(self, x) -> bool:
        return _has_patches(self.layer)

    def statistic_sums(self, x, g, dtype):
        layer = self.layer
        g = _channels_last(layer, tf.cast(g, dtype))
        # Each group's patch is one more row: sum the groups' entries.
        per_entry = tf.reshape(
            _patch_square_sums(layer, x, dtype),
            (math.prod(layer.kernel_size), layer.groups, -1),
        )
        x_squares = tf.reshape(tf.reduce_sum(per_entry, axis=1), (-1,))
        spatial = list(range(len(layer.kernel_size) + 1))
        return [x_squares, tf.reduce_sum(g * g, axis=spatial), _count(g, spatial)]

    def raw_factors(self, sums):
        """The official ``(h, s)`` before normalisation."""
        x_squares, g_squares, positions = sums
        patch_length = x_squares.shape[0]
        h = _append_entry(x_squares, positions * self.layer.groups, self._has_bias)
        return h / (positions * patch_length), g_squares / positions

    def normalized_factors(self, sums):
        h, s = (min_max_normalize(f) for f in self.raw_factors(sums))
        return self._split(h, s, sums[0].shape[0])

    def per_example_gradients(self, x, g):
        layer = self.layer
        if layer.groups != 1 or layer.data_format != "channels_last":
            return super().per_example_gradients(x, g)
        patches = _patches(x, *self._geometry())
        if patches is None:
            return super().per_example_gradients(x, g)
        result = self._row_gradients(patches, g)
        result[0] = tf.reshape(result[0], [-1, *layer.kernel.shape])
        return result

    def _kernel_op(self, x, kernel):
        layer = self.layer
        if layer.groups != 1:
            return _grouped_conv(layer, x, kernel)
        return keras.ops.conv(
            x, kernel, layer.strides, layer.padding, layer.data_format,
            layer.dilation_rate,
        )  # fmt: skip


def _grouped_conv(layer, x, kernel):
    """A grouped convolution as one convolution per group (public ops only)."""
    axis = 1 if layer.data_format == "channels_first" else -1
    inputs = tf.split(x, layer.groups, axis=axis)
    kernels = tf.split(kernel, layer.groups, axis=-1)
    return tf.concat(
        [
            keras.ops.conv(
                part, weights, layer.strides, layer.padding, layer.data_format,
                layer.dilation_rate,
            )  # fmt: skip
            for part, weights in zip(inputs, kernels)
        ],
        axis=axis,
    )


def _broadcast_bias(layer, bias, rank):
    if getattr(layer, "data_format", "channels_last") == "channels_first":
        return tf.reshape(bias, (1, -1) + (1,) * (rank - 2))
    return bias


class _swapped:
    """Temporarily read the plain attributes ``layer.<name>`` (the variables of
    a normalisation layer) from given tensors; at trace time only."""

    def __init__(self, layer, **values):
        self.layer, self.values = layer, values

    def __enter__(self):
        self.saved = {name: self.layer.__dict__[name] for name in self.values}
        self.layer.__dict__.update(self.values)
        return self

    def __exit__(self, *exc):
        self.layer.__dict__.update(self.saved)


class DepthwiseBlock(_KernelBias):
    """DepthwiseConv1D/2D: output channel ``c * M + m`` reads input channel
    ``c`` only. ``H`` over the patches ``(k..., c)`` (and the bias entry),
    ``S`` per output channel; the kernel's diagonal ``H[k, c] S[c, m]`` is split
    into ``(k..., c) x m`` (exact for ``depth_multiplier=1``)."""

    def supports_statistics(self, x) -> bool:
        return _has_patches(self.layer)

    def statistic_sums(self, x, g, dtype):
        layer = self.layer
        g = _channels_last(layer, tf.cast(g, dtype))
        spatial = list(range(len(layer.kernel_size) + 1))
        x_squares = _patch_square_sums(layer, x, dtype)
        return [x_squares, tf.reduce_sum(g * g, axis=spatial), _count(g, spatial)]

    def normalized_factors(self, sums):
        x_squares, g_squares, rows = sums
        size = x_squares.shape[0]
        h = _normalize(_append_entry(x_squares, rows, self._has_bias) / rows)
        s = _normalize(g_squares / rows)
        shape = tuple(self.layer.kernel.shape)  # (k..., C, M)
        channels, multiplier = shape[-2:]
        diagonal = tf.reshape(h[:size], (-1, channels, 1)) * tf.reshape(
            s, (1, channels, multiplier)
        )
        pairs = [rank_one_factors(diagonal, shape)]
        if self._has_bias:
            pairs.append((h[size:], s))
        return pairs

    def _kernel_op(self, x, kernel):
        layer = self.layer
        return keras.ops.depthwise_conv(
            x, kernel, layer.strides, layer.padding, layer.data_format,
            layer.dilation_rate,
        )  # fmt: skip


class SeparableBlock(Block):
    """SeparableConv1D/2D: a depthwise convolution, then a pointwise one. The
    intermediate tensor and its gradient are recomputed from the captured
    input and output gradient; the depthwise kernel gets
    :class:`DepthwiseBlock`'s factors, the pointwise kernel and bias
    :class:`DenseBlock`'s, each part normalised on its own."""

    def _owned(self):
        layer = self.layer
        return [layer.depthwise_kernel, layer.pointwise_kernel, layer.bias]

    def _intermediate(self, x, dtype):
        layer = self.layer
        return keras.ops.depthwise_conv(
            tf.cast(x, dtype), tf.cast(layer.depthwise_kernel, dtype), layer.strides,
            layer.padding, layer.data_format, layer.dilation_rate,
        )  # fmt: skip

    def supports_statistics(self, x) -> bool:
        layer = self.layer
        return layer.depthwise_kernel.trainable and layer.pointwise_kernel.trainable

    def statistic_sums(self, x, g, dtype):
        layer = self.layer
        g = _channels_last(layer, tf.cast(g, dtype))
        middle = _channels_last(layer, self._intermediate(x, dtype))
        pointwise = tf.reshape(tf.cast(layer.pointwise_kernel, dtype), (middle.shape[-1], -1))
        g_middle = tf.einsum("...o,io->...i", g, pointwise)
        spatial = list(range(len(layer.kernel_size) + 1))
        m, gr = _rows(middle), _rows(g)
        return [
            _patch_square_sums(layer, x, dtype),
            tf.reduce_sum(g_middle * g_middle, axis=spatial),
            _count(g, spatial),
            tf.reduce_sum(m * m, 0),
            tf.reduce_sum(gr * gr, 0),
        ]

    def normalized_factors(self, sums):
        x_squares, gm_squares, rows, m_squares, g_squares = sums
        layer = self.layer
        shape = tuple(layer.depthwise_kernel.shape)
        channels, multiplier = shape[-2:]
        h = _normalize(x_squares / rows)
        s = _normalize(gm_squares / rows)
        diagonal = tf.reshape(h, (-1, channels, 1)) * tf.reshape(
            s, (1, channels, multiplier)
        )
        has_bias = layer.bias is not None and layer.bias.trainable
        hp = _normalize(_append_entry(m_squares, rows, has_bias) / rows)
        sp = _normalize(g_squares / rows)
        size = m_squares.shape[0]
        pairs = [rank_one_factors(diagonal, shape), (hp[:size], sp)]
        if has_bias:
            pairs.append((hp[size:], sp))
        return pairs

    def _linear_call(self, x, values):
        layer = self.layer
        depthwise, pointwise = values[0], values[1]
        middle = keras.ops.depthwise_conv(
            x, depthwise, layer.strides, layer.padding, layer.data_format,
            layer.dilation_rate,
        )  # fmt: skip
        y = keras.ops.conv(middle, pointwise, 1, "valid", layer.data_format)
        if len(values) > 2:
            y = y + _broadcast_bias(layer, values[2], len(y.shape))
        return y


class ConvTransposeBlock(_KernelBias):
    """Conv1D/2D/3DTranspose, the input gradient of a convolution: each input
    position meets a window of the output gradient. ``H`` per input channel
    (and the bias entry), ``S`` over the output-gradient windows
    ``(k..., C_out)``; the kernel ``(k..., C_out, C_in)`` gets ``(S, H)``."""

    def _windows(self, g):
        layer = self.layer
        return _patches(
            g, layer.kernel_size, layer.strides, layer.dilation_rate, layer.padding
        )

    def supports_statistics(self, x) -> bool:
        """The output-gradient windows must land one per input position: no
        ``output_padding``, and a patch op for the rank."""
        layer = self.layer
        return layer.output_padding is None and _has_patches(layer)

    def statistic_sums(self, x, g, dtype):
        layer = self.layer
        x = _channels_last(layer, tf.cast(x, dtype))
        g = _channels_last(layer, tf.cast(g, dtype))
        windows = self._windows(g)
        if tuple(windows.shape[1:-1]) != tuple(x.shape[1:-1]):
            raise ValueError(
                f"{layer.name}: output-gradient windows {windows.shape} do not "
                f"match the input {x.shape}"
            )
        xr, wr, gr = _rows(x), _rows(windows), _rows(g)
        return [
            tf.reduce_sum(xr * xr, 0), tf.reduce_sum(wr * wr, 0), _count(xr, [0]),
            tf.reduce_sum(gr * gr, 0), _count(gr, [0]),
        ]  # fmt: skip

    def normalized_factors(self, sums):
        x_squares, w_squares, rows, g_squares, out_rows = sums
        h = _normalize(_append_entry(x_squares, rows, self._has_bias) / rows)
        s = _normalize(w_squares / rows)
        size = x_squares.shape[0]
        pairs = [(s, h[:size])]
        if self._has_bias:
            pairs.append((h[size:], _normalize(g_squares / out_rows)))
        return pairs

    def per_example_gradients(self, x, g):
        layer = self.layer
        windows = (
            self._windows(g)
            if layer.data_format == "channels_last" and layer.output_padding is None
            else None
        )
        if windows is None or tuple(windows.shape[1:-1]) != tuple(x.shape[1:-1]):
            return super().per_example_gradients(x, g)
        count = tf.shape(x)[0]
        flat_in = tf.reshape(x, [count, -1, x.shape[-1]])
        flat_w = tf.reshape(windows, [count, -1, windows.shape[-1]])
        kernel = tf.einsum("npw,npi->nwi", flat_w, flat_in)
        result = [tf.reshape(kernel, [-1, *layer.kernel.shape])]
        if self._has_bias:
            result.append(tf.reduce_sum(tf.reshape(g, [count, -1, g.shape[-1]]), 1))
        return result

    def _kernel_op(self, x, kernel):
        layer = self.layer
        return keras.ops.conv_transpose(
            x, kernel, layer.strides, layer.padding, layer.output_padding,
            layer.data_format, layer.dilation_rate,
        )  # fmt: skip


class EinsumDenseBlock(_KernelBias):
    """``EinsumDense``: rows are the input axes the kernel does not touch,
    ``H`` over the contracted kernel axes, ``S`` over the kernel's output axes
    (as :class:`DenseBlock` after moving axes). A kernel split other than
    "contracted axes, then one output axis" is factored by
    :func:`rank_one_factors`. Equations with an axis in input, kernel and
    output at once (a batched product) are not Kronecker-factored."""

    def _parse(self, rank: int | None = None):
        """The equation's specs; ``...`` becomes ``rank``'s leftover axes
        (none when ``rank`` is None: the kernel's axes never depend on it)."""
        equation = self.layer.equation.replace(" ", "")
        inputs, rest = equation.split(",")
        kernel, output = rest.split("->")
        if "..." in inputs or "..." in output:
            free = [c for c in string.ascii_letters if c not in equation]
            width = 0 if rank is None else rank - (len(inputs) - 3)
            filler = "".join(free[:width])
            inputs, output = inputs.replace("...", filler), output.replace("...", filler)
        contracted = [c for c in kernel if c in inputs and c not in output]
        outs = [c for c in kernel if c in output and c not in inputs]
        rows = [c for c in inputs if c not in kernel]
        if (
            len(contracted) + len(outs) != len(kernel)
            or any(c not in output for c in rows)
            or sorted(rows + outs) != sorted(output)
        ):
            return None
        bias_axes = self.layer.bias_axes or ""
        if any(c not in outs for c in bias_axes):
            return None
        return inputs, kernel, output, contracted, outs, rows

    def supports_statistics(self, x) -> bool:
        return self._parse(len(x.shape)) is not None

    def statistic_sums(self, x, g, dtype):
        specs = self._parse(len(x.shape))
        inputs, kernel, output, contracted, outs, rows = specs
        x, g = tf.cast(x, dtype), tf.cast(g, dtype)
        xs = tf.einsum(f"{inputs}->{''.join(contracted)}", x * x)
        gs = tf.einsum(f"{output}->{''.join(outs)}", g * g)
        count = tf.cast(tf.size(x), dtype) / tf.cast(tf.size(xs), dtype)
        return [tf.reshape(xs, (-1,)), tf.reshape(gs, (-1,)), count]

    def raw_factors(self, sums):
        """``(h, s)`` before normalisation: mean squares over the rows (with
        the bias entry), contracted and output axes flattened in kernel order."""
        x_squares, g_squares, rows = sums
        return _append_entry(x_squares, rows, self._has_bias) / rows, g_squares / rows

    def normalized_factors(self, sums):
        _, kernel, _, contracted, outs, _ = self._parse()
        h, s = (_normalize(f) for f in self.raw_factors(sums))
        size = sums[0].shape[0]
        shape = dict(zip(kernel, self.layer.kernel.shape))
        h_full = tf.reshape(h[:size], [shape[c] for c in contracted])
        s_full = tf.reshape(s, [shape[c] for c in outs])
        diagonal = tf.einsum(
            f"{''.join(contracted)},{''.join(outs)}->{kernel}", h_full, s_full
        )
        pairs = [rank_one_factors(diagonal, tuple(self.layer.kernel.shape))]
        if self._has_bias:
            bias_letters = "".join(c for c in outs if c in self.layer.bias_axes)
            s_bias = tf.einsum(f"{''.join(outs)}->{bias_letters}", s_full)
            pairs.append(
                rank_one_factors(
                    tf.reshape(h[size:] * tf.reshape(s_bias, (-1,)), self.layer.bias.shape),
                    tuple(self.layer.bias.shape),
                )
            )
        return pairs

    def _kernel_op(self, x, kernel):
        return keras.ops.einsum(self.layer.equation, x, kernel)


class EmbeddingBlock(Block):
    """``Embedding``: the input is a one-hot row per token, so ``H`` is each
    token's frequency among the rows and ``S = mean G^2``; no bias."""

    def _owned(self):
        return [self.layer.embeddings]

    def supports_statistics(self, x) -> bool:
        return True

    def statistic_sums(self, x, g, dtype):
        vocabulary = self.layer.input_dim
        ids = tf.reshape(tf.cast(x, tf.int32), (-1,))
        counts = tf.math.unsorted_segment_sum(
            tf.ones_like(ids, dtype), ids, vocabulary
        )
        g = _rows(tf.cast(g, dtype))
        return [counts, tf.reduce_sum(g * g, 0), _count(g, [0])]

    def normalized_factors(self, sums):
        counts, g_squares, rows = sums
        return [(_normalize(counts / rows), _normalize(g_squares / rows))]

    def per_example_gradients(self, x, g):
        vocabulary = self.layer.input_dim
        count = tf.shape(x)[0]
        ids = tf.reshape(tf.cast(x, tf.int32), [count, -1])
        rows = tf.reshape(g, [count, -1, g.shape[-1]])
        segments = ids + vocabulary * tf.range(count)[:, None]
        table = tf.math.unsorted_segment_sum(
            tf.reshape(rows, [-1, g.shape[-1]]),
            tf.reshape(segments, [-1]),
            count * vocabulary,
        )
        return [tf.reshape(table, [count, vocabulary, g.shape[-1]])]


class _ScaleShift(Block):
    """Normalisation layers: ``gamma`` and ``beta`` per channel. The official
    factors: ``H = [sum u^2, len(u)] / B^2`` (gamma gets the first entry, beta
    the second) and ``S = (sum G)^2 / B`` per channel."""

    def _owned(self):
        return [getattr(self.layer, "gamma", None), getattr(self.layer, "beta", None)]

    def supports_statistics(self, x) -> bool:
        return True

    def _parts(self):
        layer = self.layer
        present = [getattr(layer, "gamma", None), getattr(layer, "beta", None)]
        return [i for i, v in enumerate(present) if v is not None and v.trainable]

    def raw_factors(self, sums):
        """The official ``(h, s)`` before normalisation."""
        u, g_sum, batch = sums
        h = tf.stack([tf.reduce_sum(u * u), tf.cast(tf.size(u), u.dtype)]) / (batch * batch)
        return h, g_sum * g_sum / batch

    def normalized_factors(self, sums):
        h, s = (min_max_normalize(f) for f in self.raw_factors(sums))
        return [(h[i : i + 1], s) for i in self._parts()]


def _per_channel_sums(axis: int, x, g, dtype) -> list:
    """The official BatchNorm2d sums for any rank: ``u_c = sum x / (spatial
    size)^2`` over all axes but the channel one, ``sum G`` likewise, and the
    batch size."""
    x, g = tf.cast(x, dtype), tf.cast(g, dtype)
    rank = len(x.shape)
    other = [a for a in range(rank) if a != axis % rank]
    spatial = _count(x, other[1:]) if rank > 2 else tf.ones((), dtype)
    u = tf.reduce_sum(x, axis=other) / (spatial * spatial)
    return [u, tf.reduce_sum(g, axis=other), _count(x, [0])]


class BatchNormBlock(_ScaleShift):
    """BatchNormalization on any rank: ``u_c = sum x / (spatial size)^2``
    (official for rank 4; rank 2 has spatial size 1). Examples mix in
    training mode, which Curvature Propagation refuses."""

    def statistic_sums(self, x, g, dtype):
        return _per_channel_sums(self.layer.axis, x, g, dtype)

    def per_example_gradients(self, x, g):
        layer = self.layer
        rank = len(x.shape)
        shape = [1] * rank
        shape[layer.axis % rank] = -1
        normalised = (x - tf.reshape(layer.moving_mean, shape)) * tf.math.rsqrt(
            tf.reshape(layer.moving_variance, shape) + layer.epsilon
        )
        axes = [a for a in range(1, rank) if a != layer.axis % rank]
        present = {
            0: tf.reduce_sum(normalised * g, axis=axes),
            1: tf.reduce_sum(g, axis=axes),
        }
        return [present[i] for i in self._parts()]


class LayerNormBlock(_ScaleShift):
    """LayerNormalization over the last axis: literally the official branch
    (``u`` sums over every axis but axis 1, divided by the squared product of
    the other non-batch sizes; ``S`` sums ``G`` over all but the last axis).
    Non-linear in its input."""

    linear_in_input = False

    def supports_statistics(self, x) -> bool:
        rank = len(x.shape)
        axis = getattr(self.layer, "axis", -1)
        axes = [a % rank for a in (axis if isinstance(axis, (list, tuple)) else [axis])]
        return axes == [rank - 1] and rank >= 2

    def statistic_sums(self, x, g, dtype):
        x, g = tf.cast(x, dtype), tf.cast(g, dtype)
        rank = len(x.shape)
        norm = _count(x, list(range(2, rank))) if rank > 2 else tf.ones((), dtype)
        u = tf.reduce_sum(x, axis=[a for a in range(rank) if a != 1]) / (norm * norm)
        return [u, tf.reduce_sum(g, axis=list(range(rank - 1))), _count(x, [0])]

    def _linear_call(self, x, values):
        present = dict(zip(self._parts(), values))
        names = {0: "gamma", 1: "beta"}
        with _swapped(self.layer, **{names[i]: v for i, v in present.items()}):
            return type(self.layer).call(self.layer, x)


class GroupNormBlock(LayerNormBlock):
    """GroupNormalization: per-channel ``gamma``/``beta``, statistics as
    :class:`BatchNormBlock` builds them (per channel, over batch and space)."""

    def supports_statistics(self, x) -> bool:
        return True

    def statistic_sums(self, x, g, dtype):
        return _per_channel_sums(self.layer.axis, x, g, dtype)


class RMSNormBlock(LayerNormBlock):
    """RMSNormalization (a scale only), statistics as :class:`LayerNormBlock`."""

    def _owned(self):
        return [self.layer.scale]

    def _parts(self):
        return [0] if self.layer.scale.trainable else []

    def _linear_call(self, x, values):
        with _swapped(self.layer, scale=values[0]):
            return type(self.layer).call(self.layer, x)


class LinearBlock(Block):
    """A parameter-free layer linear in its input (reshaping, pooling by
    averaging, padding, cropping, merging, dropout), or piecewise linear with a
    second derivative of 0 where it is differentiable (max pooling)."""


#: Activations that act on each entry alone (``softmax`` does not).
ELEMENTWISE_ACTIVATIONS = frozenset(
    {
        "relu", "tanh", "sigmoid", "softplus", "gelu", "elu", "selu", "silu",
        "swish", "leaky_relu", "relu6", "softsign", "exponential", "mish",
        "hard_sigmoid", "hard_silu", "hard_swish", "log_sigmoid", "linear",
    }
)  # fmt: skip


def activation_name(function) -> str:
    """The name of a Keras activation function (or of any callable)."""
    return getattr(function, "__name__", type(function).__name__)


class ElementwiseBlock(Block):
    """A parameter-free activation layer; elementwise unless its function is
    not (``Activation("softmax")``)."""

    linear_in_input = False

    def __init__(self, layer):
        super().__init__(layer)
        function = getattr(layer, "activation", None)
        self.elementwise = function is None or (
            activation_name(function) in ELEMENTWISE_ACTIVATIONS
        )


# Softmax is absent on purpose: it is not elementwise.
_TABLE: dict[type, type[Block]] = {
    L.Dense: DenseBlock,
    L.EinsumDense: EinsumDenseBlock,
    L.Conv1D: ConvBlock, L.Conv2D: ConvBlock, L.Conv3D: ConvBlock,
    L.DepthwiseConv1D: DepthwiseBlock, L.DepthwiseConv2D: DepthwiseBlock,
    L.SeparableConv1D: SeparableBlock, L.SeparableConv2D: SeparableBlock,
    L.Conv1DTranspose: ConvTransposeBlock, L.Conv2DTranspose: ConvTransposeBlock,
    L.Conv3DTranspose: ConvTransposeBlock,
    L.Embedding: EmbeddingBlock,
    L.BatchNormalization: BatchNormBlock,
    L.LayerNormalization: LayerNormBlock,
    L.GroupNormalization: GroupNormBlock,
    L.InputLayer: LinearBlock, L.Flatten: LinearBlock, L.Reshape: LinearBlock,
    L.Permute: LinearBlock, L.RepeatVector: LinearBlock,
    L.Add: LinearBlock, L.Subtract: LinearBlock, L.Average: LinearBlock,
    L.Concatenate: LinearBlock, L.Dropout: LinearBlock, L.SpatialDropout1D: LinearBlock,
    L.SpatialDropout2D: LinearBlock, L.Identity: LinearBlock,
    L.AveragePooling1D: LinearBlock, L.AveragePooling2D: LinearBlock,
    L.AveragePooling3D: LinearBlock, L.GlobalAveragePooling1D: LinearBlock,
    L.GlobalAveragePooling2D: LinearBlock, L.GlobalAveragePooling3D: LinearBlock,
    L.ZeroPadding1D: LinearBlock, L.ZeroPadding2D: LinearBlock, L.ZeroPadding3D: LinearBlock,
    L.Cropping1D: LinearBlock, L.Cropping2D: LinearBlock, L.Cropping3D: LinearBlock,
    L.MaxPooling1D: LinearBlock, L.MaxPooling2D: LinearBlock,
    L.MaxPooling3D: LinearBlock, L.GlobalMaxPooling1D: LinearBlock,
    L.GlobalMaxPooling2D: LinearBlock, L.GlobalMaxPooling3D: LinearBlock,
    L.Activation: ElementwiseBlock, L.ReLU: ElementwiseBlock,
    L.LeakyReLU: ElementwiseBlock, L.ELU: ElementwiseBlock,
}  # fmt: skip
if hasattr(L, "RMSNormalization"):
    _TABLE[L.RMSNormalization] = RMSNormBlock


def supported_layer_types(parameterised_only: bool = False) -> tuple[type, ...]:
    """The layer classes of the table (those owning variables, if asked)."""
    return tuple(
        layer_type
        for layer_type, block in _TABLE.items()
        if not parameterised_only
        or block not in (LinearBlock, ElementwiseBlock)
    )


def block_for(layer: keras.layers.Layer) -> Block | None:
    """The block of ``layer``, or None if its type is not in the table.

    A subclass of a registered type is looked up as that type only when it
    keeps the registered ``call`` (LoRA and quantized kernels are refused).
    """
    for layer_type in type(layer).__mro__:
        block = _TABLE.get(layer_type)
        if block is None:
            continue
        if type(layer).call is not layer_type.call:
            return None
        if getattr(layer, "lora_enabled", False) or getattr(
            layer, "quantization_mode", None
        ):
            return None
        return block(layer)
    return None
