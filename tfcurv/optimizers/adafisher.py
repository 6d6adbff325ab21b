"""AdaFisher and AdaFisherW: Adam-like updates preconditioned by a diagonal
Kronecker-factored empirical Fisher (Gomes et al., ICLR 2025).

Faithful to the official implementation (``AtlasAnalyticsLab/AdaFisher``,
``optimizers/AdaFisher.py`` at ``eb858c6``), see ``spec/algorithms.md`` §2 and
``docs/optimizers/adafisher.md``. Every ``update_freq`` steps the tfcurv train
step hands over the inputs and pre-activation output gradients of every layer
of tfcurv's layer table (:mod:`tfcurv.curvature.layer_blocks`: the official
Dense, Conv2D, BatchNormalization and LayerNormalization, and Embedding,
EinsumDense, the other convolutions and normalisations); from them each
layer's factor vectors ``H`` (input side) and ``S`` (output side) are min-max
normalised and folded into an EMA. Every step, each weight gets

    F = S_i * H_j + damping
    m <- beta * m + (1 - beta) * g
    AdaFisher:  theta <- theta - lr / (1 - beta^t) * m / F          (g += wd * theta)
    AdaFisherW: theta <- theta - lr * (m / (1 - beta^t) / F + wd * theta)

Variables of no layer in the table (recurrent cells, custom weights, ...) get
a diagonal empirical Fisher from the squared mini-batch gradient, factored
into the same ``H``/``S`` slots (``unsupported_layers="diagonal"``, the
default), or the official ``F = 1`` (``unsupported_layers="identity"``, with
which such variables barely train). Variables are paired with layers by
identity; a shared layer sums its statistics over its calls.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings

import keras
import tensorflow as tf
from keras import ops

from tfcurv import _keras
from tfcurv._checks import check_bool, check_choice, check_integer, check_range
from tfcurv.curvature import layer_blocks
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


def _diagonal_fisher_factors(variable, gradient):
    """``(lead, last)`` of a variable no block covers: the squared (global
    mini-batch) gradient, split by :func:`layer_blocks.rank_one_factors` and
    min-max normalised."""
    gradient = tf.cast(gradient, variable.dtype)
    lead, last = layer_blocks.rank_one_factors(gradient * gradient, tuple(variable.shape))
    return (
        layer_blocks.min_max_normalize(lead, single_entry_is_one=True),
        layer_blocks.min_max_normalize(last, single_entry_is_one=True),
    )


@dataclasses.dataclass
class _Plan:
    """Which block preconditions which of the optimizer's variables, this trace."""

    blocks: list  # layer_blocks.Block, each with the variables it covers
    inputs: list  # per block, the input of each call of its layer
    output_gradients: list  # per block, the output gradient of each call
    sums: list | None  # per block, the structure of its statistic sums
    fallback: list  # variables with the diagonal empirical Fisher
    fallback_positions: list  # their positions in the context's variables
    uncovered: list  # variables of no block (fallback or F = 1)

    @classmethod
    def from_context(cls, optimizer, context):
        by_layer = {}
        for statistics in context.layer_statistics:
            by_layer.setdefault(id(statistics.layer), []).append(statistics)
        blocks, inputs, gradients, covered = [], [], [], set()
        for records in by_layer.values():
            block = layer_blocks.block_for(records[0].layer)
            if block is None or not block.variables:
                continue
            known = [v for v in block.variables if _knows(optimizer, v)]
            if len(known) != len(block.variables):
                continue  # partly outside this optimizer: diagonal for its part
            if not all(block.supports_statistics(r.inputs) for r in records):
                continue
            blocks.append(block)
            inputs.append([r.inputs for r in records])
            gradients.append(
                [
                    tf.zeros_like(r.outputs) if r.output_gradients is None
                    else r.output_gradients
                    for r in records
                ]  # fmt: skip
            )
            covered.update(id(v) for v in known)
        uncovered = [v for v in context.variables if id(v) not in covered]
        diagonal = optimizer.unsupported_layers == "diagonal"
        positions = [
            i for i, v in enumerate(context.variables) if id(v) not in covered
        ] if diagonal else []  # fmt: skip
        return cls(
            blocks, inputs, gradients, None,
            [context.variables[i] for i in positions], positions, uncovered,
        )  # fmt: skip

    def pairing(self, optimizer):
        """The saved pairing: 1 for a variable a block covers, 0 for F = 1."""
        flags = [0] * len(optimizer._momentums)
        for block in self.blocks:
            for variable in block.variables:
                flags[_keras.variable_index(optimizer, variable)] = 1
        return tf.constant(flags, "int32")


def _knows(optimizer, variable) -> bool:
    try:
        _keras.variable_index(optimizer, variable)
    except KeyError:
        return False
    return True


class _AdaFisherBase(CurvatureOptimizer):
    """Statistics, factor state and preconditioner shared by AdaFisher and AdaFisherW."""

    statistics_layer_types = layer_blocks.supported_layer_types(parameterised_only=True)

    def __init__(
        self,
        learning_rate=1e-3,
        beta: float = 0.9,
        damping: float = 1e-3,
        gamma: float = 0.8,
        update_freq: int = 100,
        weight_decay: float = 0.0,
        normalized_ema: bool = False,
        unsupported_layers: str = "diagonal",
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
        self.unsupported_layers = check_choice(
            "unsupported_layers", unsupported_layers, ("diagonal", "identity")
        )
        self._pairing = None
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
        if self.unsupported_layers == "identity":
            # Saved state: 1 for a variable of a layer in the table, 0 for
            # F = 1, -1 before the first step paired them.
            self._pairing = self.add_variable(
                shape=(len(var_list),),
                initializer=keras.initializers.Constant(-1),
                dtype="int32",
                aggregation="only_first_replica",
                name="fisher_pairing",
            )

    def _apply_weight_decay(self, variables):
        """No-op: AdaFisher's decay is coupled L2 and AdaFisherW's is inside its
        update (``update_step``); Keras' generic decay must not apply it twice."""

    # ------------------------------------------------------------ statistics
    def _statistics_due(self):
        return ops.equal(ops.mod(self.iterations, self.update_freq), 0)

    def compute_curvature(self, context: CurvatureContext):
        """This replica's statistic sums of every block (summed over the calls
        of a shared layer) on statistics steps, zeros on the other steps, and
        the gradients of the variables no block covers (``"diagonal"``); all
        sum-reduced across replicas."""
        plan = self._plan = _Plan.from_context(self, context)
        self._log_summary(plan)
        if not plan.blocks and not plan.fallback:
            return [], []
        inputs, gradients = plan.inputs, plan.output_gradients

        def sums(inputs, gradients):
            """Per block, its statistic sums added up over the layer's calls."""
            totals = []
            for block, xs, gs in zip(plan.blocks, inputs, gradients):
                dtype = block.variables[0].dtype
                per_call = [block.statistic_sums(x, g, dtype) for x, g in zip(xs, gs)]
                totals.append([tf.add_n(list(parts)) for parts in zip(*per_call)])
            return totals

        values = []
        if plan.blocks:
            # Traced once, outside the cond: the other branch only needs the
            # shapes and dtypes of its outputs (zeros), not a second copy of
            # the sums. No AutoGraph (nor below): no Python control flow
            # depends on a tensor, and converting the source took most of the
            # first trace's time.
            compiled = tf.function(
                sums, jit_compile=True, autograph=False
            ).get_concrete_function(inputs, gradients)
            plan.sums = compiled.structured_outputs

            def skip():
                return tf.nest.map_structure(
                    lambda total: tf.zeros(total.shape, total.dtype), plan.sums
                )

            values = tf.nest.flatten(
                ops.cond(self._statistics_due(), lambda: compiled(inputs, gradients), skip)
            )
        values += [tf.convert_to_tensor(context.gradients[i]) for i in plan.fallback_positions]
        return values, ["sum"] * len(values)

    def store_curvature(self, values):
        """Turn the global sums into normalised factors and fold them into the
        EMA, on statistics steps only."""
        plan = self._plan
        slots = [self._slot_pair(v) for block in plan.blocks for v in block.variables]
        slots += [self._slot_pair(v) for v in plan.fallback]
        if not slots:
            return
        current = [t for pair in slots for t in (pair[0].value, pair[1].value)]
        keep, forget = self._ema_weights()

        size = len(tf.nest.flatten(plan.sums)) if plan.blocks else 0

        @tf.function(jit_compile=True, autograph=False)
        def normalize_and_average(current, values):
            fresh = []
            if plan.blocks:
                grouped = tf.nest.pack_sequence_as(plan.sums, values[:size])
                for block, sums in zip(plan.blocks, grouped):
                    fresh += block.normalized_factors(sums)
            for variable, gradient in zip(plan.fallback, values[size:]):
                fresh.append(_diagonal_fisher_factors(variable, gradient))
            updated = []
            for (lead, last), h_old, s_old in zip(fresh, current[0::2], current[1::2]):
                keep_, forget_ = constant(keep, h_old.dtype), constant(forget, h_old.dtype)
                updated.append(h_old * keep_ + forget_ * tf.cast(lead, h_old.dtype))
                updated.append(s_old * keep_ + forget_ * tf.cast(last, s_old.dtype))
            return updated

        new_values = ops.cond(
            self._statistics_due(),
            lambda: normalize_and_average(current, list(values)),
            lambda: current,
        )
        for (h_slot, s_slot), h, s in zip(slots, new_values[0::2], new_values[1::2]):
            h_slot.assign(h)
            s_slot.assign(s)
        if self._pairing is not None:
            self._pairing.assign(plan.pairing(self))

    def _slot_pair(self, variable):
        index = _keras.variable_index(self, variable)
        return self._input_factors[index], self._output_factors[index]

    def _ema_weights(self) -> tuple[float, float]:
        """``(keep, forget)`` of ``H <- keep * H + forget * h_hat``.

        Official: ``gamma * 1e-1`` and ``gamma * 1e-2`` (they do not sum to 1).
        ``normalized_ema=True``: ``gamma`` and ``1 - gamma``.
        """
        if self.normalized_ema:
            return self.gamma, 1.0 - self.gamma
        return self.gamma * 1e-1, self.gamma * 1e-2

    def _log_summary(self, plan) -> None:
        if self._summary_logged:
            return
        self._summary_logged = True
        logger.info(
            "%s: Kronecker-factored layers: %s",
            type(self).__name__,
            ", ".join(block.layer.name for block in plan.blocks) or "none",
        )
        if not plan.uncovered:
            return
        names = ", ".join(v.path for v in plan.uncovered)
        if self.unsupported_layers == "identity":
            consequence = (
                "they use F = 1 (unsupported_layers='identity', as the official "
                "code): their steps are about 1/damping = "
                f"{1 / self.damping:.3g} times smaller than those of the "
                "preconditioned layers, so they barely train"
            )
        else:
            consequence = (
                "they are preconditioned by a diagonal empirical Fisher (the "
                "squared mini-batch gradient, row/column factored, min-max "
                "normalised) instead of Kronecker factors"
            )
        warnings.warn(
            f"{type(self).__name__}: no Kronecker factors for the variables "
            f"{names} (their layers are not in tfcurv's layer table, or are "
            f"configured in a way it does not factor); {consequence}.",
            stacklevel=2,
        )

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
        h, s = self.fisher_factors(variable)
        shape = tuple(variable.shape)
        if len(shape) >= 2:
            outer = ops.reshape(h, shape[:-1] + (1,)) * s
        else:
            outer = h * s
        fisher = outer + constant(self.damping, dtype)
        if self._pairing is None:
            return fisher
        if tf.executing_eagerly() and int(self._pairing[index]) < 0:
            raise ValueError(
                f"The preconditioner of {variable.path} is not known before the "
                "first training step (unsupported_layers='identity' pairs "
                "variables with layers in the first step)."
            )
        return ops.where(self._pairing[index] > 0, fisher, ops.ones_like(fisher))

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
                "unsupported_layers": self.unsupported_layers,
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
