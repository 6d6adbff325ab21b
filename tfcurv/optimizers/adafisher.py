"""AdaFisher and AdaFisherW: Adam-like updates preconditioned by a diagonal
Kronecker-factored empirical Fisher (Gomes et al., ICLR 2025).

Faithful to the official implementation (``AtlasAnalyticsLab/AdaFisher``,
``optimizers/AdaFisher.py`` at ``eb858c6``), see ``spec/algorithms.md`` §2 and
``docs/optimizers/adafisher.md``. Every ``update_freq`` steps the tfcurv train
step hands over the inputs and pre-activation output gradients of every Dense,
Conv2D, BatchNormalization and LayerNormalization layer; from them each layer's
factor vectors ``H`` (input side) and ``S`` (output side) are min-max normalised
and folded into an EMA. Every step, each weight of a supported layer gets

    F = S_i * H_j + damping
    m <- beta * m + (1 - beta) * g
    AdaFisher:  theta <- theta - lr / (1 - beta^t) * m / F          (g += wd * theta)
    AdaFisherW: theta <- theta - lr * (m / (1 - beta^t) / F + wd * theta)

Variables of no supported layer (Embedding tables, custom weights, ...) use
``F = 1``; variables are paired with layers by identity.
"""

from __future__ import annotations

import logging
import math

import keras
import tensorflow as tf
from keras import ops

from tfcurv import _keras
from tfcurv._checks import check_bool, check_integer, check_range
from tfcurv.optimizers import kronecker_statistics as ks
from tfcurv.optimizers.curvature_optimizer import CurvatureContext, CurvatureOptimizer
from tfcurv.optimizers.hyperparameters import constant

logger = logging.getLogger("tfcurv")


def _factor_sizes(shape) -> tuple[int, int]:
    """Sizes of a variable's slices of ``H`` and ``S``, from its shape alone.

    A kernel (rank >= 2, last axis = output units) owns one ``H`` entry per
    kernel row; a bias or normalisation scale owns one entry. Both own one ``S``
    entry per output unit.
    """
    shape = tuple(shape)
    h_size = math.prod(shape[:-1]) if len(shape) >= 2 else 1
    s_size = shape[-1] if shape else 1
    return h_size, s_size


class _AdaFisherBase(CurvatureOptimizer):
    """Statistics, factor state and preconditioner shared by AdaFisher and AdaFisherW."""

    statistics_layer_types = (
        keras.layers.Dense,
        keras.layers.Conv2D,
        keras.layers.BatchNormalization,
        keras.layers.LayerNormalization,
    )

    def __init__(
        self,
        learning_rate=1e-3,
        beta: float = 0.9,
        damping: float = 1e-3,
        gamma: float = 0.8,
        update_freq: int = 100,
        weight_decay: float = 0.0,
        normalized_ema: bool = False,
        name: str | None = None,
        **kwargs,
    ):
        # `weight_decay` is not passed on: Keras' own (decoupled, float32-cast)
        # decay stays off, the decay of both variants is part of `update_step`.
        super().__init__(
            learning_rate=learning_rate, name=name, **kwargs
        )
        if isinstance(learning_rate, (int, float)):
            check_range("learning_rate", learning_rate, 0.0)
        self.beta = check_range("beta", beta, 0.0, 1.0, high_inclusive=False)
        self.damping = check_range("damping", damping, 0.0, low_inclusive=False)
        self.gamma = check_range("gamma", gamma, 0.0, 1.0, high_inclusive=False)
        self.update_freq = check_integer("update_freq", update_freq)
        self.weight_decay = check_range("weight_decay", weight_decay, 0.0)
        self.normalized_ema = check_bool("normalized_ema", normalized_ema)
        self._preconditioned: dict[int, bool] = {}
        self._layouts: list[ks.FactorLayout] = []
        self._summary_logged = False

    # ------------------------------------------------------------------ state
    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._momentums = self.add_optimizer_variables(var_list, "exp_avg")
        self._input_factors, self._output_factors = [], []
        for variable in var_list:
            h_size, s_size = _factor_sizes(variable.shape)
            prefix = variable.path.replace("/", "_")
            for sizes, name, store in (
                (h_size, "fisher_H", self._input_factors),
                (s_size, "fisher_S", self._output_factors),
            ):
                store.append(
                    self.add_variable(
                        shape=(sizes,),
                        initializer="ones",
                        dtype=variable.dtype,
                        aggregation="only_first_replica",
                        name=f"{prefix}_{name}",
                    )
                )
        self._decayed = [_keras.uses_weight_decay(self, v) for v in var_list]

    def _apply_weight_decay(self, variables):
        """No-op: AdaFisher's decay is coupled L2 and AdaFisherW's is inside its
        update (``update_step``); Keras' generic decay must not apply it twice."""

    # ------------------------------------------------------------ statistics
    def _statistics_due(self):
        return ops.equal(ops.mod(self.iterations, self.update_freq), 0)

    def compute_curvature(self, context: CurvatureContext):
        """This replica's batch sums of every preconditioned layer (three tensors
        per layer, see :func:`kronecker_statistics.batch_sums`) on statistics
        steps, zeros on the other steps; sum-reduced across replicas."""
        self._pair_variables(context)
        layouts = self._layouts
        if not layouts:
            return [], []
        statistics = {id(s.layer): s for s in context.layer_statistics}
        inputs = [statistics[id(layout.layer)].inputs for layout in layouts]
        gradients = [
            tf.zeros_like(x) if g is None else g
            for x, g in zip(
                inputs, (statistics[id(lay.layer)].output_gradients for lay in layouts)
            )
        ]

        def sums(inputs, gradients):
            return [
                total
                for layout, x, g in zip(layouts, inputs, gradients)
                for total in ks.batch_sums(layout, x, g, layout.parts[0].variable.dtype)
            ]

        # Traced once, outside the cond: the other branch only needs the shapes
        # and dtypes of its outputs (zeros), not a second copy of the sums. No
        # AutoGraph (nor below): no Python control flow depends on a tensor,
        # and converting the source took most of the first trace's time.
        compiled = tf.function(
            sums, jit_compile=True, autograph=False
        ).get_concrete_function(inputs, gradients)
        outputs = compiled.structured_outputs

        def skip():
            return [tf.zeros(total.shape, total.dtype) for total in outputs]

        values = ops.cond(
            self._statistics_due(), lambda: compiled(inputs, gradients), skip
        )
        return list(values), ["sum"] * len(values)

    def store_curvature(self, values):
        """Turn the global batch sums into the official factors, min-max normalise
        them and fold them into the EMA, on statistics steps only."""
        layouts = self._layouts
        if not layouts:
            return
        slots = []
        for layout in layouts:
            for part in layout.parts:
                index = _keras.variable_index(self, part.variable)
                slots.append((self._input_factors[index], self._output_factors[index]))
        current = [t for pair in slots for t in (pair[0].value, pair[1].value)]
        keep, forget = self._ema_weights()

        @tf.function(jit_compile=True, autograph=False)
        def normalize_and_average(current, values):
            updated, position = [], 0
            for number, layout in enumerate(layouts):
                h, s = ks.factors_from_sums(layout, values[3 * number : 3 * number + 3])
                h_hat, s_hat = ks.min_max_normalize(h), ks.min_max_normalize(s)
                for part in layout.parts:
                    h_old, s_old = current[position], current[position + 1]
                    keep_, forget_ = (
                        constant(keep, h_old.dtype),
                        constant(forget, h_old.dtype),
                    )
                    updated.append(
                        h_old * keep_ + forget_ * h_hat[part.start : part.stop]
                    )
                    updated.append(s_old * keep_ + forget_ * s_hat)
                    position += 2
            return updated

        new_values = ops.cond(
            self._statistics_due(),
            lambda: normalize_and_average(current, list(values)),
            lambda: current,
        )
        for (h_slot, s_slot), h, s in zip(slots, new_values[0::2], new_values[1::2]):
            h_slot.assign(h)
            s_slot.assign(s)

    def _ema_weights(self) -> tuple[float, float]:
        """``(keep, forget)`` of ``H <- keep * H + forget * h_hat``.

        Official: ``gamma * 1e-1`` and ``gamma * 1e-2`` (they do not sum to 1).
        ``normalized_ema=True``: ``gamma`` and ``1 - gamma``.
        """
        if self.normalized_ema:
            return self.gamma, 1.0 - self.gamma
        return self.gamma * 1e-1, self.gamma * 1e-2

    def _index(self, layout: ks.FactorLayout) -> int:
        return _keras.variable_index(self, layout.parts[0].variable)

    def _pair_variables(self, context: CurvatureContext) -> None:
        """Pair the optimizer's variables with the captured layers, by identity."""
        layouts, preconditioned, fallback_layers = [], {}, []
        for statistics in context.layer_statistics:
            layout = ks.factor_layout(statistics.layer, statistics.inputs)
            if isinstance(layout, str):
                fallback_layers.append(f"{statistics.layer.name} ({layout})")
                continue
            parts = tuple(p for p in layout.parts if self._knows(p.variable))
            if not parts:
                continue
            layouts.append(
                ks.FactorLayout(layout.layer, layout.kind, layout.h_size, parts)
            )
            for part in parts:
                preconditioned[_keras.variable_index(self, part.variable)] = True
        self._layouts = layouts
        self._preconditioned = preconditioned
        if not self._summary_logged:
            self._summary_logged = True
            self._log_summary(layouts, fallback_layers)

    def _knows(self, variable) -> bool:
        try:
            _keras.variable_index(self, variable)
        except KeyError:
            return False
        return True

    def _log_summary(self, layouts, fallback_layers) -> None:
        fallback = [
            v.path
            for i, v in enumerate(self._trainable_variables)
            if not self._preconditioned.get(i)
        ]
        message = (
            f"{type(self).__name__}: Fisher-preconditioned layers: "
            f"{', '.join(lay.layer.name for lay in layouts) or 'none'}; "
            f"F = 1 for variables: {', '.join(fallback) or 'none'}"
            + (
                f"; unsupported layers: {', '.join(fallback_layers)}"
                if fallback_layers
                else ""
            )
        )
        logger.log(logging.WARNING if fallback else logging.INFO, message)

    # ---------------------------------------------------------- preconditioner
    def fisher_factors(self, variable) -> tuple[tf.Tensor, tf.Tensor]:
        """``(H, S)``: ``variable``'s slice of its layer's input-side factor (one
        entry per kernel row in Keras' row order, or one entry for a bias or
        normalisation parameter) and the output-side factor (one per unit)."""
        index = _keras.variable_index(self, variable)
        return self._input_factors[index].value, self._output_factors[index].value

    def preconditioner(self, variable) -> tf.Tensor:
        """``F~`` of ``variable`` as the next update will use it (shape of the variable).

        ``S_i * H_j + damping`` for a variable of a preconditioned layer, ones for
        the others.
        """
        index = _keras.variable_index(self, variable)
        dtype = variable.dtype
        if not self._preconditioned.get(index):
            return ops.ones(variable.shape, dtype)
        h, s = self.fisher_factors(variable)
        shape = tuple(variable.shape)
        if len(shape) >= 2:
            outer = ops.reshape(h, shape[:-1] + (1,)) * s
        else:
            outer = h * s
        return outer + constant(self.damping, dtype)

    def _bias_correction(self, dtype):
        step = ops.cast(self.iterations + 1, dtype)
        return 1.0 - ops.power(constant(self.beta, dtype), step)

    def _update_momentum(self, index, gradient, dtype):
        momentum = self._momentums[index]
        self.assign(
            momentum,
            momentum * constant(self.beta, dtype)
            + constant(1.0 - self.beta, dtype) * gradient,
        )
        return momentum

    def _decay_of(self, index, dtype):
        """``weight_decay`` as a tensor, or None where it does not apply."""
        if self.weight_decay == 0.0 or not self._decayed[index]:
            return None
        return constant(self.weight_decay, dtype)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "beta": self.beta,
                "damping": self.damping,
                "gamma": self.gamma,
                "update_freq": self.update_freq,
                "weight_decay": self.weight_decay,
                "normalized_ema": self.normalized_ema,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="tfcurv")
class AdaFisher(_AdaFisherBase):
    """AdaFisher with coupled L2 weight decay (``g <- g + weight_decay * theta``).

    Args:
        learning_rate: float or schedule, ``>= 0``.
        beta: EMA factor of the gradient, in ``[0, 1)``.
        damping: ``lambda`` added to the Kronecker product, ``> 0``.
        gamma: factor EMA parameter, in ``[0, 1)``; the official EMA is
            ``H <- (gamma / 10) H + (gamma / 100) h_hat``.
        update_freq: refresh the factor statistics every this many steps (``TCov``).
        weight_decay: coupled L2 coefficient, ``>= 0``.
        normalized_ema: ``False`` (official) or ``True`` for the convex EMA
            ``H <- gamma H + (1 - gamma) h_hat`` (see the docs page).
        **kwargs: the other ``keras.optimizers.Optimizer`` arguments.

    Use with a model trained by the tfcurv train step (``tfcurv.attach(model)``,
    ``tfcurv.Model``, ``tfcurv.Sequential``).
    """

    def update_step(self, gradient, variable, learning_rate):
        index = _keras.variable_index(self, variable)
        dtype = variable.dtype
        gradient = ops.cast(gradient, dtype)
        decay = self._decay_of(index, dtype)
        if decay is not None:
            gradient = gradient + decay * variable
        momentum = self._update_momentum(index, gradient, dtype)
        step_size = ops.cast(learning_rate, dtype) / self._bias_correction(dtype)
        self.assign_sub(
            variable, step_size * (momentum / self.preconditioner(variable))
        )


@keras.saving.register_keras_serializable(package="tfcurv")
class AdaFisherW(_AdaFisherBase):
    """AdaFisher with decoupled weight decay:
    ``theta <- theta - lr * (m_hat / F + weight_decay * theta)``.

    Same arguments as :class:`AdaFisher`.
    """

    def update_step(self, gradient, variable, learning_rate):
        index = _keras.variable_index(self, variable)
        dtype = variable.dtype
        gradient = ops.cast(gradient, dtype)
        momentum = self._update_momentum(index, gradient, dtype)
        step = momentum / self._bias_correction(dtype) / self.preconditioner(variable)
        decay = self._decay_of(index, dtype)
        if decay is not None:
            step = step + decay * variable
        self.assign_sub(variable, ops.cast(learning_rate, dtype) * step)
