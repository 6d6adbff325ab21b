"""Tests of AdaFisher / AdaFisherW: official fixtures, factor statistics, model styles."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import reference_fixtures as rf
import tensorflow as tf

from tfcurv.curvature import layer_blocks
from tfcurv.optimizers.adafisher import AdaFisher, AdaFisherW
from tfcurv.training import Model, Sequential, attach

FIXTURES = [
    "adafisher__bn_cnn__tcov1",
    "adafisher__mlp_tanh__tcov1",
    "adafisher__ln_mlp__tcov1",
    "adafisher__bn_cnn__tcov100",
    "adafisher__ln_mlp__wd",
    "adafisherw__bn_cnn__wd",
]


# --------------------------------------------------------------------- fixtures
class _StateRecorder(keras.callbacks.Callback):
    """Weights, momentum, factors and preconditioner of every variable after every step."""

    def __init__(self, optimizer):
        super().__init__()
        self.optimizer_ = optimizer
        self.steps = []

    def on_train_batch_end(self, batch, logs=None):
        opt = self.optimizer_
        record = {}
        for variable in self.model.trainable_variables:
            index = opt._get_variable_index(variable)
            h, s = opt.fisher_factors(variable)
            record[variable.path] = {
                "value": variable.numpy().copy(),
                "exp_avg": opt._momentums[index].numpy().copy(),
                "H": h.numpy().copy(),
                "S": s.numpy().copy(),
                "ftilde": opt.preconditioner(variable).numpy().copy(),
            }
        self.steps.append(record)


def _optimizer_for(fixture):
    hp = fixture.hyperparameters
    cls = (
        AdaFisherW
        if fixture.meta["optimizer"].lower().startswith("adafisherw")
        else AdaFisher
    )
    return cls(
        learning_rate=hp["lr"],
        beta=hp["beta"],
        damping=hp["Lambda"],
        gamma=hp["gamma"],
        update_freq=hp["TCov"],
        weight_decay=hp["weight_decay"],
    )


def _torch_order_input_factor(layer, variables_by_name, step):
    """The fixture's `fisher_H_k` layout from tfcurv's per-variable slices."""
    kernel = variables_by_name.get(f"{layer}/kernel")
    if kernel is not None:
        h = kernel["H"]
        shape = kernel["value"].shape
        if len(shape) == 4:  # Keras rows (kh, kw, c) -> torch (c, kh, kw)
            h = h.reshape(shape[:3]).transpose(2, 0, 1).ravel()
        parts = [h] + (
            [variables_by_name[f"{layer}/bias"]["H"]]
            if f"{layer}/bias" in variables_by_name
            else []
        )
        return np.concatenate(parts), kernel["S"]
    gamma, beta = (
        variables_by_name[f"{layer}/gamma"],
        variables_by_name[f"{layer}/beta"],
    )
    np.testing.assert_array_equal(gamma["S"], beta["S"])
    return np.concatenate([gamma["H"], beta["H"]]), gamma["S"]


@pytest.mark.slow
@pytest.mark.fixtures
@pytest.mark.parametrize("name", FIXTURES)
def test_reproduces_the_official_trajectory(name, reference_dir):
    fixture = rf.load(reference_dir / f"{name}.npz")
    model = rf.build_model(fixture, Model)
    optimizer = _optimizer_for(fixture)
    model.compile(optimizer=optimizer, loss=rf.loss_fn())
    x, y, batch_size = rf.training_data(fixture, reference_dir)
    recorder = _StateRecorder(optimizer)
    model.fit(
        x,
        y,
        batch_size=batch_size,
        shuffle=False,
        epochs=1,
        callbacks=[recorder],
        verbose=0,
    )
    assert len(recorder.steps) == fixture.meta["T"]
    arrays = fixture.arrays
    for t, record in enumerate(recorder.steps):
        for index, weight_name in enumerate(fixture.weight_names):
            if weight_name in record:
                state = record[weight_name]
                for key, actual in (
                    ("traj", state["value"]),
                    ("state_exp_avg", state["exp_avg"]),
                    ("ftilde", state["ftilde"]),
                ):
                    rf.assert_close_to_reference(
                        actual,
                        arrays[f"{key}_{index:02d}"][t],
                        f"{key} {weight_name} step {t}",
                    )
        for k, layer in enumerate(str(m) for m in arrays["fisher_modules"]):
            h, s = _torch_order_input_factor(layer, record, t)
            rf.assert_close_to_reference(
                h, arrays[f"fisher_H_{k}"][t], f"H {layer} step {t}"
            )
            rf.assert_close_to_reference(
                s, arrays[f"fisher_S_{k}"][t], f"S {layer} step {t}"
            )


# ------------------------------------------------------- statistics vs NumPy
def _raw_factors(block, x, g, dtype):
    return block.raw_factors(block.statistic_sums(x, g, dtype))


def _numpy_conv_patches(x, kernel_size, strides, padding, dilation, groups):
    """Rows (B * groups * L, C/groups * kh * kw) in torch (c, kh, kw) order,
    for TF padding (SAME pads the extra pixel at the end)."""
    n, height, width, channels = x.shape
    kh, kw = kernel_size
    span_h, span_w = (kh - 1) * dilation[0] + 1, (kw - 1) * dilation[1] + 1
    if padding == "same":
        out_h, out_w = -(-height // strides[0]), -(-width // strides[1])
        pad_h = max((out_h - 1) * strides[0] + span_h - height, 0)
        pad_w = max((out_w - 1) * strides[1] + span_w - width, 0)
        x = np.pad(
            x,
            (
                (0, 0),
                (pad_h // 2, pad_h - pad_h // 2),
                (pad_w // 2, pad_w - pad_w // 2),
                (0, 0),
            ),
        )
    else:
        out_h = (height - span_h) // strides[0] + 1
        out_w = (width - span_w) // strides[1] + 1
    per_group = channels // groups
    rows = []
    for b in range(n):
        for g in range(groups):
            for i in range(out_h):
                for j in range(out_w):
                    window = x[
                        b,
                        i * strides[0] : i * strides[0] + span_h : dilation[0],
                        j * strides[1] : j * strides[1] + span_w : dilation[1],
                        g * per_group : (g + 1) * per_group,
                    ]
                    rows.append(window.transpose(2, 0, 1).ravel())
    return np.array(rows), out_h * out_w


@pytest.mark.parametrize(
    "strides, padding, dilation, groups, use_bias",
    [
        ((1, 1), "valid", (1, 1), 1, True),
        ((2, 2), "same", (1, 1), 1, True),
        ((2, 1), "valid", (1, 1), 2, True),
        ((1, 1), "same", (2, 2), 1, False),
        ((3, 2), "same", (1, 1), 3, True),
        ((1, 1), "valid", (2, 1), 3, True),
    ],
)
def test_conv2d_factors_match_a_direct_numpy_computation(
    strides, padding, dilation, groups, use_bias
):
    keras.config.set_floatx("float64")
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 7, 8, 6))
    layer = keras.layers.Conv2D(
        6,
        (3, 2),
        strides=strides,
        padding=padding,
        dilation_rate=dilation,
        groups=groups,
        use_bias=use_bias,
    )
    out = layer(x)
    g = rng.normal(size=out.shape)
    block = layer_blocks.block_for(layer)
    h, s = _raw_factors(block, tf.constant(x), tf.constant(g), "float64")

    rows, positions = _numpy_conv_patches(x, (3, 2), strides, padding, dilation, groups)
    d = rows.shape[1]
    if use_bias:
        rows = np.concatenate([rows, np.ones((len(rows), 1))], axis=1)
    expected_h_torch = (rows**2).sum(0) / (x.shape[0] * positions * d)
    # tfcurv stores the kernel part in Keras (kh, kw, c) row order.
    kernel_part = expected_h_torch[:d].reshape(d // 6, 3, 2).transpose(1, 2, 0).ravel()
    expected_h = np.concatenate([kernel_part, expected_h_torch[d:]])
    np.testing.assert_allclose(h.numpy(), expected_h, rtol=1e-12)
    np.testing.assert_allclose(
        s.numpy(), (g**2).sum((0, 1, 2)) / (g.shape[0] * positions), rtol=1e-12
    )
    assert (
        h.shape[0]
        == layer.kernel.shape[0] * layer.kernel.shape[1] * layer.kernel.shape[2]
        + use_bias
    )


def test_dense_factors_on_a_rank3_input():
    keras.config.set_floatx("float64")
    rng = np.random.default_rng(4)
    x, g = rng.normal(size=(3, 5, 4)), rng.normal(size=(3, 5, 2))
    layer = keras.layers.Dense(2)
    layer(x)
    h, s = _raw_factors(
        layer_blocks.block_for(layer), tf.constant(x), tf.constant(g), "float64"
    )
    rows = np.concatenate([x.reshape(15, 4), np.ones((15, 1))], axis=1)
    np.testing.assert_allclose(h.numpy(), (rows**2).mean(0), rtol=1e-13)
    np.testing.assert_allclose(s.numpy(), (g.reshape(15, 2) ** 2).mean(0), rtol=1e-13)


def test_normalization_factors_match_the_official_formulas():
    keras.config.set_floatx("float64")
    rng = np.random.default_rng(5)
    x, g = rng.normal(size=(4, 3, 5, 6)), rng.normal(size=(4, 3, 5, 6))
    bn = keras.layers.BatchNormalization()
    bn(x)
    h, s = _raw_factors(
        layer_blocks.block_for(bn), tf.constant(x), tf.constant(g), "float64"
    )
    u = x.sum((0, 1, 2)) / 15**2
    np.testing.assert_allclose(h.numpy(), [np.sum(u**2) / 16, 6 / 16], rtol=1e-13)
    np.testing.assert_allclose(s.numpy(), g.sum((0, 1, 2)) ** 2 / 4, rtol=1e-13)

    x3, g3 = rng.normal(size=(4, 3, 6)), rng.normal(size=(4, 3, 6))
    ln = keras.layers.LayerNormalization()
    ln(x3)
    h, s = _raw_factors(
        layer_blocks.block_for(ln), tf.constant(x3), tf.constant(g3), "float64"
    )
    u = x3.sum((0, 2)) / 6**2  # every dim except dim 1, literally as the official code
    np.testing.assert_allclose(h.numpy(), [np.sum(u**2) / 16, 3 / 16], rtol=1e-13)
    np.testing.assert_allclose(s.numpy(), g3.sum((0, 1)) ** 2 / 4, rtol=1e-13)


def test_min_max_normalization_keeps_the_official_epsilon():
    v = tf.constant([2.0, 3.0, np.inf, 2.5], "float64")
    expected = (np.array([2.0, 3.0, 1.0, 2.5]) - 1.0) / (3.0 - 1.0 + 1e-6)
    np.testing.assert_allclose(layer_blocks.min_max_normalize(v).numpy(), expected, rtol=1e-15)


def test_layer_norm_over_other_axes_is_not_kronecker_factored():
    ln = keras.layers.LayerNormalization(axis=1)
    x3 = np.zeros((2, 3, 4))
    ln(x3)
    assert not layer_blocks.block_for(ln).supports_statistics(x3)
    default = keras.layers.LayerNormalization()
    default(x3)
    assert layer_blocks.block_for(default).supports_statistics(x3)


# -------------------------------------------------------------- model styles
def _fused_layers():
    return [
        keras.layers.Conv2D(3, 3, padding="same", activation="relu", name="conv"),
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.Flatten(name="flat"),
        keras.layers.Dense(6, activation="tanh", name="fc1"),
        keras.layers.LayerNormalization(name="ln"),
        keras.layers.Dense(3, name="fc2"),
    ]


def _separate_layers():
    """The same network with each activation as its own layer (the official view)."""
    return [
        keras.layers.Conv2D(3, 3, padding="same", name="conv"),
        keras.layers.Activation("relu", name="relu"),
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.Flatten(name="flat"),
        keras.layers.Dense(6, name="fc1"),
        keras.layers.Activation("tanh", name="tanh"),
        keras.layers.LayerNormalization(name="ln"),
        keras.layers.Dense(3, name="fc2"),
    ]


class _Subclassed(Model):
    def __init__(self):
        super().__init__(name="subclassed")
        self.parts = _fused_layers()

    def call(self, x, training=None):
        for part in self.parts:
            x = (
                part(x, training=training)
                if isinstance(part, keras.layers.BatchNormalization)
                else part(x)
            )
        return x


def _build(style):
    if style == "sequential":
        return Sequential([keras.Input((4, 4, 2))] + _fused_layers())
    if style == "functional":
        inputs = keras.Input((4, 4, 2))
        x = inputs
        for layer in _fused_layers():
            x = layer(x)
        return Model(inputs, x)
    if style == "attached_subclassed":

        class Plain(keras.Model):
            def __init__(self):
                super().__init__(name="plain")
                self.parts = _fused_layers()

            def call(self, x, training=None):
                for part in self.parts:
                    x = part(x)
                return x

        model = attach(Plain())
        model(np.zeros((1, 4, 4, 2)))
        return model
    model = _Subclassed()
    model(np.zeros((1, 4, 4, 2)))
    return model


def _train(model, optimizer, steps=4):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(8 * steps, 4, 4, 2))
    y = rng.integers(0, 3, size=8 * steps)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, batch_size=8, shuffle=False, epochs=1, verbose=0)


@pytest.mark.slow
@pytest.mark.parametrize(
    "style", ["sequential", "functional", "subclassed", "attached_subclassed"]
)
def test_every_model_style_and_fused_activations_match_separate_activation_layers(
    style,
):
    keras.config.set_floatx("float64")
    keras.utils.set_random_seed(0)
    reference = Sequential([keras.Input((4, 4, 2))] + _separate_layers())
    model = _build(style)
    model.set_weights(reference.get_weights())
    optimizer, reference_optimizer = AdaFisher(update_freq=2), AdaFisher(update_freq=2)
    _train(reference, reference_optimizer)
    _train(model, optimizer)
    for variable, expected in zip(
        model.trainable_variables, reference.trainable_variables
    ):
        np.testing.assert_allclose(
            variable.numpy(), expected.numpy(), rtol=1e-12, atol=1e-14
        )
        f, f_ref = (
            optimizer.preconditioner(variable),
            reference_optimizer.preconditioner(expected),
        )
        np.testing.assert_allclose(f.numpy(), f_ref.numpy(), rtol=1e-12)
        assert not np.all(
            f.numpy() == 1.0
        )  # every variable belongs to a supported layer


# ------------------------------------------------------------------- fallback
class _Scale(keras.layers.Layer):
    """A custom layer with a weight AdaFisher cannot precondition."""

    def build(self, input_shape):
        self.scale = self.add_weight(
            shape=(input_shape[-1],), initializer="ones", name="scale"
        )

    def call(self, x):
        return x * self.scale


def _custom_layer_model():
    keras.config.set_floatx("float64")
    keras.utils.set_random_seed(1)
    inputs = keras.Input((5,), dtype="int32")
    x = keras.layers.Embedding(7, 4, name="emb")(inputs)
    x = keras.layers.Flatten()(x)
    x = _Scale(name="scale")(x)
    x = keras.layers.Dense(6, activation="tanh", name="fc1")(x)
    outputs = keras.layers.Dense(3, name="fc2")(x)
    rng = np.random.default_rng(2)
    data = rng.integers(0, 7, size=(16, 5)), rng.integers(0, 3, size=16)
    return Model(inputs, outputs), data


def _one_fit_step(model, optimizer, data):
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    before = {v.path: v.numpy().copy() for v in model.trainable_variables}
    with tf.GradientTape() as tape:
        loss = loss_fn(data[1], model(data[0], training=True))
    gradients = tape.gradient(loss, model.trainable_variables)
    grads = {
        v.path: tf.convert_to_tensor(g).numpy()
        for v, g in zip(model.trainable_variables, gradients)
    }
    model.compile(optimizer=optimizer, loss=loss_fn)
    with pytest.warns(UserWarning) as caught:
        model.fit(*data, batch_size=16, epochs=1, verbose=0)
    messages = [str(w.message) for w in caught if "layer table" in str(w.message)]
    assert len(messages) == 1
    by_path = {v.path: v for v in model.trainable_variables}
    return by_path, before, grads, messages[0]


def test_identity_option_gives_f_equal_one_outside_the_table_and_pairs_by_identity():
    model, data = _custom_layer_model()
    optimizer = AdaFisher(update_freq=1, unsupported_layers="identity")
    by_path, before, grads, message = _one_fit_step(model, optimizer, data)
    np.testing.assert_array_equal(
        optimizer.preconditioner(by_path["scale/scale"]).numpy(), 1.0
    )
    # One step: m = (1 - beta) g and bias correction 1 - beta give theta - lr * g.
    np.testing.assert_allclose(
        by_path["scale/scale"].numpy(),
        before["scale/scale"] - 1e-3 * grads["scale/scale"],
        rtol=1e-12,
        atol=1e-15,
    )
    # The table's layers after the custom one are preconditioned (the official
    # index walk would leave the last ones untouched); so is the Embedding.
    for path in ("emb/embeddings", "fc1/kernel", "fc1/bias", "fc2/kernel", "fc2/bias"):
        f = optimizer.preconditioner(by_path[path]).numpy()
        assert np.all(f < 1.0) and np.all(f >= optimizer.damping)
        assert not np.allclose(by_path[path].numpy(), before[path] - 1e-3 * grads[path])
    assert "scale/scale" in message and "barely train" in message
    assert "emb" not in message and "fc1" not in message
    np.testing.assert_array_equal(optimizer._pairing.numpy()[:2], [1, 0])


def test_identity_pairing_is_saved_and_unknown_before_the_first_step(tmp_path):
    model, data = _custom_layer_model()
    optimizer = AdaFisher(update_freq=1, unsupported_layers="identity")
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    optimizer.build(model.trainable_variables)
    with pytest.raises(ValueError, match="before the first training step"):
        optimizer.preconditioner(model.trainable_variables[0])
    with pytest.warns(UserWarning, match="layer table"):
        model.fit(*data, batch_size=16, epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", custom_objects={"_Scale": _Scale})
    for old, new in zip(model.trainable_variables, loaded.trainable_variables):
        np.testing.assert_array_equal(
            optimizer.preconditioner(old).numpy(),
            loaded.optimizer.preconditioner(new).numpy(),
        )


def test_default_preconditions_variables_outside_the_table_by_their_gradient():
    model, data = _custom_layer_model()
    optimizer = AdaFisher(update_freq=1)
    by_path, before, grads, message = _one_fit_step(model, optimizer, data)
    assert "scale/scale" in message and "diagonal empirical Fisher" in message
    g2 = grads["scale/scale"] ** 2  # shape (20,): lead is one entry, last = g^2 / sum
    last = g2 / g2.sum()
    last = (last - last.min()) / (last.max() - last.min() + 1e-6)
    gamma = optimizer.gamma
    expected = (0.1 * gamma + 0.01 * gamma) * (0.1 * gamma + 0.01 * gamma * last) + 1e-3
    np.testing.assert_allclose(
        optimizer.preconditioner(by_path["scale/scale"]).numpy(), expected, rtol=1e-12
    )
    assert optimizer._pairing is None


# ----------------------------------------------------------- options & checks
def test_normalized_ema_keeps_factors_in_the_unit_interval():
    keras.config.set_floatx("float64")
    model = _build("functional")
    optimizer = AdaFisher(update_freq=1, normalized_ema=True)
    _train(model, optimizer, steps=6)
    for variable in model.trainable_variables:
        h, s = optimizer.fisher_factors(variable)
        assert (
            0.0 <= np.min(h)
            and np.max(h) <= 1.0
            and 0.0 <= np.min(s) <= np.max(s) <= 1.0
        )
    spread = [
        np.ptp(optimizer.preconditioner(v).numpy()) for v in model.trainable_variables
    ]
    assert max(spread) > 0.1  # far from the official ~damping-constant preconditioner


@pytest.mark.parametrize(
    "argument, value",
    [
        ("learning_rate", -1.0),
        ("beta", 1.0),
        ("beta", -0.1),
        ("damping", 0.0),
        ("gamma", 1.0),
        ("gamma", float("nan")),
        ("update_freq", 0),
        ("update_freq", 2.5),
        ("weight_decay", -1e-4),
        ("normalized_ema", "yes"),
    ],
)
@pytest.mark.parametrize("cls", [AdaFisher, AdaFisherW])
def test_bad_arguments_raise_value_error_naming_them(cls, argument, value):
    with pytest.raises(ValueError, match=argument):
        cls(**{argument: value})


@pytest.mark.parametrize("cls", [AdaFisher, AdaFisherW])
def test_config_round_trip_and_no_keras_weight_decay(cls):
    optimizer = cls(
        learning_rate=0.01,
        beta=0.8,
        damping=2e-3,
        gamma=0.5,
        update_freq=7,
        weight_decay=1e-2,
    )
    clone = cls.from_config(optimizer.get_config())
    for key in (
        "beta",
        "damping",
        "gamma",
        "update_freq",
        "weight_decay",
        "normalized_ema",
    ):
        assert getattr(clone, key) == getattr(optimizer, key)
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(restored) is cls


def test_plain_keras_model_fails_with_instructions():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=AdaFisher(), loss="mse")
    with pytest.raises(RuntimeError, match="tfcurv.attach"):
        model.fit(np.zeros((4, 2)), np.zeros((4, 1)), verbose=0)
