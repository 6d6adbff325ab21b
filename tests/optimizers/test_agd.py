"""AGD: the official trajectories (float64 fixtures) and unit tests.

The shared contract (serialization, strategies, mixed precision, ...) is in
``test_contract.py``; this file checks the update itself.
"""

from __future__ import annotations

import inspect
import itertools

import keras
import numpy as np
import pytest
import reference_fixtures as rf
import tensorflow as tf

from tfcurv.optimizers import AGD

AGD_FIXTURES = (
    "agd__bn_cnn__clip",
    "agd__bn_cnn__default",
    "agd__bn_cnn__default_f32step",
    "agd__bn_cnn__sgdbranch",
    "agd__ln_mlp__amsgrad",
    "agd__ln_mlp__wd_coupled",
    "agd__mlp_tanh__default",
    "agd__mlp_tanh__wd_decoupled",
)
SLOTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def agd_for_fixture(fixture: rf.Fixture, **overrides) -> AGD:
    """The fixture's official hyper-parameters, as AGD arguments."""
    hp = fixture.hyperparameters
    assert not hp["win"], "the Win variant is not implemented"
    kwargs = {
        "learning_rate": hp["lr"],
        "beta_1": hp["betas"][0],
        "beta_2": hp["betas"][1],
        "delta": hp["delta"],
        "amsgrad": hp["amsgrad"],
        "clip": hp["clip"],
        "weight_decay": hp["weight_decay"],
        "decoupled_weight_decay": hp["weight_decouple"],
        "fixed_decay": hp["fixed_decay"],
        "bias_correction_dtype": (
            "float32" if fixture.meta["step_counter_dtype"] == "float32" else None
        ),
    }
    kwargs.update(overrides)
    return AGD(**kwargs)


class StateRecorder(rf.WeightRecorder):
    """Also records every optimizer slot after every step, keyed by slot name."""

    def __init__(self):
        super().__init__()
        self.slots: list[dict[str, np.ndarray]] = []

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        self.slots.append(
            {v.name: v.numpy().copy() for v in self.model.optimizer.variables}
        )


def zero_gradient_coordinates(fixture: rf.Fixture) -> set[str]:
    """Biases directly in front of a BatchNormalization (README §7.4).

    Their true gradient is zero; their recorded values move by rounding noise
    only, so they are compared with an absolute tolerance.
    """
    layers = fixture.spec["layers"]
    return {
        f"{layer['name']}/bias"
        for layer, following in itertools.pairwise(layers)
        if following["type"] == "BatchNormalization" and "inputs" not in following
    }


def train_on_fixture(fixture, reference_dir, optimizer) -> StateRecorder:
    model = rf.build_model(fixture)
    model.compile(optimizer=optimizer, loss=rf.loss_fn())
    x, y, batch_size = rf.training_data(fixture, reference_dir)
    recorder = StateRecorder()
    model.fit(
        x,
        y,
        batch_size=batch_size,
        shuffle=False,
        epochs=1,
        verbose=0,
        callbacks=[recorder],
    )
    return recorder


@pytest.mark.fixtures
@pytest.mark.parametrize("name", AGD_FIXTURES)
def test_reproduces_official_trajectory(name, reference_dir):
    fixture = rf.load(reference_dir / f"{name}.npz")
    keras.config.set_floatx("float64")  # the learning-rate variable is float64
    optimizer = agd_for_fixture(fixture)
    recorder = train_on_fixture(fixture, reference_dir, optimizer)

    steps = fixture.meta["T"]
    assert len(recorder.steps) == steps
    absolute = zero_gradient_coordinates(fixture)
    for step in range(steps):
        for index, weight_name in enumerate(fixture.weight_names):
            atol = 1e-12 if weight_name in absolute else 0.0
            rtol = 0.0 if weight_name in absolute else 1e-9
            rf.assert_close_to_reference(
                recorder.steps[step][index],
                fixture.arrays[f"traj_{index:02d}"][step],
                f"{name} step {step} {weight_name}",
                rtol=rtol,
                atol=atol,
            )
            for slot in SLOTS:
                key = f"state_{slot}_{index:02d}"
                if key not in fixture.arrays:
                    continue
                rf.assert_close_to_reference(
                    recorder.slots[step][f"{weight_name.replace('/', '_')}_{slot}"],
                    fixture.arrays[key][step],
                    f"{name} step {step} {weight_name} {slot}",
                    rtol=rtol,
                    atol=atol,
                )


@pytest.mark.fixtures
def test_float32_bias_corrections_are_what_the_f32step_fixture_needs(reference_dir):
    """Without the option, float64 scalars end measurably away from that file."""
    fixture = rf.load(reference_dir / "agd__bn_cnn__default_f32step.npz")
    keras.config.set_floatx("float64")
    recorder = train_on_fixture(
        fixture, reference_dir, agd_for_fixture(fixture, bias_correction_dtype=None)
    )
    index = fixture.weight_index("fc/kernel")
    final, expected = recorder.steps[-1][index], fixture.arrays[f"traj_{index:02d}"][-1]
    assert np.max(np.abs(final - expected) / np.maximum(1.0, np.abs(expected))) > 1e-8


def test_float64_learning_rate_is_exact_when_created_under_float64():
    keras.config.set_floatx("float64")
    optimizer = AGD(learning_rate=1e-3)
    assert optimizer.learning_rate.dtype == "float64"
    assert optimizer.learning_rate.numpy() == np.float64(1e-3)


# --- a NumPy transcription of the official update, for options no fixture covers


def numpy_agd(
    theta,
    gradients,
    lr,
    beta_1=0.9,
    beta_2=0.999,
    delta=1e-5,
    amsgrad=False,
    clip=None,
    weight_decay=0.0,
    decoupled=True,
    fixed_decay=False,
):
    """Parameters after each step; ``gradients(theta)`` gives the gradient."""
    m = np.zeros_like(theta)
    b = np.zeros_like(theta)
    b_max = np.zeros_like(theta)
    trajectory = []
    for t in range(1, 1 + len(gradients)):
        g = gradients[t - 1](theta)
        if decoupled:
            theta = theta * (
                (1.0 - weight_decay) if fixed_decay else (1.0 - lr * weight_decay)
            )
        else:
            g = g + weight_decay * theta
        m_prev, m = m, beta_1 * m + (1 - beta_1) * g
        s = m / (1 - beta_1**t) - (m_prev / (1 - beta_1 ** (t - 1)) if t > 1 else 0.0)
        b = beta_2 * b + (1 - beta_2) * s * s
        b_max = np.maximum(b_max, b)
        denominator = np.maximum(
            np.sqrt(b_max if amsgrad else b), delta * np.sqrt(1 - beta_2**t)
        )
        u = m / denominator
        if clip is not None:
            u = np.clip(u, -clip, clip)
        theta = theta - lr * np.sqrt(1 - beta_2**t) / (1 - beta_1**t) * u
        trajectory.append(theta)
    return trajectory


QUADRATIC_CURVATURE = np.array([2.0, 0.5, 1e-4, 0.0, 3.0])


def quadratic_gradient(theta):
    """Gradient of ½ Σ c θ² + θ·shift (one coordinate with exactly zero gradient)."""
    return QUADRATIC_CURVATURE * theta + np.array([0.3, -0.2, 1e-9, 0.0, 0.0])


def run_agd_on_quadratic(optimizer, theta0, steps):
    keras.config.set_floatx("float64")
    variable = keras.Variable(theta0, dtype="float64")
    trajectory = []
    for _ in range(steps):
        gradient = tf.constant(quadratic_gradient(variable.numpy()))
        optimizer.apply([gradient], [variable])
        trajectory.append(variable.numpy().copy())
    return trajectory


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"amsgrad": True},
        {"clip": 0.3},
        {"weight_decay": 0.05},
        {"weight_decay": 0.05, "fixed_decay": True},
        {"weight_decay": 0.05, "decoupled_weight_decay": False},
        {"delta": 0.5, "beta_1": 0.5, "beta_2": 0.9},
    ],
    ids=lambda options: ",".join(f"{k}={v}" for k, v in options.items()) or "default",
)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_matches_numpy_transcription_of_official_update(options, fused):
    keras.config.set_floatx("float64")
    theta0 = np.array([1.0, -2.0, 0.5, 0.25, 1e-3])
    steps = 8
    actual = run_agd_on_quadratic(
        AGD(learning_rate=0.05, fused=fused, **options), theta0, steps
    )
    numpy_options = {
        "amsgrad": options.get("amsgrad", False),
        "clip": options.get("clip"),
        "weight_decay": options.get("weight_decay", 0.0),
        "decoupled": options.get("decoupled_weight_decay", True),
        "fixed_decay": options.get("fixed_decay", False),
    }
    for key in ("delta", "beta_1", "beta_2"):
        if key in options:
            numpy_options[key] = options[key]
    expected = numpy_agd(theta0, [quadratic_gradient] * steps, 0.05, **numpy_options)
    for step, (a, e) in enumerate(zip(actual, expected)):
        np.testing.assert_allclose(a, e, rtol=1e-13, atol=1e-15, err_msg=f"step {step}")


def test_first_step_is_sign_descent_where_gradient_exceeds_delta():
    keras.config.set_floatx("float64")
    theta0 = np.array([1.0, -2.0, 0.5, 0.25, 1e-3])
    (after_one_step,) = run_agd_on_quadratic(AGD(learning_rate=0.01), theta0, 1)
    gradient = quadratic_gradient(theta0)
    large = np.abs(gradient) > 1e-5
    np.testing.assert_allclose(
        after_one_step[large], (theta0 - 0.01 * np.sign(gradient))[large], rtol=1e-14
    )
    assert after_one_step[3] == theta0[3]  # exactly zero gradient: no move at all


def test_decay_applied_once_and_base_class_hook_still_needs_disabling():
    """Keras' own decoupled decay hook still exists and would decay a second time.

    AGD disables ``Optimizer._apply_weight_decay`` and decays inside its update;
    if Keras stopped calling that hook, this test tells us the override can go.
    """
    keras.config.set_floatx("float64")
    theta0 = np.array([1.0, -2.0, 0.5, 0.25, 1e-3])

    class AGDWithKerasDecayToo(AGD):
        _apply_weight_decay = keras.optimizers.Optimizer._apply_weight_decay

    once = run_agd_on_quadratic(AGD(learning_rate=0.05, weight_decay=0.5), theta0, 3)
    twice = run_agd_on_quadratic(
        AGDWithKerasDecayToo(learning_rate=0.05, weight_decay=0.5), theta0, 3
    )
    expected = numpy_agd(theta0, [quadratic_gradient] * 3, 0.05, weight_decay=0.5)
    np.testing.assert_allclose(once[-1], expected[-1], rtol=1e-13)
    assert np.max(np.abs(twice[-1] - expected[-1])) > 1e-4


def test_exclude_from_weight_decay_is_honoured():
    keras.config.set_floatx("float64")
    kernel = keras.Variable(np.ones((2, 2)), name="kernel")
    bias = keras.Variable(np.ones(2), name="bias")
    optimizer = AGD(learning_rate=0.1, weight_decay=0.5)
    optimizer.exclude_from_weight_decay(var_names=["bias"])
    zeros = [tf.zeros((2, 2), "float64"), tf.zeros(2, "float64")]
    optimizer.apply(zeros, [kernel, bias])
    np.testing.assert_array_equal(kernel.numpy(), np.full((2, 2), 1.0 - 0.1 * 0.5))
    np.testing.assert_array_equal(bias.numpy(), np.ones(2))


# --- sparse gradients


def test_sparse_gradients_equal_the_densified_update():
    """IndexedSlices (with a repeated row and untouched rows) == dense gradient.

    In the official dense update, rows without gradient still decay their
    moments and keep moving; the sparse path must do the same.
    """
    keras.config.set_floatx("float64")
    rng = np.random.default_rng(0)
    table = rng.normal(size=(6, 3))
    sparse_variable = keras.Variable(table)
    dense_variable = keras.Variable(table)
    sparse_optimizer, dense_optimizer = AGD(learning_rate=0.01), AGD(learning_rate=0.01)
    for step in range(4):
        indices = np.array([1, 4, 1]) if step < 2 else np.array([2])
        values = rng.normal(size=(len(indices), 3))
        dense = np.zeros_like(table)
        np.add.at(dense, indices, values)
        sparse_optimizer.apply(
            [
                tf.IndexedSlices(
                    tf.constant(values), tf.constant(indices), tf.constant([6, 3])
                )
            ],
            [sparse_variable],
        )
        dense_optimizer.apply([tf.constant(dense)], [dense_variable])
        np.testing.assert_allclose(
            sparse_variable.numpy(), dense_variable.numpy(), rtol=1e-15, atol=0
        )
    # rows 1 and 4 got gradient only in steps 0-1 and still moved afterwards
    assert not np.allclose(sparse_variable.numpy()[[1, 4]], table[[1, 4]])
    for a, b in zip(sparse_optimizer.variables, dense_optimizer.variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-15)


def test_embedding_model_trains_with_sparse_gradients():
    keras.utils.set_random_seed(0)
    vocabulary, length = 50, 4
    model = keras.Sequential(
        [
            keras.Input((length,), dtype="int32"),
            keras.layers.Embedding(vocabulary, 8),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(1),
        ]
    )
    x = np.random.default_rng(1).integers(0, vocabulary // 2, size=(256, length))
    y = (x.sum(axis=1, keepdims=True) / (length * vocabulary)).astype("float32")
    with tf.GradientTape() as tape:
        loss = keras.losses.mean_squared_error(y[:8], model(x[:8]))
    assert isinstance(tape.gradient(loss, model.layers[0].embeddings), tf.IndexedSlices)

    model.compile(optimizer=AGD(learning_rate=3e-3), loss="mse")
    untouched_before = model.layers[0].embeddings.numpy()[vocabulary // 2 :].copy()
    history = model.fit(x, y, batch_size=32, epochs=5, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.2 * losses[0]
    # rows never looked up have zero gradient and never move (m stays 0)
    np.testing.assert_array_equal(
        model.layers[0].embeddings.numpy()[vocabulary // 2 :], untouched_before
    )


# --- configuration


def test_get_config_holds_every_constructor_argument():
    optimizer = AGD(
        learning_rate=0.02,
        beta_1=0.8,
        beta_2=0.99,
        delta=1e-6,
        amsgrad=True,
        clip=2.0,
        weight_decay=0.01,
        decoupled_weight_decay=False,
        fixed_decay=True,
        bias_correction_dtype="float32",
        fused=False,
        name="my_agd",
        clipnorm=1.0,
    )
    config = optimizer.get_config()
    own = set(inspect.signature(AGD.__init__).parameters) - {"self", "kwargs"}
    assert own <= set(config)
    assert config["bias_correction_dtype"] == "float32" and config["fused"] is False
    assert config["name"] == "my_agd" and config["clipnorm"] == 1.0
    restored = AGD.from_config(config)
    assert restored.get_config() == config


@pytest.mark.parametrize(
    ("argument", "value", "range_text"),
    [
        ("learning_rate", 0.0, "(0.0, inf]"),
        ("beta_1", 1.0, "[0.0, 1.0)"),
        ("beta_2", -0.1, "[0.0, 1.0)"),
        ("delta", 0.0, "(0.0, inf]"),
        ("clip", -1.0, "(0.0, inf]"),
        ("weight_decay", -1e-3, "[0.0, inf]"),
        ("amsgrad", 1, "True or False"),
        ("decoupled_weight_decay", "yes", "True or False"),
        ("fixed_decay", None, "True or False"),
        ("fused", "no", "True or False"),
        ("bias_correction_dtype", "float16", "(None, 'float32', 'float64')"),
    ],
)
def test_bad_hyperparameter_message_names_argument_and_range(
    argument, value, range_text
):
    with pytest.raises(ValueError, match=argument) as error:
        AGD(**{argument: value})
    assert range_text in str(error.value)
