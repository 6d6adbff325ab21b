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

Implementation: one forward pass inside the layer capture
(:mod:`tfcurv.curvature.layer_capture`) records every layer call: input,
pre-activation output, fused activation. Backpropagating ``gamma`` is then a
single ``tape.gradient`` of ``<F v, z> + sum_i <F_i v_i, s_i>`` with respect to
the pre-activation outputs of the layers that own the selected variables
(injections enter as constant cotangents), so a sample costs one extra
backward pass per propagated vector (two for the Hessian, one for the GGN).
Each such layer's block of the layer table
(:mod:`tfcurv.curvature.layer_blocks`) turns its input and that cotangent into
per-example weight gradients; a layer called several times (shared weights)
sums them over its calls.

What is supported:

* the selected variables (``variables=``) must belong to layers of the table
  (Dense, EinsumDense, every convolution, Embedding, the normalisations);
  their layers must not mix examples (no BatchNormalization in training mode);
* the Hessian (not the Gauss-Newton matrix) has second-derivative terms at
  every non-linear node between those layers and the loss, and tfcurv has them
  for elementwise activations only: every layer downstream of a selected one
  must be linear in its input (a table layer, pooling, reshaping, merging) or
  elementwise, and the model Sequential or Functional; a shared layer must not
  be called on its own output. Layers upstream of every selected variable may
  be anything: leave their variables out;
* losses: softmax cross-entropy and sigmoid binary cross-entropy from logits,
  mean squared error, on ``(N, C)`` outputs, without sample weights or
  regularisation losses.

Anything else raises a ``ValueError`` naming the layer.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tfcurv import _keras
from tfcurv.curvature import layer_blocks
from tfcurv.curvature import losses as losses_lib
from tfcurv.curvature import vectors as vec
from tfcurv.curvature.exact_moments import exact_second_derivatives
from tfcurv.curvature.layer_capture import capture_layers

#: Functional-graph operations (not layers) that are linear in their inputs.
_LINEAR_OPERATIONS = frozenset(
    {
        "Add", "Subtract", "Negative", "Reshape", "Transpose", "ExpandDims",
        "Squeeze", "Concatenate", "GetItem", "Flatten", "Mean", "Sum",
    }
)  # fmt: skip


def _unsupported(layer, why: str) -> ValueError:
    return ValueError(
        f"curvature_propagation does not support layer {layer.name!r} "
        f"({type(layer).__name__}): {why}"
    )


def _is_graph_model(model) -> bool:
    """Sequential, or built from its graph (``keras.Model(inputs, outputs)``)."""
    if isinstance(model, keras.Sequential):
        return True
    functional = _keras.Functional
    return isinstance(model, functional) and type(model).call is functional.call


def _leaf_layers(model) -> list:
    """The layers of a Sequential/Functional model, nested ones expanded."""
    leaves = []
    for layer in model.layers:
        leaves += _leaf_layers(layer) if _is_graph_model(layer) else [layer]
    return leaves


def _owning_layer(model, variable):
    """The outermost layer (not a Sequential or Functional model) whose
    weights include ``variable``: the one the user wrote (a GRU, not its cell)."""
    for layer in _keras.flatten_layers(model):
        if not _is_graph_model(layer) and any(w is variable for w in layer.weights):
            return layer
    return None


def _reached(tape, inputs, sources) -> bool:
    """Whether the floating-point ``inputs`` depend on any of ``sources``
    (a structural question: the gradient graph it builds is never run)."""
    floats = [
        t for t in tf.nest.flatten(inputs)
        if isinstance(t, tf.Tensor) and t.dtype.is_floating
    ]  # fmt: skip
    if not floats:
        return False
    with tape:
        total = tf.add_n([tf.reduce_sum(t) for t in floats])
    return any(g is not None for g in tape.gradient(total, sources))


def _in_graph(record, graph) -> bool:
    return all(
        getattr(t, "graph", graph) is graph for t in tf.nest.flatten(record.inputs)
    )


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


def _activation_nodes(records):
    """``(function, s, a)`` of every elementwise non-linearity of the pass."""
    nodes = []
    for record in records:
        if record.activation is not None:
            name = layer_blocks.activation_name(record.activation)
            if name != "linear":
                nodes.append((record.activation, record.outputs, record.activated))
            continue
        block = layer_blocks.block_for(record.layer)
        if isinstance(block, layer_blocks.ElementwiseBlock) and block.elementwise:
            function = getattr(record.layer, "activation", None)
            if function is not None and layer_blocks.activation_name(function) == "linear":
                continue
            layer = record.layer
            nodes.append(
                (lambda s, layer=layer: type(layer).call(layer, s), record.inputs,
                 record.outputs)
            )  # fmt: skip
    return nodes


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


class CurvaturePropagation:
    """CP diagonal estimates of the Hessian (or GGN) of ``loss`` for ``variables``.

    ``samples(x, y, sample_weight, num_samples, seed)`` returns the
    ``(num_samples, P)`` independent single-sample estimates of one batch (each
    unbiased for the diagonal of the mean loss on that batch);
    :meth:`diagonal` is their mean.
    """

    def __init__(self, model, loss, variables, gauss_newton=False, training=False):
        self.model = model
        self.variables = list({id(v): v for v in variables}.values())
        self.loss = loss
        self.kind = losses_lib.loss_kind(loss)
        self.gauss_newton, self.training = gauss_newton, training
        self.layers = _keras.flatten_layers(model)[1:]
        self.blocks = self._selected_blocks()
        # The layers whose calls make up the model's computation: those of
        # Sequential/Functional models, down to the first layer with a body of
        # its own (a GRU, not its cell). A subclassed model's own body is not
        # known: all its layers are checked, for mixing examples only.
        self.leaves = _leaf_layers(model) if _is_graph_model(model) else self.layers
        self.captured = list(
            {id(layer): layer for layer in self.leaves + [b.layer for b in self.blocks]}
            .values()
        )
        if not gauss_newton and not _is_graph_model(model):
            raise ValueError(
                "curvature_propagation of a Hessian needs a Sequential or Functional "
                "model (the second derivatives of a subclassed model's call() cannot "
                f"be checked); got {type(model).__name__}. GaussNewton works."
            )
        if not gauss_newton:
            self._check_graph_operations(model)
        self.dtype = tf.as_dtype(self.variables[0].dtype)
        self._compiled = tf.function(self._samples)

    def _selected_blocks(self) -> list:
        """The table blocks owning the selected variables, each once."""
        owners = {}
        for layer in self.layers:
            block = layer_blocks.block_for(layer)
            for variable in block.variables if block is not None else []:
                owners[id(variable)] = block
        blocks = {}
        for variable in self.variables:
            block = owners.get(id(variable))
            if block is None:
                layer = _owning_layer(self.model, variable)
                what = (
                    f"layer {layer.name!r} ({type(layer).__name__})"
                    if layer is not None else "no layer"
                )  # fmt: skip
                raise ValueError(
                    f"curvature_propagation has no rule for {what}, which owns "
                    f"the selected variable {variable.path!r}. Leave its variables "
                    "out with `variables=`; they are then constants."
                )
            if self.training and isinstance(block, layer_blocks.BatchNormBlock):
                raise _unsupported(
                    block.layer,
                    "BatchNormalization only in inference mode (training=False): "
                    "in training mode it mixes the examples of a batch",
                )
            blocks[id(block.layer)] = block
        return list(blocks.values())

    def _check_graph_operations(self, model) -> None:
        for inner in [model] + [m for m in self.layers if isinstance(m, keras.Model)]:
            if isinstance(inner, keras.Sequential) or not _is_graph_model(inner):
                continue
            for operation in inner.operations:
                if isinstance(operation, keras.layers.Layer):
                    continue
                if type(operation).__name__ not in _LINEAR_OPERATIONS:
                    raise ValueError(
                        "curvature_propagation does not support operation "
                        f"{getattr(operation, 'name', operation)!r} "
                        f"({type(operation).__name__}) in a Hessian: wrap it in a layer "
                        "of the table or use GaussNewton"
                    )

    def _check_reuse(self, tape, by_block) -> None:
        """Refuse (Hessian) a shared layer called on its own output, directly or
        not: ``s_2 = W f(W x)`` has a second derivative in ``W`` between the
        calls, which the per-call gradients of CP do not carry."""
        for block, calls in zip(self.blocks, by_block):
            outputs = [r.outputs for r in calls]
            for record in calls[1:]:
                if _reached(tape, record.inputs, outputs):
                    raise _unsupported(
                        block.layer,
                        "a shared layer called on its own output: the Hessian then "
                        "has a second-derivative term between its calls that CP does "
                        "not have. Use GaussNewton, or leave its variables out",
                    )

    def _check_downstream(self, tape, records, sources) -> None:
        """Refuse a layer between a selected layer and the loss whose second
        derivatives CP does not have (Hessian) or that mixes examples (both)."""
        leaves = {id(layer) for layer in self.leaves}
        for record in records:
            layer = record.layer
            if id(layer) not in leaves:
                continue
            block = layer_blocks.block_for(layer)
            mixes = self.training and isinstance(block, layer_blocks.BatchNormBlock)
            exact = block is not None and (block.linear_in_input or block.elementwise)
            if record.activation is not None:
                exact = exact and (
                    layer_blocks.activation_name(record.activation)
                    in layer_blocks.ELEMENTWISE_ACTIVATIONS
                )
            if not mixes and (exact or self.gauss_newton):
                continue
            if not _reached(tape, record.inputs, sources):
                continue  # upstream of every selected layer: a constant there
            if mixes:
                raise _unsupported(
                    layer,
                    "BatchNormalization only in inference mode (training=False): "
                    "in training mode it mixes the examples of a batch",
                )
            raise _unsupported(
                layer,
                "it lies between a selected layer and the loss, and CP has no "
                "second-derivative rule for it (only elementwise activations and "
                "layers linear in their input). Select only variables after it, or "
                "use GaussNewton",
            )

    def _forward(self, x, y):
        with exact_second_derivatives(), keras.StatelessScope(collect_losses=True):
            with capture_layers(self.captured) as records:
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
        return records, z, summed_loss, count

    def _samples(self, x, y, seed, num_samples: int):
        with tf.GradientTape(persistent=True) as tape:
            records, z, summed_loss, count = self._forward(x, y)
        # Calls inside another layer's loop (an RNN's cell) live in the loop's
        # graph: part of that layer's body, out of reach from here.
        records = [r for r in records if _in_graph(r, z.graph)]
        by_block = [
            [r for r in records if r.layer is block.layer] for block in self.blocks
        ]
        missing = [b.layer.name for b, calls in zip(self.blocks, by_block) if not calls]
        if missing:
            raise ValueError(
                f"curvature_propagation: layers {missing} own selected variables but "
                "were not called in the forward pass"
            )
        sources = [r.outputs for calls in by_block for r in calls]
        self._check_downstream(tape, records, sources)
        if not self.gauss_newton:
            self._check_reuse(tape, by_block)
        injections = []  # (s, sqrt|D|, sign(D)) for the Hessian's activation nodes
        leaves = {id(layer) for layer in self.leaves}
        nodes = [] if self.gauss_newton else _activation_nodes(
            [r for r in records if id(r.layer) in leaves]
        )  # fmt: skip
        if nodes:
            gradients = tape.gradient(
                summed_loss, [a for _, _, a in nodes],
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
            )  # fmt: skip
            for (function, s, _), g in zip(nodes, gradients):
                _, second = _elementwise_derivatives(function, tf.stop_gradient(s))
                d = second * tf.stop_gradient(g)
                injections.append((s, tf.sqrt(tf.abs(d)), tf.sign(d)))
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
            zero = tf.UnconnectedGradients.ZERO
            gammas = tape.gradient(gamma_objective, sources, unconnected_gradients=zero)
            deltas = (
                gammas if not injections
                else tape.gradient(delta_objective, sources, unconnected_gradients=zero)
            )  # fmt: skip
            diagonal, position = {}, 0
            for block, calls in zip(self.blocks, by_block):
                by_gamma = by_delta = None
                for record in calls:
                    x_in = tf.stop_gradient(record.inputs)
                    gamma, delta = gammas[position], deltas[position]
                    position += 1
                    g_part = block.per_example_gradients(x_in, gamma)
                    d_part = (
                        g_part if delta is gamma
                        else block.per_example_gradients(x_in, delta)
                    )  # fmt: skip
                    by_gamma = g_part if by_gamma is None else [
                        a + b for a, b in zip(by_gamma, g_part)
                    ]  # fmt: skip
                    by_delta = d_part if by_delta is None else [
                        a + b for a, b in zip(by_delta, d_part)
                    ]  # fmt: skip
                for variable, a, b in zip(block.variables, by_gamma, by_delta):
                    if id(variable) in wanted:
                        diagonal[id(variable)] = tf.reduce_sum(a * b, axis=0) / count
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
