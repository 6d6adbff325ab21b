"""SGD-PH: the official trajectories (float64 fixtures) through ``model.fit``, and unit tests.

The shared contract (serialization, strategies, mixed precision, ...) is in
``test_contract.py``; this file checks the update itself.
"""

from __future__ import annotations

import dataclasses
import itertools

import keras
import numpy as np
import pytest
import reference_fixtures as rf
import tensorflow as tf

import tfcurv
from tfcurv.optimizers import SGDPH

SGDPH_FIXTURES = (
    "sgdph__bn_cnn__default",
    "sgdph__bn_cnn__tau5e-3_wd",
    "sgdph__ln_mlp__default",
)


def sgdph_for_fixture(fixture: rf.Fixture) -> SGDPH:
    hp = fixture.hyperparameters
    return SGDPH(
        learning_rate=hp["lr"],
        momentum=hp["momentum"],
        tau=hp["tau"],
        epsilon=hp["eps"],
        weight_decay=hp["weight_decay"],
    )


class SlotRecorder(rf.WeightRecorder):
    """Also records SGD-PH's momentum buffers and ``D`` after every step."""

    def __init__(self):
        super().__init__()
        self.buffers: list[list[np.ndarray]] = []
        self.diagonals: list[list[np.ndarray]] = []

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        optimizer = self.model.optimizer
        optimizer = getattr(optimizer, "inner_optimizer", optimizer)  # loss scaling
        self.buffers.append([b.numpy().copy() for b in optimizer.momentum_buffers])
        self.diagonals.append([d.numpy().copy() for d in optimizer.diagonals])


def zero_curvature_tensors(fixture: rf.Fixture) -> set[str]:
    """Biases directly in front of a normalisation layer (README §6.3).

    Shift invariance makes their ``H_kk·1`` zero (and, before BatchNormalization,
    their gradient too): the recorded values there are rounding noise, compared
    with an absolute tolerance of 1e-12.
    """
    return {
        f"{layer['name']}/bias"
        for layer, following in itertools.pairwise(fixture.spec["layers"])
        if following["type"] in ("BatchNormalization", "LayerNormalization")
    }


def zero_gradient_tensors(fixture: rf.Fixture) -> set[str]:
    return {
        name
        for name in zero_curvature_tensors(fixture)
        for layer, following in itertools.pairwise(fixture.spec["layers"])
        if name == f"{layer['name']}/bias" and following["type"] == "BatchNormalization"
    }


@pytest.mark.fixtures
@pytest.mark.parametrize("name", SGDPH_FIXTURES)
def test_fit_reproduces_the_official_trajectory(reference_dir, name):
    fixture = rf.load(reference_dir / f"{name}.npz")
    model = rf.build_model(fixture, tfcurv.Model)
    optimizer = sgdph_for_fixture(fixture)
    model.compile(optimizer=optimizer, loss=rf.loss_fn())
    x, y, batch_size = rf.training_data(fixture, reference_dir)
    recorder = SlotRecorder()
    history = model.fit(
        x,
        y,
        batch_size=batch_size,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[recorder],
    )
    steps = fixture.meta["T"]
    assert len(recorder.steps) == steps

    trainable = fixture.trainable_names
    one_d = [
        n for n in trainable if fixture.arrays[f"init_{fixture.weight_index(n):02d}"].ndim == 1
    ]
    assert len(one_d) == fixture.meta["M"] == len(optimizer.diagonals)
    assert one_d[-1].endswith("/bias")  # the plain-SGD tensor is the classifier bias
    no_curvature = zero_curvature_tensors(fixture)
    no_gradient = zero_gradient_tensors(fixture)

    for step in range(steps):
        for index, name_ in enumerate(fixture.weight_names):
            atol = 1e-12 if name_ in no_gradient else 0.0
            rf.assert_close_to_reference(
                recorder.steps[step][index],
                fixture.arrays[f"traj_{index:02d}"][step],
                f"{name_} after step {step + 1}",
                atol=atol,
            )
        for position, name_ in enumerate(trainable):
            index = fixture.weight_index(name_)
            rf.assert_close_to_reference(
                recorder.buffers[step][position],
                fixture.arrays[f"state_momentum_buffer_{index:02d}"][step],
                f"momentum buffer of {name_} after step {step + 1}",
                atol=1e-12 if name_ in no_gradient else 0.0,
            )
        for position, name_ in enumerate(one_d):
            index = fixture.weight_index(name_)
            rf.assert_close_to_reference(
                recorder.diagonals[step][position],
                fixture.arrays[f"state_diag_{index:02d}"][step],
                f"D of {name_} after step {step + 1}",
                atol=1e-12 if name_ in no_curvature else 0.0,
            )
    np.testing.assert_allclose(
        history.history["loss"][0], np.mean(fixture.arrays["loss"]), rtol=1e-9
    )


def test_round_robin_target_follows_the_fixture(reference_dir):
    fixture = rf.load(reference_dir / "sgdph__ln_mlp__default.npz")
    model = rf.build_model(fixture, tfcurv.Model)
    model.compile(optimizer=sgdph_for_fixture(fixture), loss=rf.loss_fn())
    x, y, batch_size = rf.training_data(fixture, reference_dir)
    targets = []

    class Targets(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            curvature = [c.numpy() for c in self.model.optimizer.curvatures]
            nonzero = [j + 1 for j, c in enumerate(curvature) if np.any(c != 0)]
            targets.append(nonzero)

    model.fit(x, y, batch_size=batch_size, shuffle=False, verbose=0, callbacks=[Targets()])
    # fc1/bias (k = 1) feeds LayerNormalization: its H·1 is rounding noise or 0.
    assert len(targets) == fixture.meta["T"]
    for step, (found, expected) in enumerate(zip(targets, fixture.arrays["sgdph_k"])):
        if expected == 1:
            assert set(found) <= {1}, step
        else:
            assert found == [int(expected)], step


def test_sgdph_without_the_tfcurv_step_says_how_to_fix_it():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=SGDPH(), loss="mse")
    with pytest.raises(RuntimeError, match=r"tfcurv\.attach"):
        model.fit(np.ones((4, 3)), np.ones((4, 2)), verbose=0)


@pytest.mark.parametrize("use_bias", [False, True])
def test_with_at_most_one_1d_variable_it_warns_and_is_momentum_sgd(use_bias):
    """No 1-D variable, or only the last (always plain SGD): one warning, no products."""
    kernel = np.array([[0.5, -1.0], [2.0, 0.25]], "float32")
    weights = [kernel, np.array([0.1, -0.2], "float32")] if use_bias else [kernel]

    def trained(optimizer, model_class):
        model = model_class([keras.Input((2,)), keras.layers.Dense(2, use_bias=use_bias)])
        model.set_weights(weights)
        model.compile(optimizer=optimizer, loss="mse")
        x = np.array([[1.0, 2.0], [3.0, -1.0]], "float32")
        model.fit(x, x[:, ::-1], batch_size=2, epochs=3, verbose=0)
        return model.get_weights()

    optimizer = SGDPH(learning_rate=0.01)
    with pytest.warns(UserWarning, match=r"SGDPH found [01] 1-D trainable") as warned:
        result = trained(optimizer, tfcurv.Sequential)
    assert len([w for w in warned if "SGDPH found" in str(w.message)]) == 1
    assert not optimizer.needs_hessian_vector_products
    expected = trained(
        keras.optimizers.SGD(0.01, momentum=np.float64(0.9)), keras.Sequential
    )
    for actual, reference in zip(result, expected):
        np.testing.assert_allclose(actual, reference, rtol=1e-6)


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("learning_rate", -0.1),
        ("learning_rate", 0.0),
        ("momentum", 1.0),
        ("momentum", -0.1),
        ("tau", 0.0),
        ("epsilon", 0.0),
        ("epsilon", float("nan")),
        ("weight_decay", -1e-4),
        ("tau", "big"),
    ],
)
def test_bad_hyperparameters_raise_value_error_naming_them(argument, value):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        SGDPH(**{argument: value})


def test_config_round_trip():
    optimizer = SGDPH(
        learning_rate=0.05,
        momentum=0.8,
        tau=5e-3,
        epsilon=1e-5,
        weight_decay=1e-4,
        curvature_every=4,
    )
    config = optimizer.get_config()
    restored = SGDPH.from_config(config)
    for key in ("momentum", "tau", "epsilon", "weight_decay", "curvature_every"):
        assert getattr(restored, key) == getattr(optimizer, key)
    assert config["weight_decay"] == 1e-4
    assert keras.optimizers.deserialize(keras.optimizers.serialize(optimizer)).tau == 5e-3


# ``curvature_every``: an explicit reference on a small float64 MLP.

MLP_STEPS = 11
MLP_BATCH = 8


def mlp_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(MLP_STEPS * MLP_BATCH, 5))
    y = rng.normal(size=(MLP_STEPS * MLP_BATCH, 3))
    return x, y


def mlp(model_class=tfcurv.Sequential) -> keras.Model:
    """Three biases (M = 3), tanh in between so that every ``H_kk·1`` is non-zero."""
    keras.utils.set_random_seed(7)
    return model_class(
        [
            keras.Input((5,)),
            keras.layers.Dense(4, activation="tanh"),
            keras.layers.Dense(4, activation="tanh"),
            keras.layers.Dense(3),
        ]
    )


def mlp_loss():
    """Squared error: unlike softmax cross-entropy, it leaves the output bias a
    non-zero ``H_kk·1``, so every refresh is visible in ``D``."""
    return keras.losses.MeanSquaredError()


def reference_trajectory(initial, x, y, *, lr, momentum, tau, epsilon, every):
    """SGD-PH with ``curvature_every`` written out step by step in NumPy.

    Gradients and ``H_kk·1`` come from nested ``tf.GradientTape``s on a loss
    closure (not from the tfcurv train step); everything else is NumPy.
    """
    model = mlp(keras.Sequential)
    loss_fn = mlp_loss()
    weights = [w.copy() for w in initial]
    one_d = [i for i, w in enumerate(weights) if w.ndim == 1]
    buffers = [np.zeros_like(w) for w in weights]
    diagonals = {i: np.zeros_like(weights[i]) for i in one_d}
    trajectory, diagonal_trajectory = [], []
    for step in range(MLP_STEPS):
        batch = slice(step * MLP_BATCH, (step + 1) * MLP_BATCH)
        model.set_weights(weights)
        refresh = step % every == 0
        count = step // every
        target = one_d[count % len(one_d)]
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                loss = loss_fn(y[batch], model(x[batch], training=True))
            gradients = inner.gradient(loss, model.trainable_variables)
            directional = tf.reduce_sum(gradients[target])
        curvature = outer.gradient(directional, model.trainable_variables[target])
        gradients = [g.numpy() for g in gradients]
        for i in one_d:
            if refresh and i == target:
                diagonals[i] = momentum * diagonals[i] + (1 - momentum) * np.abs(curvature.numpy())
        correction = 1 - momentum ** ((count + 1) // len(one_d) + 1)
        for i, gradient in enumerate(gradients):
            buffers[i] = momentum * buffers[i] + gradient
            if i in one_d and i != one_d[-1]:
                direction = tau * correction * buffers[i] / (diagonals[i] + epsilon)
            else:
                direction = buffers[i]
            weights[i] = weights[i] - lr * direction
        trajectory.append([w.copy() for w in weights])
        diagonal_trajectory.append([diagonals[i].copy() for i in one_d])
    return trajectory, diagonal_trajectory


def fit_mlp(make_optimizer, *, jit_compile=False, strategy=None):
    """Train the MLP for ``MLP_STEPS`` steps; the initial weights and a recorder."""
    x, y = mlp_data()
    model = mlp()
    initial = [w.numpy() for w in model.weights]
    if strategy is not None:
        with strategy.scope():
            model = mlp()
            model.set_weights(initial)
            model.compile(optimizer=make_optimizer(), loss=mlp_loss())
    else:
        model.compile(optimizer=make_optimizer(), loss=mlp_loss(), jit_compile=jit_compile)
    recorder = SlotRecorder()
    model.fit(x, y, batch_size=MLP_BATCH, shuffle=False, verbose=0, callbacks=[recorder])
    return initial, recorder


@pytest.mark.parametrize("every", [2, 3, 4])
def test_curvature_every_matches_an_explicit_reference(every):
    keras.config.set_floatx("float64")
    hyperparameters = {"momentum": 0.9, "tau": 0.05, "epsilon": 1e-3}
    initial, recorder = fit_mlp(
        lambda: SGDPH(learning_rate=0.1, curvature_every=every, **hyperparameters)
    )
    weights, diagonals = reference_trajectory(
        initial, *mlp_data(), lr=0.1, every=every, **hyperparameters
    )
    for step in range(MLP_STEPS):
        for actual, expected in zip(recorder.steps[step], weights[step]):
            rf.assert_close_to_reference(actual, expected, f"weights, step {step}")
        for actual, expected in zip(recorder.diagonals[step], diagonals[step]):
            rf.assert_close_to_reference(actual, expected, f"D, step {step}")
    assert refreshed_positions(recorder) == documented_refreshes(every, 3)


def refreshed_positions(recorder) -> list[list[int]]:
    """Per step, the positions of the 1-D variables whose ``D`` changed."""
    previous = [np.zeros_like(d) for d in recorder.diagonals[0]]
    changed = []
    for diagonals in recorder.diagonals:
        changed.append([j for j, (d, p) in enumerate(zip(diagonals, previous)) if np.any(d != p)])
        previous = diagonals
    return changed


def documented_refreshes(every: int, num_one_d: int) -> list[list[int]]:
    """``D_j`` is refreshed at step ``s`` iff ``s mod k = 0`` and ``⌊s/k⌋ mod M = j``."""
    return [[(step // every) % num_one_d] if step % every == 0 else [] for step in range(MLP_STEPS)]


class CountingSGDPH(SGDPH):
    """Counts the Hessian-vector products that actually run.

    The counter is incremented inside the product's branch, next to the product
    itself: it only moves when that branch executes.
    """

    def __init__(self, counter: tf.Variable, **kwargs):
        super().__init__(**kwargs)
        self.counter = counter

    def compute_curvature(self, context):
        def counted(vectors, wrt):
            with tf.control_dependencies([self.counter.assign_add(1)]):
                return [tf.identity(p) for p in context.hessian_vector_product(vectors, wrt)]

        return super().compute_curvature(
            dataclasses.replace(context, hessian_vector_product=counted)
        )


@pytest.mark.parametrize("jit_compile", [False, True])
def test_products_run_only_on_refresh_steps(jit_compile):
    counter = tf.Variable(0, dtype="int64")
    every = 4
    _, recorder = fit_mlp(
        lambda: CountingSGDPH(counter, curvature_every=every), jit_compile=jit_compile
    )
    assert int(counter.numpy()) == len(range(0, MLP_STEPS, every))
    assert refreshed_positions(recorder) == documented_refreshes(every, 3)


def test_curvature_every_one_runs_a_product_every_step():
    counter = tf.Variable(0, dtype="int64")
    fit_mlp(lambda: CountingSGDPH(counter))
    assert int(counter.numpy()) == MLP_STEPS


def test_curvature_every_under_mixed_float16_refreshes_on_schedule():
    keras.config.set_dtype_policy("mixed_float16")
    try:
        initial, recorder = fit_mlp(lambda: SGDPH(curvature_every=3))
    finally:
        keras.config.set_dtype_policy("float32")
    assert refreshed_positions(recorder) == documented_refreshes(3, 3)
    assert all(np.all(np.isfinite(w)) for step in recorder.steps for w in step)


@pytest.mark.distributed
def test_curvature_every_under_mirrored_strategy_equals_one_device(
    two_replica_strategy,
):
    keras.config.set_floatx("float64")
    _, single = fit_mlp(lambda: SGDPH(curvature_every=3))
    _, mirrored = fit_mlp(lambda: SGDPH(curvature_every=3), strategy=two_replica_strategy)
    for expected, actual in zip(single.steps, mirrored.steps):
        for e, a in zip(expected, actual):
            np.testing.assert_allclose(a, e, rtol=1e-9, atol=1e-12)
    assert refreshed_positions(mirrored) == documented_refreshes(3, 3)


@pytest.mark.parametrize("value", [0, -2, 2.0, 1.5, True, "4"])
def test_curvature_every_must_be_a_positive_integer(value):
    with pytest.raises(ValueError, match="`curvature_every`"):
        SGDPH(curvature_every=value)
