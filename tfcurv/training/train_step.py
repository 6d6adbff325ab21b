"""The tfcurv train step: gradients and curvature from one forward pass.

Keras hands an optimizer ``(gradient, variable)`` pairs only. For an optimizer
that needs more (a :class:`~tfcurv.optimizers.curvature_optimizer.CurvatureOptimizer`),
:func:`curvature_train_step` replaces Keras' ``train_step``:

1. one forward pass ``model(x, training=True)`` inside two nested gradient tapes
   when Hessian-vector products are needed (and then inside
   :func:`~tfcurv.curvature.exact_moments.exact_second_derivatives`, so that
   normalisation layers have exact second derivatives), and inside
   :func:`~tfcurv.curvature.layer_capture.capture_layer_statistics` when layer
   statistics are needed;
2. the loss, the loss tracker and the loss scaling exactly as Keras' own step;
3. one gradient call for the weights and the captured layer outputs;
4. ``compute_curvature`` of every curvature optimizer behind ``model.optimizer``
   (``LossScaleOptimizer`` and ``MultiOptimizer`` are looked through), with
   gradients, products and output gradients divided by the loss scale;
5. one all-reduce across replicas for everything they returned;
6. ``store_curvature``, then the ordinary ``optimizer.apply_gradients``;
7. the metrics, as Keras' own step returns them.

Models whose optimizer needs no curvature never get here: they run Keras' own
``train_step`` unchanged (see :mod:`tfcurv.training.models`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Sequence

import keras
import tensorflow as tf

from tfcurv import _keras as keras_internals
from tfcurv.curvature.exact_moments import exact_second_derivatives
from tfcurv.curvature.layer_capture import capture_layer_statistics
from tfcurv.curvature.products import hessian_vector_product_from_tape
from tfcurv.curvature.second_derivatives import check_second_derivatives
from tfcurv.optimizers.curvature_optimizer import (
    CurvatureContext,
    CurvatureOptimizer,
    LayerStatistics,
)

_REDUCTIONS = ("sum", "mean")


def curvature_optimizers(optimizer) -> list[CurvatureOptimizer]:
    """The curvature optimizers behind ``optimizer``.

    ``LossScaleOptimizer`` and ``MultiOptimizer`` are looked through; a
    ``MultiOptimizer`` whose map is a callable knows its optimizers only once it
    is built.
    """
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return curvature_optimizers(optimizer.inner_optimizer)
    if isinstance(optimizer, keras_internals.MultiOptimizer):
        return [
            found
            for inner in optimizer.optimizers
            for found in curvature_optimizers(inner)
        ]
    if isinstance(optimizer, CurvatureOptimizer):
        return [optimizer]
    return []


def needs_curvature(model: keras.Model) -> bool:
    """Whether ``model.optimizer`` needs the tfcurv train step.

    A ``MultiOptimizer`` knows its optimizers only once built; it is built here
    when the model has variables, and otherwise the tfcurv step is used (without
    curvature optimizers it computes exactly what Keras' step computes).
    """
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        return False
    if isinstance(optimizer, keras_internals.MultiOptimizer) and not optimizer.built:
        if not model.trainable_variables:
            return True
        optimizer.build(model.trainable_variables)
    return bool(curvature_optimizers(optimizer))


@dataclasses.dataclass
class _Plan:
    """One curvature optimizer and the model variables it updates (model order)."""

    optimizer: CurvatureOptimizer
    variables: list
    indices: list[int]


def _plans(optimizer, variables: Sequence) -> list[_Plan]:
    plans = []
    for inner in curvature_optimizers(optimizer):
        if inner is optimizer or (
            isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
            and inner is optimizer.inner_optimizer
        ):
            indices = list(range(len(variables)))
        else:  # inside a MultiOptimizer: only the variables mapped to it
            owned = {id(v) for v in keras_internals.optimizer_variables(inner)}
            indices = [i for i, v in enumerate(variables) if id(v) in owned]
        plans.append(_Plan(inner, [variables[i] for i in indices], indices))
    return plans


def _loss_scale(optimizer) -> tf.Tensor | None:
    """The factor ``optimizer.scale_loss`` multiplies the loss by, or None."""
    if (
        isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        or optimizer.loss_scale_factor is not None
    ):
        return tf.convert_to_tensor(
            optimizer.scale_loss(tf.ones((), "float32")), "float32"
        )
    return None


def _unscale(tensor, scale: tf.Tensor | None):
    """``tensor / scale`` in at least float32, non-finite entries set to zero.

    Non-finite values under loss scaling mean the scaled loss overflowed; the
    optimizer then skips its update, and zeros keep curvature slots finite.
    """
    if scale is None or tensor is None:
        return tensor
    tensor = tf.convert_to_tensor(tensor)
    if tensor.dtype in (tf.float16, tf.bfloat16):
        tensor = tf.cast(tensor, tf.float32)
    return _zero_non_finite(tensor / tf.cast(scale, tensor.dtype))


def _zero_non_finite(tensor: tf.Tensor) -> tf.Tensor:
    return tf.where(tf.math.is_finite(tensor), tensor, tf.zeros_like(tensor))


def _all_reduce(values: list[tf.Tensor], reductions: list[str]) -> list[tf.Tensor]:
    """Sum or average each value across replicas, in one all-reduce.

    Mean-reduced values are divided by the replica count first, so a single
    ``SUM`` all-reduce serves both kinds.
    """
    replica_context = tf.distribute.get_replica_context()
    if not values or replica_context is None:
        return values
    replicas = replica_context.num_replicas_in_sync
    if replicas == 1:
        return values
    shares = [
        v / tf.cast(replicas, v.dtype) if reduction == "mean" else v
        for v, reduction in zip(values, reductions)
    ]
    return list(replica_context.all_reduce(tf.distribute.ReduceOp.SUM, shares))


def _forward_contexts(needs_products: bool, layer_types: tuple, model):
    stack = contextlib.ExitStack()
    if needs_products:
        stack.enter_context(exact_second_derivatives())
    records = (
        stack.enter_context(capture_layer_statistics(model, layer_types))
        if layer_types
        else []
    )
    return stack, records


def curvature_train_step(model: keras.Model, data):
    """One training step that also delivers curvature to the model's optimizer.

    Same arguments and return value as ``keras.Model.train_step``.
    """
    _check_jit_compile(model)
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    optimizer = model.optimizer
    if not optimizer.built and model.trainable_variables:
        # What an optimizer needs may depend on its variables (SGD-PH needs
        # products only with two or more 1-D variables). Built outside the
        # traced function: slots created while tracing make tf.function trace
        # the whole step twice, each slot behind an initialisation cond.
        with tf.init_scope():
            optimizer.build(model.trainable_variables)
    wanted = curvature_optimizers(optimizer)
    products_wanted = sum(o.needs_hessian_vector_products for o in wanted)
    layer_types = tuple(
        dict.fromkeys(t for o in wanted for t in o.statistics_layer_types)
    )
    if products_wanted:
        check_second_derivatives(
            model,
            " and ".join(type(o).__name__ for o in wanted if o.needs_hessian_vector_products),
        )

    # Persistent whenever products are wanted: an optimizer may trace its
    # product in several branches of an ``ops.cond``/``ops.switch`` (only the
    # branch taken runs; in a tf.function persistence costs nothing at run time).
    outer_tape = (
        tf.GradientTape(persistent=True)
        if products_wanted
        else contextlib.nullcontext()
    )
    with outer_tape:
        with tf.GradientTape() as tape:
            forward, records = _forward_contexts(
                products_wanted > 0, layer_types, model
            )
            with forward:
                y_pred = keras_internals.call_for_training(model, x)
            loss = keras_internals.compute_loss(model, x, y, y_pred, sample_weight)
            batch_size = tf.shape(next(i for i in tf.nest.flatten(x) if i is not None))[
                0
            ]
            keras_internals.update_loss_tracker(model, loss, batch_size)
            scaled_loss = optimizer.scale_loss(loss)
        # A subclassed model may create its variables in the forward pass above.
        variables = list(model.trainable_variables)
        if not variables:
            warnings.warn("The model does not have any trainable weights.", stacklevel=2)
            return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        # Still inside the outer tape: the gradient computation is recorded, so
        # it can be differentiated again for Hessian-vector products.
        gradients = tape.gradient(
            scaled_loss, variables + [record.outputs for record in records]
        )
    if not optimizer.built:
        optimizer.build(variables)
    plans = _plans(optimizer, variables)
    weight_gradients = gradients[: len(variables)]
    output_gradients = gradients[len(variables) :]

    scale = _loss_scale(optimizer)
    statistics = [
        LayerStatistics(
            record.layer, record.inputs, _unscale(gradient, scale), record.outputs
        )
        for record, gradient in zip(records, output_gradients)
    ]

    values, reductions, counts = [], [], []
    for plan in plans:
        context = _context(plan, weight_gradients, outer_tape, statistics, scale)
        tensors, kinds = plan.optimizer.compute_curvature(context)
        _check_curvature(plan.optimizer, tensors, kinds)
        values += [_zero_non_finite(t) if scale is not None else t for t in tensors]
        reductions += list(kinds)
        counts.append(len(tensors))
    values = _all_reduce(values, reductions)
    start = 0
    for plan, count in zip(plans, counts):
        plan.optimizer.store_curvature(values[start : start + count])
        plan.optimizer.connect_curvature_source()
        start += count

    optimizer.apply_gradients(zip(weight_gradients, variables))
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def _check_jit_compile(model: keras.Model) -> None:
    """Refuse ``jit_compile=True`` with several replicas, which Keras cannot run."""
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if model.jit_compile and replicas > 1:
        raise ValueError(
            "`jit_compile=True` is not supported under a distribution strategy "
            f"with several replicas (here {replicas}): Keras' own `fit` fails "
            "there too, with any optimizer. Compile with `jit_compile=False` "
            "(Keras' default under a strategy)."
        )


def _context(plan, weight_gradients, outer_tape, statistics, scale) -> CurvatureContext:
    scaled_gradients = [weight_gradients[i] for i in plan.indices]

    def hessian_vector_product(vectors, wrt):
        pairs = [(g, v) for g, v in zip(scaled_gradients, vectors) if v is not None]
        products = hessian_vector_product_from_tape(
            outer_tape, [g for g, _ in pairs], [v for _, v in pairs], wrt
        )
        return [_unscale(p, scale) for p in products]

    if not plan.optimizer.needs_hessian_vector_products:
        hessian_vector_product = _no_products(plan.optimizer)
    types = plan.optimizer.statistics_layer_types
    return CurvatureContext(
        variables=plan.variables,
        gradients=[_unscale(g, scale) for g in scaled_gradients],
        hessian_vector_product=hessian_vector_product,
        layer_statistics=[
            s for s in statistics if types and isinstance(s.layer, types)
        ],
    )


def _no_products(optimizer):
    def refuse(vectors, wrt):
        raise RuntimeError(
            f"{type(optimizer).__name__} asked for a Hessian-vector product but "
            "does not set `needs_hessian_vector_products = True`, so the train "
            "step did not record the second tape."
        )

    return refuse


def _check_curvature(optimizer, tensors, reductions) -> None:
    if len(tensors) != len(reductions) or any(r not in _REDUCTIONS for r in reductions):
        raise ValueError(
            f"{type(optimizer).__name__}.compute_curvature must return "
            "(tensors, reductions) of equal length, each reduction 'sum' or "
            f"'mean'. Received {len(tensors)} tensors and reductions={reductions!r}"
        )
