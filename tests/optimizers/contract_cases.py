"""Building blocks of the optimizer contract test (``test_contract.py``).

An optimizer joins the contract with one :class:`OptimizerCase` in
``test_contract.CASES``. This module holds the case type, the description of
valid hyper-parameter ranges (from which the tests derive invalid values), the
toy problems and small training helpers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

import keras
import numpy as np
from hypothesis import strategies as st

# --- hyper-parameter ranges ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Interval:
    """Valid values: real numbers between ``low`` and ``high`` (``None``: unbounded).

    ``optional``: ``None`` is valid too. ``integer``: only whole numbers are valid.
    """

    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True
    optional: bool = False
    integer: bool = False

    def contains(self, value: float) -> bool:
        if self.low is not None and (
            value < self.low or (value == self.low and not self.low_inclusive)
        ):
            return False
        if self.high is not None and (
            value > self.high or (value == self.high and not self.high_inclusive)
        ):
            return False
        return not self.integer or float(value).is_integer()

    def valid_values(self) -> st.SearchStrategy:
        if self.integer:
            low = math.ceil(self.low) if self.low is not None else -(10**6)
            high = math.floor(self.high) if self.high is not None else 10**6
            values = st.integers(low, high).filter(self.contains)
        else:
            values = st.floats(
                min_value=self.low if self.low is not None else -1e6,
                max_value=self.high if self.high is not None else 1e6,
                exclude_min=self.low is not None and not self.low_inclusive,
                exclude_max=self.high is not None and not self.high_inclusive,
            )
        return st.one_of(st.none(), values) if self.optional else values

    def invalid_values(self) -> st.SearchStrategy:
        outside = [st.sampled_from([math.nan, math.inf, -math.inf, "0.5", [0.5]])]
        if self.low is not None:
            outside.append(
                st.floats(max_value=self.low).filter(lambda v: not self.contains(v))
            )
        if self.high is not None:
            outside.append(
                st.floats(min_value=self.high).filter(lambda v: not self.contains(v))
            )
        if self.integer:
            outside.append(
                st.floats(
                    self.low, self.high, allow_nan=False, allow_infinity=False
                ).filter(lambda v: not float(v).is_integer())
            )
        if not self.optional:
            outside.append(st.none())
        return st.one_of(outside)


@dataclasses.dataclass(frozen=True)
class Choice:
    """Valid values: exactly one of ``values`` (``True``/``False`` for flags)."""

    values: tuple

    def contains(self, value) -> bool:
        return any(
            value is v or (type(value) is type(v) and value == v) for v in self.values
        )

    def valid_values(self) -> st.SearchStrategy:
        return st.sampled_from(self.values)

    def invalid_values(self) -> st.SearchStrategy:
        anything = st.one_of(
            st.none(),
            st.integers(-3, 3),
            st.floats(),
            st.text(max_size=8),
            st.just([True]),
        )
        return anything.filter(lambda v: not self.contains(v))


FLAG = Choice((True, False))

# --- the registry entry -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OptimizerCase:
    """One optimizer under the contract.

    Attributes:
        name: test id.
        factory: ``factory(**kwargs)`` returns a fresh optimizer; ``kwargs`` are
            ``converging_kwargs`` plus Keras arguments (``clipnorm``, ``use_ema``,
            ``gradient_accumulation_steps``, a schedule as ``learning_rate``...).
        converging_kwargs: hyper-parameters that make the toy problems (a small
            regression and a small BN classifier, ~100 steps) converge.
        hyperparameter_ranges: the optimizer's own hyper-parameters and their
            valid values; every value outside must raise ``ValueError`` naming it.
        needs_tfcurv_step: train through ``tfcurv.attach(model)``.
    """

    name: str
    factory: Callable[..., keras.optimizers.Optimizer]
    converging_kwargs: Mapping[str, object]
    hyperparameter_ranges: Mapping[str, Interval | Choice]
    needs_tfcurv_step: bool = False

    def optimizer(self, **keras_kwargs) -> keras.optimizers.Optimizer:
        return self.factory(**{**self.converging_kwargs, **keras_kwargs})


# --- toy problems ---------------------------------------------------------------

BATCH_SIZE = 16


def regression_data(samples: int = 128, dtype: str = "float32"):
    """``y = tanh(x·w) + 0.01·noise`` with 8 features."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(samples, 8))
    y = np.tanh(x @ rng.normal(size=(8, 1)) / 2.0) + 0.01 * rng.normal(
        size=(samples, 1)
    )
    return x.astype(dtype), y.astype(dtype)


def classification_data(samples: int = 128, dtype: str = "float32"):
    """6×6 images, class 1 brighter in the top half, class 0 in the bottom half."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, size=samples)
    images = rng.normal(scale=0.5, size=(samples, 6, 6, 1))
    images[labels == 1, :3] += 1.0
    images[labels == 0, 3:] += 1.0
    return images.astype(dtype), labels


def regression_model() -> keras.Model:
    """Dense → LayerNormalization → tanh → Dense: kernels, biases, LN γ/β."""
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, name="fc1"),
            keras.layers.LayerNormalization(name="ln1"),
            keras.layers.Activation("tanh", name="act1"),
            keras.layers.Dense(1, name="fc2"),
        ]
    )


def classifier_model() -> keras.Model:
    """Conv2D → BatchNormalization → ReLU → pooling → Dense (1-D BN γ/β)."""
    return keras.Sequential(
        [
            keras.Input((6, 6, 1)),
            keras.layers.Conv2D(4, 3, name="conv1"),
            keras.layers.BatchNormalization(name="bn1"),
            keras.layers.ReLU(name="relu1"),
            keras.layers.GlobalAveragePooling2D(name="gap"),
            keras.layers.Dense(2, name="fc"),
        ]
    )


PROBLEMS = {
    "regression": (regression_model, regression_data, "mse"),
    "classifier": (
        classifier_model,
        classification_data,
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    ),
}


def make_model(case: OptimizerCase, problem: str = "regression") -> keras.Model:
    """The toy model with fixed initial weights, attached when the case needs it."""
    keras.utils.set_random_seed(0)
    model = PROBLEMS[problem][0]()
    if case.needs_tfcurv_step:
        import tfcurv  # the training package is optional for step-free optimizers

        model = tfcurv.attach(model)
    return model


def compiled_model(case, optimizer, problem="regression", **compile_kwargs):
    model = make_model(case, problem)
    model.compile(optimizer=optimizer, loss=PROBLEMS[problem][2], **compile_kwargs)
    return model


def data(problem: str = "regression", dtype: str | None = None, samples: int = 128):
    return PROBLEMS[problem][1](samples, dtype or keras.config.floatx())


class StepRecorder(keras.callbacks.Callback):
    """Trainable weights after every training batch."""

    def __init__(self):
        super().__init__()
        self.steps: list[list[np.ndarray]] = []

    def on_train_batch_end(self, batch, logs=None):
        self.steps.append([w.numpy().copy() for w in self.model.trainable_weights])


def fit(model, x, y, batch_size=BATCH_SIZE, epochs=1, **kwargs) -> StepRecorder:
    """``model.fit`` without shuffling; returns the per-step weights."""
    recorder = StepRecorder()
    model.fit(
        x,
        y,
        batch_size=batch_size,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=[recorder],
        **kwargs,
    )
    return recorder


def state(model) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Every model weight and every optimizer variable, as arrays."""
    return (
        [w.numpy() for w in model.weights],
        [v.numpy() for v in model.optimizer.variables],
    )
