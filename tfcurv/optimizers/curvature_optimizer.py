"""The contract between curvature optimizers and the tfcurv train step.

Keras hands an optimizer only ``(gradient, variable)`` pairs. An optimizer that
needs more (a Hessian-vector product, the inputs and output gradients of its
layers) subclasses :class:`CurvatureOptimizer` and says so; the tfcurv train step
(``tfcurv.Model``, ``tfcurv.Sequential``, ``tfcurv.attach``) then, on every step:

1. runs the one forward pass inside nested gradient tapes (capturing layer
   the inputs and pre-activation outputs of every layer whose class is in
   :attr:`CurvatureOptimizer.statistics_layer_types`);
2. computes the loss and the gradients as Keras does;
3. calls :meth:`CurvatureOptimizer.compute_curvature` with a
   :class:`CurvatureContext` (replica context, per-replica values);
4. all-reduces what it returned across replicas, each tensor with the reduction
   the optimizer asked for (``"sum"`` for quantities derived from the loss, which
   Keras has already divided by the number of replicas; ``"mean"`` for
   activation statistics);
5. calls :meth:`CurvatureOptimizer.store_curvature` with the reduced tensors, which
   writes them into the optimizer's own slot variables;
6. calls the ordinary ``optimizer.apply(gradients, variables)``.

Periodic work (curvature every k steps) is decided by the optimizer inside
``compute_curvature``/``store_curvature`` with ``ops.cond`` on its iteration
counter, never with a Python ``if``.

All state lives in slot variables created in ``build()`` from the variable list
alone, so ``.keras`` saving and loading need no model reference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Literal

import keras
import tensorflow as tf

Reduction = Literal["sum", "mean"]


@dataclasses.dataclass(frozen=True)
class LayerStatistics:
    """What the train step captured for one supported layer in the forward pass.

    Attributes:
        layer: the Keras layer.
        inputs: the tensor the layer received.
        output_gradients: gradient of the (unscaled) training loss with respect to
            the layer's pre-activation output (for a layer with a fused
            ``activation=``, the output before that activation); None when the
            output does not reach the loss.
        outputs: that pre-activation output.
    """

    layer: keras.layers.Layer
    inputs: tf.Tensor
    output_gradients: tf.Tensor | None
    outputs: tf.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class CurvatureContext:
    """What the train step offers a curvature optimizer, from one forward pass.

    Attributes:
        variables: the model's trainable variables, in ``model.trainable_variables``
            order (the order the optimizer was built with).
        gradients: gradients of the unscaled training loss, one per variable.
        hessian_vector_product: ``hvp(vectors, wrt)`` returns ``H v`` restricted to
            the variables ``wrt`` (a sub-list of ``variables``), where ``vectors``
            has one entry per entry of ``variables`` (a tensor of its shape, or
            ``None`` for zero: cheaper than a tensor of zeros) and
            ``H`` is the Hessian of the unscaled training loss of this replica
            (exact through normalisation layers in training mode).
            Reverse-over-reverse on the same forward pass (the outer tape is
            persistent): it may be traced in several ``cond``/``switch``
            branches, of which only the one taken runs.
        layer_statistics: captured layer inputs and output gradients, one per
            call of a layer of a type in ``statistics_layer_types`` (a shared
            layer has one per call), in the order the forward pass called them (empty unless the optimizer asked for
            them). Under mixed precision the output gradients are float32.
    """

    variables: Sequence[tf.Variable]
    gradients: Sequence[tf.Tensor]
    hessian_vector_product: Callable[
        [Sequence[tf.Tensor], Sequence[tf.Variable]], list[tf.Tensor]
    ]
    layer_statistics: Sequence[LayerStatistics] = ()


class CurvatureOptimizer(keras.optimizers.Optimizer):
    """Base class of optimizers whose update needs curvature from the train step.

    Subclasses implement :meth:`compute_curvature` and :meth:`store_curvature`,
    and set :attr:`needs_hessian_vector_products` and/or
    :attr:`statistics_layer_types`.
    """

    #: The train step must build the nested tapes for Hessian-vector products.
    needs_hessian_vector_products: bool = False
    #: Layer classes whose inputs and output gradients the train step must
    #: capture (empty: none).
    statistics_layer_types: tuple[type[keras.layers.Layer], ...] = ()

    def compute_curvature(
        self, context: CurvatureContext
    ) -> tuple[list[tf.Tensor], list[Reduction]]:
        """Per-replica curvature quantities of this step, and how to reduce each."""
        raise NotImplementedError

    def store_curvature(self, values: Sequence[tf.Tensor]) -> None:
        """Write the all-reduced quantities into this optimizer's slot variables."""
        raise NotImplementedError

    def connect_curvature_source(self) -> None:
        """Called by the tfcurv train step before its first ``apply``."""
        self._curvature_source_connected = True

    def apply(self, grads, trainable_variables=None):
        if not getattr(self, "_curvature_source_connected", False):
            raise RuntimeError(
                f"{type(self).__name__} needs curvature that only the tfcurv train "
                "step provides, but this model trains with the plain Keras step. "
                "Use `model = tfcurv.attach(model)` before `compile`/`fit`, or build "
                "the model as `tfcurv.Model` / `tfcurv.Sequential`."
            )
        return super().apply(grads, trainable_variables)
