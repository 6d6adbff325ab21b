"""Curvature Propagation (Martens, Sutskever & Swersky, ICML 2012): unbiased diagonals.

The Hessian of a layered network is ``H = sum_i J_i^T M_i J_i`` over its
nonlinear nodes (spec §4.2): the loss (``M`` = output Hessian, factored as
``F F^T``) and every elementwise activation (``M = diag(D)``,
``D = phi''(s) * dL/da``). One CP sample draws Rademacher noise ``v_i`` per node
and example and backpropagates two vectors with the gradient's linear maps:
``gamma`` gets ``F_i v_i`` injected at node ``i``, ``delta`` gets ``G_i v_i``, with
``F = diag(sqrt|D|)``, ``G = diag(sign(D) sqrt|D|)`` at activations and
``F = G`` at the loss (the S / gamma-delta form, spec §4.3). Per example,
``wgrad(gamma) * wgrad(delta)`` is an unbiased estimate of that example's
Hessian diagonal; the mean over examples estimates the diagonal of the mean
loss. The Gauss-Newton matrix is the special case without activation terms
(``gamma = delta``).

Implementation: one forward pass records, for every parameterised layer, its
input and a zero "probe" added to its pre-activation output, and for every
activation its input ``s``. Backpropagating ``gamma`` is then a single
``tape.gradient`` of ``<F v, z> + sum_i <F_i v_i, s_i>`` with respect to the
probes (injections enter as constant cotangents), so a sample costs one extra
backward pass per propagated vector (two for the Hessian, one for the GGN).

Supported: Sequential and Functional models of Dense, Conv1D, Conv2D
(channels_last, groups=1), DepthwiseConv2D (channels_last), BatchNormalization
in inference mode, elementwise activations, pooling, Flatten, Reshape, Add / Subtract / Concatenate /
Average, Dropout and padding layers; losses: softmax cross-entropy and sigmoid
binary cross-entropy from logits, mean squared error, on ``(N, C)`` outputs,
without sample weights or regularisation losses. Anything else raises a
``ValueError`` naming the layer.
"""

from __future__ import annotations

import contextlib

import keras
import tensorflow as tf

from tfcurv.curvature import losses as losses_lib
from tfcurv.curvature import vectors as vec
from tfcurv.curvature.exact_moments import exact_second_derivatives

L = keras.layers
_PARAMETERISED = (L.Dense, L.Conv1D, L.Conv2D, L.DepthwiseConv2D, L.BatchNormalization)
_ELEMENTWISE_LAYERS = (L.ReLU, L.LeakyReLU, L.ELU)
_ELEMENTWISE_FUNCTIONS = {
    "relu", "tanh", "sigmoid", "softplus", "gelu", "elu", "selu", "silu", "swish",
    "leaky_relu", "relu6", "softsign", "exponential", "mish", "hard_sigmoid",
    "hard_silu", "hard_swish", "log_sigmoid", "linear",
}  # fmt: skip
_LINEAR = (
    L.InputLayer, L.Flatten, L.Reshape, L.Add, L.Subtract, L.Average, L.Concatenate,
    L.Dropout, L.Identity, L.MaxPooling1D, L.MaxPooling2D, L.AveragePooling1D,
    L.AveragePooling2D, L.GlobalAveragePooling1D, L.GlobalAveragePooling2D,
    L.GlobalMaxPooling1D, L.GlobalMaxPooling2D, L.ZeroPadding1D, L.ZeroPadding2D,
)  # fmt: skip


def _activation_name(function) -> str:
    return getattr(function, "__name__", type(function).__name__)


def _unsupported(layer, why: str) -> ValueError:
    return ValueError(
        f"curvature_propagation does not support layer {layer.name!r} "
        f"({type(layer).__name__}): {why}"
    )


def _check_layer(layer, training: bool) -> None:
    if isinstance(layer, L.BatchNormalization):
        if training:
            raise _unsupported(
                layer, "BatchNormalization only in inference mode (training=False)"
            )
        if layer.axis not in (-1, len(layer.input.shape) - 1):
            raise _unsupported(layer, "only axis=-1")
        return
    if isinstance(layer, (L.Conv1D, L.Conv2D)):
        if type(layer) not in (L.Conv1D, L.Conv2D):
            raise _unsupported(layer, "only plain Conv1D / Conv2D")
        if (
            layer.groups != 1
            or layer.data_format != "channels_last"
            or layer.padding == "causal"
        ):
            raise _unsupported(
                layer, "needs groups=1, channels_last, padding 'valid' or 'same'"
            )
    if isinstance(layer, L.DepthwiseConv2D):
        if type(layer) is not L.DepthwiseConv2D or layer.data_format != "channels_last":
            raise _unsupported(layer, "only plain DepthwiseConv2D, channels_last")
    if isinstance(layer, (L.Dense, L.Conv1D, L.Conv2D, L.DepthwiseConv2D)):
        name = _activation_name(layer.activation)
        if name not in _ELEMENTWISE_FUNCTIONS:
            raise _unsupported(layer, f"activation {name!r} is not elementwise")
        return
    if isinstance(layer, L.Activation):
        name = _activation_name(layer.activation)
        if name not in _ELEMENTWISE_FUNCTIONS:
            raise _unsupported(layer, f"activation {name!r} is not elementwise")
        return
    if isinstance(layer, _ELEMENTWISE_LAYERS + _LINEAR):
        return
    raise _unsupported(layer, "no curvature-propagation rule for this layer type")


def _is_functional(model) -> bool:
    """A model built from its graph (``keras.Model(inputs, outputs)``), ``call`` not overridden."""
    functional = [c for c in type(model).__mro__ if c.__name__ == "Functional"]
    return bool(functional) and type(model).call is functional[0].call


def leaf_layers(model: keras.Model, training: bool) -> list:
    """The model's layers (nested models expanded), each checked to be supported."""
    if isinstance(model, keras.Sequential):
        operations = model.layers
    elif _is_functional(model):
        operations = model.operations  # a Functional model: its whole graph
    else:
        raise ValueError(
            "curvature_propagation needs a Sequential or Functional model (a "
            f"subclassed model's call() cannot be checked); got {type(model).__name__}"
        )
    leaves = []
    for operation in operations:
        if isinstance(operation, keras.Model):
            leaves.extend(leaf_layers(operation, training))
            continue
        if not isinstance(operation, L.Layer):
            raise ValueError(
                f"curvature_propagation does not support operation "
                f"{getattr(operation, 'name', operation)!r} ({type(operation).__name__})"
            )
        _check_layer(operation, training)
        leaves.append(operation)
    return leaves


def _elementwise_derivatives(function, s):
    """``phi'(s)`` and ``phi''(s)`` of an elementwise function."""
    with tf.GradientTape() as outer:
        outer.watch(s)
        with tf.GradientTape() as inner:
            inner.watch(s)
            a = function(s)
        first = inner.gradient(a, s)
    return first, outer.gradient(
        first, s, unconnected_gradients=tf.UnconnectedGradients.ZERO
    )


class _Recorder:
    """Patches each leaf layer's ``call`` to record what CP needs (undone on exit)."""

    def __init__(self, layers, tape: tf.GradientTape):
        self.layers, self.tape = layers, tape
        self.parameterised = []  # (layer, input, probe)
        self.activations = []  # (function, s, a)

    def _activation_node(self, function, s):
        a = function(s)
        if _activation_name(function) != "linear":
            self.activations.append((function, s, a))
        return a

    def _wrap(self, layer, original):
        def parameterised_call(inputs, *args, **kwargs):
            activation = getattr(layer, "activation", None)
            if activation is not None:
                layer.activation = keras.activations.linear
            try:
                pre = original(inputs, *args, **kwargs)
            finally:
                if activation is not None:
                    layer.activation = activation
            probe = tf.zeros_like(pre)
            self.tape.watch(probe)
            pre = pre + probe
            self.parameterised.append((layer, inputs, probe))
            return pre if activation is None else self._activation_node(activation, pre)

        def elementwise_call(inputs, *args, **kwargs):
            return self._activation_node(lambda s: original(s, *args, **kwargs), inputs)

        if isinstance(layer, _PARAMETERISED):
            return parameterised_call
        if isinstance(layer, (L.Activation, *_ELEMENTWISE_LAYERS)):
            return elementwise_call
        return None

    @contextlib.contextmanager
    def recording(self):
        patched = []
        try:
            for layer in self.layers:
                wrapper = self._wrap(layer, layer.call)
                if wrapper is not None:
                    layer.call = wrapper
                    patched.append(layer)
            yield self
        finally:
            for layer in patched:
                del layer.call


def _output_factor(kind: losses_lib.LossKind, z, v):
    """``F v`` per example, where ``F F^T`` is the Hessian of the summed loss in ``z``."""
    classes = tf.cast(tf.shape(z)[-1], z.dtype)
    if kind.name == "softmax_crossentropy":
        p = tf.nn.softmax(z)
        root = tf.sqrt(p)
        return root * v - p * tf.reduce_sum(root * v, axis=-1, keepdims=True)
    if kind.name == "sigmoid_crossentropy":  # Keras averages over the last axis
        p = tf.sigmoid(z)
        return tf.sqrt(p * (1 - p) / classes) * v
    return tf.sqrt(2 / classes) * v  # squared error, mean over the last axis


def _patches(layer, inputs):
    """The convolution's input windows, ``(N, *output_positions, kh * kw * C_in)``."""
    images = inputs[:, None] if isinstance(layer, L.Conv1D) else inputs
    kernel_size = (1,) * (len(layer.kernel_size) == 1) + tuple(layer.kernel_size)
    strides = (1,) * (len(layer.strides) == 1) + tuple(layer.strides)
    rates = (1,) * (len(layer.dilation_rate) == 1) + tuple(layer.dilation_rate)
    return tf.image.extract_patches(
        images,
        sizes=[1, *kernel_size, 1],
        strides=[1, *strides, 1],
        rates=[1, *rates, 1],
        padding=layer.padding.upper(),
    )


def _per_example_weight_gradients(layer, inputs, cotangent):
    """``{variable id: (N, *variable.shape)}``: each example's weight gradient."""
    if isinstance(layer, L.BatchNormalization):
        normalised = (inputs - layer.moving_mean) * tf.math.rsqrt(
            layer.moving_variance + layer.epsilon
        )
        axes = list(range(1, len(inputs.shape) - 1))
        result = {}
        if layer.scale:
            result[id(layer.gamma)] = tf.reduce_sum(normalised * cotangent, axis=axes)
        if layer.center:
            result[id(layer.beta)] = tf.reduce_sum(cotangent, axis=axes)
        return result
    count = tf.shape(inputs)[0]
    flat_out = tf.reshape(cotangent, [count, -1, cotangent.shape[-1]])
    if isinstance(layer, L.Dense):
        flat_in = tf.reshape(inputs, [count, -1, inputs.shape[-1]])
        kernel = tf.einsum("npi,npo->nio", flat_in, flat_out)
    elif isinstance(layer, L.DepthwiseConv2D):
        # Output channel c * M + m comes from input channel c and kernel[..., c, m].
        channels, multiplier = layer.kernel.shape[-2:]
        positions = tf.shape(flat_out)[1]
        window = tf.reshape(_patches(layer, inputs), [count, positions, -1, channels])
        by_channel = tf.reshape(flat_out, [count, -1, channels, multiplier])
        kernel = tf.einsum("npkc,npcm->nkcm", window, by_channel)
    else:  # Conv1D / Conv2D: weight gradient = patches^T cotangent, per example
        patches = _patches(layer, inputs)
        flat_in = tf.reshape(patches, [count, -1, patches.shape[-1]])
        kernel = tf.einsum("npi,npo->nio", flat_in, flat_out)
    result = {id(layer.kernel): tf.reshape(kernel, [-1, *layer.kernel.shape])}
    if layer.use_bias:
        result[id(layer.bias)] = tf.reduce_sum(flat_out, axis=1)
    return result


class CurvaturePropagation:
    """CP diagonal estimates of the Hessian (or GGN) of ``loss`` for ``variables``.

    ``samples(x, y, sample_weight, num_samples, seed)`` returns the
    ``(num_samples, P)`` independent single-sample estimates of one batch (each
    unbiased for the diagonal of the mean loss on that batch);
    :meth:`diagonal` is their mean.
    """

    def __init__(self, model, loss, variables, gauss_newton=False, training=False):
        self.model, self.variables = model, list(variables)
        self.loss = loss
        self.kind = losses_lib.loss_kind(loss)
        self.gauss_newton, self.training = gauss_newton, training
        self.layers = leaf_layers(model, training)
        self.dtype = tf.as_dtype(self.variables[0].dtype)
        self._compiled = tf.function(self._samples)

    def _forward(self, x, y, tape):
        recorder = _Recorder(self.layers, tape)
        with exact_second_derivatives(), keras.StatelessScope(collect_losses=True):
            with recorder.recording():
                z = self.model(x, training=self.training)
            if self.model.losses:
                raise ValueError(
                    "curvature_propagation does not support models with "
                    "regularisation losses (model.losses)"
                )
            if len(z.shape) != 2:
                raise ValueError(
                    f"curvature_propagation needs (batch, classes) outputs, got shape {z.shape}"
                )
            count = tf.cast(tf.shape(z)[0], z.dtype)
            summed_loss = count * self.loss(y, z)
        return recorder, z, summed_loss, count

    def _samples(self, x, y, seed, num_samples: int):
        with tf.GradientTape(persistent=True) as tape:
            recorder, z, summed_loss, count = self._forward(x, y, tape)
        injections = []  # (s, sqrt|D|, sign(D)) for the Hessian's activation nodes
        if not self.gauss_newton and recorder.activations:
            outputs = [a for _, _, a in recorder.activations]
            gradients = tape.gradient(
                summed_loss, outputs, unconnected_gradients=tf.UnconnectedGradients.ZERO
            )
            for (function, s, _), g in zip(recorder.activations, gradients):
                _, second = _elementwise_derivatives(function, tf.stop_gradient(s))
                d = second * tf.stop_gradient(g)
                injections.append((s, tf.sqrt(tf.abs(d)), tf.sign(d)))
        probes = [probe for _, _, probe in recorder.parameterised]
        wanted = {id(v) for v in self.variables}
        estimates = []
        for sample in range(num_samples):
            sample_seed = tf.random.experimental.stateless_fold_in(seed, sample)
            node_seeds = tf.random.experimental.stateless_split(
                sample_seed, len(injections) + 1
            )
            v = vec.rademacher(tf.shape(z), node_seeds[0], z.dtype)
            with tape:
                factor = tf.stop_gradient(_output_factor(self.kind, z, v))
                gamma_objective = delta_objective = tf.reduce_sum(factor * z)
                for index, (s, root, sign) in enumerate(injections):
                    u = vec.rademacher(tf.shape(s), node_seeds[index + 1], s.dtype)
                    gamma_objective += tf.reduce_sum(root * u * s)
                    delta_objective += tf.reduce_sum(sign * root * u * s)
            gammas = tape.gradient(gamma_objective, probes)
            deltas = (
                gammas if not injections else tape.gradient(delta_objective, probes)
            )
            diagonal = {}
            for (layer, inputs, _), gamma, delta in zip(
                recorder.parameterised, gammas, deltas
            ):
                inputs = tf.stop_gradient(inputs)
                by_gamma = _per_example_weight_gradients(layer, inputs, gamma)
                by_delta = _per_example_weight_gradients(layer, inputs, delta)
                for key in by_gamma.keys() & wanted:
                    diagonal[key] = (
                        tf.reduce_sum(by_gamma[key] * by_delta[key], axis=0) / count
                    )
            missing = [v.path for v in self.variables if id(v) not in diagonal]
            if missing:
                raise ValueError(
                    f"curvature_propagation has no estimate for variables {missing} "
                    "(not used by a supported layer in the forward pass)"
                )
            estimates.append(vec.flatten([diagonal[id(v)] for v in self.variables]))
        return tf.stack(estimates)

    def samples(self, x, y, sample_weight, num_samples: int, seed: int, chunk: int = 8):
        """``(num_samples, P)`` single-sample estimates on one batch."""
        if sample_weight is not None:
            raise ValueError("curvature_propagation does not support sample_weight")
        pieces = []
        for index, start in enumerate(range(0, num_samples, chunk)):
            count = min(chunk, num_samples - start)
            pieces.append(self._compiled(x, y, vec.seed_pair(seed, index), count))
        return tf.concat(pieces, axis=0)

    def diagonal(self, x, y, sample_weight, num_samples: int, seed: int):
        return tf.reduce_mean(
            self.samples(x, y, sample_weight, num_samples, seed), axis=0
        )
