"""The contract every tfcurv optimizer passes.

To put an optimizer under the contract, add one :class:`OptimizerCase` to
``CASES`` below: how to build it, hyper-parameters with which the toy problems
converge, the valid range of each of its own hyper-parameters, and whether it
needs the tfcurv train step (``tfcurv.attach``). Building blocks are in
``contract_cases.py``.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from contract_cases import (
    BATCH_SIZE,
    FLAG,
    Choice,
    Interval,
    OptimizerCase,
    compiled_model,
    data,
    fit,
    make_model,
    state,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import tfcurv

POSITIVE = Interval(0.0, None, low_inclusive=False)
NON_NEGATIVE = Interval(0.0, None)
UNIT_INTERVAL_OPEN_ABOVE = Interval(0.0, 1.0, high_inclusive=False)

CASES = [
    OptimizerCase(
        name="AGD",
        factory=tfcurv.optimizers.AGD,
        converging_kwargs={"learning_rate": 1e-2},
        hyperparameter_ranges={
            "learning_rate": POSITIVE,
            "beta_1": UNIT_INTERVAL_OPEN_ABOVE,
            "beta_2": UNIT_INTERVAL_OPEN_ABOVE,
            "delta": POSITIVE,
            "clip": Interval(0.0, None, low_inclusive=False, optional=True),
            "weight_decay": Interval(0.0, None, optional=True),
            "amsgrad": FLAG,
            "decoupled_weight_decay": FLAG,
            "fixed_decay": FLAG,
            "bias_correction_dtype": Choice((None, "float32", "float64")),
            "fused": FLAG,
        },
    ),
    *(
        OptimizerCase(
            name=name,
            factory=factory,
            converging_kwargs={"learning_rate": 1e-3, "update_freq": 3},
            hyperparameter_ranges={
                "learning_rate": NON_NEGATIVE,
                "beta": UNIT_INTERVAL_OPEN_ABOVE,
                "damping": POSITIVE,
                "gamma": UNIT_INTERVAL_OPEN_ABOVE,
                "update_freq": Interval(1, None, integer=True),
                "weight_decay": NON_NEGATIVE,
                "normalized_ema": FLAG,
            },
            needs_tfcurv_step=True,
        )
        for name, factory in (
            ("AdaFisher", tfcurv.optimizers.AdaFisher),
            ("AdaFisherW", tfcurv.optimizers.AdaFisherW),
        )
    ),
    OptimizerCase(
        name="SGDPH",
        factory=tfcurv.optimizers.SGDPH,
        converging_kwargs={"learning_rate": 0.02},
        hyperparameter_ranges={
            "learning_rate": POSITIVE,
            "momentum": UNIT_INTERVAL_OPEN_ABOVE,
            "tau": POSITIVE,
            "epsilon": POSITIVE,
            "weight_decay": NON_NEGATIVE,
            "curvature_every": Interval(1, None, integer=True),
        },
        needs_tfcurv_step=True,
    ),
]

by_case = pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)


def assert_states_equal(actual, expected):
    """Weights and optimizer variables, bit for bit."""
    for group_actual, group_expected, what in zip(
        actual, expected, ("weight", "optimizer")
    ):
        assert len(group_actual) == len(group_expected)
        for index, (a, e) in enumerate(zip(group_actual, group_expected)):
            np.testing.assert_array_equal(a, e, err_msg=f"{what} variable {index}")


def movement(recorder) -> float:
    """Total absolute change of all weights from the first to the last step."""
    first, last = recorder.steps[0], recorder.steps[-1]
    return sum(float(np.abs(b - a).sum()) for a, b in zip(first, last))


# --- convergence ----------------------------------------------------------------


@by_case
def test_converges_on_toy_regression(case):
    model = compiled_model(case, case.optimizer())
    x, y = data()
    history = model.fit(x, y, batch_size=BATCH_SIZE, epochs=12, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.1 * losses[0], losses


@by_case
def test_converges_on_toy_classifier(case):
    model = compiled_model(case, case.optimizer(), "classifier", metrics=["accuracy"])
    x, y = data("classifier")
    history = model.fit(x, y, batch_size=BATCH_SIZE, epochs=12, verbose=0)
    assert history.history["loss"][-1] < 0.5 * history.history["loss"][0]
    assert history.history["accuracy"][-1] >= 0.9


# --- serialization ------------------------------------------------------------


@by_case
def test_config_round_trip(case):
    optimizer = case.optimizer(clipnorm=1.0)
    config = optimizer.get_config()
    restored = type(optimizer).from_config(config)
    assert restored.get_config() == config
    serialized = keras.optimizers.serialize(optimizer)
    assert serialized["registered_name"] == f"tfcurv>{type(optimizer).__name__}"
    assert type(keras.optimizers.deserialize(serialized)) is type(optimizer)


@by_case
def test_save_load_continue_is_bit_identical(case, tmp_path):
    x, y = data("classifier")
    half = 3 * BATCH_SIZE

    uninterrupted = compiled_model(case, case.optimizer(), "classifier")
    fit(uninterrupted, x[: 2 * half], y[: 2 * half])

    interrupted = compiled_model(case, case.optimizer(), "classifier")
    fit(interrupted, x[:half], y[:half])
    interrupted.save(tmp_path / "model.keras")
    del interrupted
    keras.utils.clear_session()
    restored = keras.models.load_model(tmp_path / "model.keras")
    if case.needs_tfcurv_step:
        restored = tfcurv.attach(restored)
    assert type(restored.optimizer) is type(uninterrupted.optimizer)
    fit(restored, x[half : 2 * half], y[half : 2 * half])

    assert_states_equal(state(restored), state(uninterrupted))


@by_case
def test_default_names_are_unique_as_in_keras(case):
    """Keras' rule, the one its base ``Optimizer`` applies to a ``name=None``
    (and Keras 3.15's own classes; Keras 3.13's SGD is still named "SGD"): an
    optimizer of the same class name is named first, the tfcurv optimizers
    continue its sequence (``agd``, ``agd_1``, ``agd_2``)."""
    class_name = type(case.factory()).__name__
    keras.utils.clear_session()
    keras_named = type(class_name, (keras.optimizers.Optimizer,), {})(learning_rate=0.1)
    first, second = case.factory(), case.factory()
    assert (first.name, second.name) == (
        f"{keras_named.name}_1",
        f"{keras_named.name}_2",
    )
    assert case.factory(name="mine").name == "mine"


def _numpy_scalar(value):
    """The NumPy scalar a user gets from an array or a NumPy computation."""
    if isinstance(value, bool):
        return np.bool_(value)
    if isinstance(value, int):
        return np.int64(value)
    if isinstance(value, float):
        return np.float64(value)
    return value


# --- compiled step ----------------------------------------------------------------


def _slot_signature(optimizer):
    return [(v.path, tuple(v.shape), v.dtype) for v in optimizer.variables]


@by_case
def test_state_shapes_and_dtypes_are_stable_across_steps(case):
    """Built once, then only assigned: the same variables, shapes and dtypes
    after the first step and after curvature refreshes (AdaFisher's
    ``update_freq=3``, every SGD-PH target), for float32 and float64 models."""
    for floatx in ("float32", "float64"):
        keras.config.set_floatx(floatx)
        keras.config.set_dtype_policy(floatx)  # the first model fixed the policy
        x, y = data("classifier", samples=8 * BATCH_SIZE)
        model = compiled_model(case, case.optimizer(), "classifier")
        fit(model, x[:BATCH_SIZE], y[:BATCH_SIZE])
        after_one = _slot_signature(model.optimizer)
        fit(model, x, y, epochs=2)
        assert _slot_signature(model.optimizer) == after_one, floatx
        assert int(model.optimizer.iterations.numpy()) == 17
        for path, shape, dtype in after_one:
            if path.endswith(("/iteration", "/learning_rate")):
                continue  # Keras' own counters: int64 and float32, as for Adam
            assert dtype == floatx, (path, shape, dtype)


def _fit_twice_counting_traces(model) -> tuple[int, int]:
    """Traces of the train step in a first ``fit`` (3 epochs), then in a second (2)."""
    train_step, traces = model.train_step, []

    def counting_train_step(batch):
        traces.append(1)  # Python runs here only while TensorFlow traces
        return train_step(batch)

    model.train_step = counting_train_step
    x, y = data(samples=4 * BATCH_SIZE)
    model.fit(x, y, batch_size=BATCH_SIZE, epochs=3, verbose=0)
    first = len(traces)
    model.fit(x, y, batch_size=BATCH_SIZE, epochs=2, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 20
    return first, len(traces) - first


@by_case
def test_fit_traces_the_train_step_once(case):
    """Nothing in the step depends on a Python-side counter or on the epoch: a
    second ``fit`` traces nothing. A curvature optimizer is built before the
    first trace (one trace); an optimizer Keras builds inside the first trace
    is traced as often as Keras Adam (2), since TensorFlow traces a function whose
    first trace created variables a second time."""
    keras_first, keras_second = _fit_twice_counting_traces(
        compiled_model(case, keras.optimizers.Adam())
    )
    assert keras_second == 0
    first, second = _fit_twice_counting_traces(compiled_model(case, case.optimizer()))
    assert (first, second) == ((1, 0) if case.needs_tfcurv_step else (keras_first, 0))


# --- Keras optimizer features -------------------------------------------------


@by_case
def test_learning_rate_schedule_is_followed(case):
    """Two steps at the case's rate, then a rate of 0: nothing moves any more."""
    x, y = data()
    rate = case.converging_kwargs.get("learning_rate", 1e-3)
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([1], [rate, 0.0])
    scheduled = fit(compiled_model(case, case.optimizer(learning_rate=schedule)), x, y)
    constant = fit(
        compiled_model(case, case.optimizer()), x[: 2 * BATCH_SIZE], y[: 2 * BATCH_SIZE]
    )

    for a, b in zip(scheduled.steps[1], constant.steps[1]):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert movement(constant) > 0
    for step in scheduled.steps[2:]:
        for a, b in zip(step, scheduled.steps[1]):
            np.testing.assert_array_equal(a, b)


@by_case
def test_use_ema_finalizes_to_moving_average(case):
    x, y = data()
    model = compiled_model(case, case.optimizer(use_ema=True, ema_momentum=0.9))
    recorder = fit(model, x, y)

    expected = [np.array(w) for w in recorder.steps[0]]
    for step in recorder.steps[1:]:
        expected = [0.9 * e + 0.1 * w for e, w in zip(expected, step)]
    for actual, average in zip(model.trainable_weights, expected):
        np.testing.assert_allclose(actual.numpy(), average, rtol=1e-5, atol=1e-6)
    assert not all(
        np.allclose(a.numpy(), r)
        for a, r in zip(model.trainable_weights, recorder.steps[-1])
    )


@by_case
@pytest.mark.parametrize("clip_argument", ["clipnorm", "global_clipnorm"])
def test_gradient_clipping_reaches_the_update(case, clip_argument):
    """A huge bound changes nothing; a tiny one all but stops training."""
    x, y = data(samples=4 * BATCH_SIZE)
    free = fit(compiled_model(case, case.optimizer()), x, y)
    loose = fit(compiled_model(case, case.optimizer(**{clip_argument: 1e9})), x, y)
    tight = fit(compiled_model(case, case.optimizer(**{clip_argument: 1e-8})), x, y)
    for a, b in zip(loose.steps[-1], free.steps[-1]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert movement(tight) < 1e-2 * movement(free)


@by_case
def test_gradient_accumulation(case):
    """Updates every second micro-batch; for gradient-only optimizers these equal
    the steps on batches twice as large (float64, no batch-dependent layer)."""
    keras.config.set_floatx("float64")
    x, y = data(samples=8 * BATCH_SIZE)
    accumulated = fit(
        compiled_model(case, case.optimizer(gradient_accumulation_steps=2)), x, y
    )
    for odd, previous in zip(accumulated.steps[::2], [None, *accumulated.steps[1::2]]):
        if previous is not None:
            for a, b in zip(odd, previous):
                np.testing.assert_array_equal(a, b)  # micro-step: no update
    if case.needs_tfcurv_step:
        return  # curvature comes from each micro-batch, not from their average
    large_batches = fit(
        compiled_model(case, case.optimizer()), x, y, batch_size=2 * BATCH_SIZE
    )
    for micro, large in zip(accumulated.steps[1::2], large_batches.steps):
        for a, b in zip(micro, large):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


@by_case
def test_mixed_float16_trains_under_loss_scale_optimizer(case):
    keras.config.set_dtype_policy("mixed_float16")
    model = compiled_model(case, case.optimizer())
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert isinstance(model.optimizer.inner_optimizer, type(case.optimizer()))
    x, y = data(dtype="float32")
    history = model.fit(x, y, batch_size=BATCH_SIZE, epochs=6, verbose=0)
    assert history.history["loss"][-1] < 0.5 * history.history["loss"][0]
    assert all(np.all(np.isfinite(w.numpy())) for w in model.weights)


@by_case
def test_non_finite_gradient_is_skipped_and_state_stays_finite(case):
    x, y = data(samples=4 * BATCH_SIZE)
    y[BATCH_SIZE : 2 * BATCH_SIZE] = np.nan  # the second step's loss is NaN
    model = compiled_model(case, keras.optimizers.LossScaleOptimizer(case.optimizer()))
    fit(model, x, y)
    assert int(model.optimizer.inner_optimizer.iterations.numpy()) == 3
    for variable in [*model.optimizer.variables, *model.weights]:
        assert np.all(np.isfinite(variable.numpy())), variable.path


@pytest.mark.slow
@pytest.mark.distributed
@by_case
def test_mirrored_strategy_equals_one_device(case, two_replica_strategy):
    keras.config.set_floatx("float64")
    x, y = data(samples=4 * 2 * BATCH_SIZE)
    single = compiled_model(case, case.optimizer())
    assert {w.dtype for w in single.weights} == {"float64"}
    initial = [w.numpy() for w in single.weights]
    fit(single, x, y, batch_size=2 * BATCH_SIZE)

    with two_replica_strategy.scope():
        mirrored = make_model(case)
        mirrored.set_weights(initial)
        mirrored.compile(optimizer=case.optimizer(), loss="mse")
    fit(mirrored, x, y, batch_size=2 * BATCH_SIZE)

    for group_actual, group_expected in zip(state(mirrored), state(single)):
        for a, e in zip(group_actual, group_expected):
            np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-15)


@pytest.mark.slow
@pytest.mark.xla
@by_case
def test_jit_compile_matches_eager_graph(case):
    x, y = data(samples=4 * BATCH_SIZE)
    compiled = compiled_model(case, case.optimizer(), jit_compile=True)
    assert compiled.jit_compile is True
    with_xla = fit(compiled, x, y)
    without = fit(compiled_model(case, case.optimizer(), jit_compile=False), x, y)
    for a, b in zip(with_xla.steps[-1], without.steps[-1]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


#: Operations that run on the host, not on an accelerator (TPU-readiness).
HOST_OPERATIONS = {"PyFunc", "PyFuncStateless", "EagerPyFunc", "PrintV2", "Print",
                   "StringFormat", "StringJoin", "AsString"}  # fmt: skip


@by_case
def test_step_has_no_host_operations(case):
    """The whole replica step (forward, curvature, update), nested functions
    and branches included, holds no host-side operation; what runs on a TPU
    cannot be checked here."""
    x, y = data(samples=BATCH_SIZE)
    model = compiled_model(case, case.optimizer())
    model.optimizer.build(model.trainable_variables)
    step = tf.function(model.train_step).get_concrete_function(
        (tf.constant(x[:BATCH_SIZE]), tf.constant(y[:BATCH_SIZE]))
    )
    definition = step.graph.as_graph_def()
    kinds = {node.op for node in definition.node} | {
        node.op for function in definition.library.function for node in function.node_def
    }
    assert "AssignVariableOp" in kinds or "AssignSubVariableOp" in kinds  # the update
    assert not kinds & HOST_OPERATIONS, kinds & HOST_OPERATIONS


@by_case
def test_steps_per_execution_equals_single_steps(case):
    keras.config.set_floatx("float64")
    x, y = data(samples=6 * BATCH_SIZE)
    several = compiled_model(case, case.optimizer(), steps_per_execution=3)
    fit(several, x, y)
    single = compiled_model(case, case.optimizer())
    fit(single, x, y)
    assert_states_equal(state(several), state(single))


# --- hyper-parameter validation -----------------------------------------------

HYPERPARAMETERS = [
    pytest.param(case, name, id=f"{case.name}-{name}")
    for case in CASES
    for name in case.hyperparameter_ranges
]
EXAMPLES = settings(max_examples=40, deadline=None, derandomize=True)


@pytest.mark.parametrize(("case", "hyperparameter"), HYPERPARAMETERS)
@EXAMPLES
@given(data=st.data())
def test_invalid_hyperparameter_raises_value_error_naming_it(
    case, hyperparameter, data
):
    value = data.draw(case.hyperparameter_ranges[hyperparameter].invalid_values())
    with pytest.raises(ValueError, match=hyperparameter):
        case.factory(**{hyperparameter: value})


@pytest.mark.parametrize(("case", "hyperparameter"), HYPERPARAMETERS)
@EXAMPLES
@given(data=st.data())
def test_valid_hyperparameter_is_accepted(case, hyperparameter, data):
    value = data.draw(case.hyperparameter_ranges[hyperparameter].valid_values())
    case.factory(**{hyperparameter: value})


@pytest.mark.parametrize(("case", "hyperparameter"), HYPERPARAMETERS)
@EXAMPLES
@given(data=st.data())
def test_numpy_scalar_hyperparameter_is_accepted_as_python_one(
    case, hyperparameter, data
):
    """As Keras' own optimizers do; the config stays JSON with the Python value."""
    value = data.draw(case.hyperparameter_ranges[hyperparameter].valid_values())
    from_numpy = case.factory(**{hyperparameter: _numpy_scalar(value)}).get_config()
    from_python = case.factory(**{hyperparameter: value}).get_config()
    from_numpy.pop("name"), from_python.pop("name")
    assert from_numpy == from_python
    assert json.loads(json.dumps(from_numpy)) == from_numpy
