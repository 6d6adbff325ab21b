"""Tests of ``tfcurv.curvature.layer_capture``."""

import threading

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfcurv.curvature.layer_capture import capture_layer_statistics
from tfcurv.curvature.layers import matching_layers

SUPPORTED = (
    keras.layers.Dense,
    keras.layers.Conv2D,
    keras.layers.BatchNormalization,
    keras.layers.LayerNormalization,
)


def _image_layers():
    return [
        keras.layers.Conv2D(3, 3, activation="relu", name="conv"),
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.Flatten(name="flat"),
        keras.layers.Dense(5, activation="tanh", name="fc1"),
        keras.layers.LayerNormalization(name="ln"),
        keras.layers.Dense(2, name="fc2"),
    ]


def _sequential():
    return keras.Sequential([keras.Input((6, 6, 2))] + _image_layers())


def _functional():
    inputs = keras.Input((6, 6, 2))
    x = inputs
    for layer in _image_layers():
        x = layer(x)
    return keras.Model(inputs, x)


class _Block(keras.layers.Layer):
    """A custom layer holding supported layers (found only by a recursive walk)."""

    def __init__(self):
        super().__init__(name="block")
        self.parts = [
            keras.layers.Dense(5, activation="tanh", name="fc1"),
            keras.layers.LayerNormalization(name="ln"),
        ]

    def call(self, x):
        for part in self.parts:
            x = part(x)
        return x


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.features = keras.Sequential(
            [
                keras.layers.Conv2D(3, 3, activation="relu", name="conv"),
                keras.layers.BatchNormalization(name="bn"),
                keras.layers.Flatten(name="flat"),
            ]
        )
        self.block = _Block()
        self.head = keras.layers.Dense(2, name="fc2")

    def call(self, x, training=None):
        return self.head(self.block(self.features(x, training=training)))


def _subclassed():
    model = _Subclassed()
    model(np.zeros((1, 6, 6, 2), "float32"))
    return model


MODEL_STYLES = {
    "sequential": _sequential,
    "functional": _functional,
    "subclassed": _subclassed,
}


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(4, 6, 6, 2)).astype("float32")


def _pre_activation(layer, inputs):
    """The layer's output without its activation, computed from its weights."""
    if isinstance(layer, keras.layers.Dense):
        return inputs @ layer.kernel.numpy() + layer.bias.numpy()
    if isinstance(layer, keras.layers.Conv2D):
        out = tf.nn.conv2d(inputs, layer.kernel.numpy(), 1, "VALID").numpy()
        return out + layer.bias.numpy()
    return None


@pytest.mark.parametrize("style", sorted(MODEL_STYLES))
def test_records_inputs_and_pre_activations_in_every_model_style(style):
    model = MODEL_STYLES[style]()
    x = _data()
    expected_output = model(x, training=True).numpy()
    with capture_layer_statistics(model, SUPPORTED) as records:
        output = model(x, training=True)
    np.testing.assert_allclose(output.numpy(), expected_output, rtol=1e-6)
    assert [r.layer.name for r in records] == ["conv", "bn", "fc1", "ln", "fc2"]
    assert [type(r.layer) for r in records] == [
        keras.layers.Conv2D,
        keras.layers.BatchNormalization,
        keras.layers.Dense,
        keras.layers.LayerNormalization,
        keras.layers.Dense,
    ]
    np.testing.assert_array_equal(records[0].inputs.numpy(), x)
    for record in records:
        expected = _pre_activation(record.layer, record.inputs.numpy())
        if expected is not None:
            np.testing.assert_allclose(
                record.outputs.numpy(), expected, rtol=1e-5, atol=1e-6
            )
    # The next layer's input is the activated output.
    np.testing.assert_allclose(
        records[0].outputs.numpy().clip(min=0), tf.nn.relu(records[0].outputs).numpy()
    )
    np.testing.assert_allclose(
        records[3].inputs.numpy(), np.tanh(records[2].outputs.numpy()), rtol=1e-6
    )
    _assert_restored(model)


def _assert_restored(model):
    for layer in matching_layers(model, SUPPORTED):
        assert "call" not in layer.__dict__
    activations = {
        layer.name: getattr(layer, "activation", None)
        for layer in matching_layers(model, SUPPORTED)
    }
    assert activations["conv"] is keras.activations.relu
    assert activations["fc1"] is keras.activations.tanh
    assert activations["fc2"] is keras.activations.linear


@pytest.mark.parametrize("compiled", [False, True])
def test_output_gradients_are_taken_before_the_fused_activation(compiled):
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, activation="tanh", name="fc1"),
            keras.layers.Dense(1, name="fc2"),
        ]
    )
    x = np.random.default_rng(1).normal(size=(5, 3)).astype("float32")

    def step(x):
        with (
            capture_layer_statistics(model, (keras.layers.Dense,)) as records,
            tf.GradientTape() as tape,
        ):
            loss = tf.reduce_sum(model(x) ** 2)
        grads = tape.gradient(loss, [r.outputs for r in records])
        return grads, [r.inputs for r in records], [r.outputs for r in records]

    run = tf.function(step) if compiled else step
    (g1, g2), (x1, x2), (z1, _) = run(tf.constant(x))
    kernel2 = model.layers[1].kernel.numpy()
    z1_expected = x @ model.layers[0].kernel.numpy() + model.layers[0].bias.numpy()
    np.testing.assert_allclose(z1.numpy(), z1_expected, rtol=1e-5)
    y = np.tanh(z1_expected) @ kernel2 + model.layers[1].bias.numpy()
    np.testing.assert_allclose(g2.numpy(), 2 * y, rtol=1e-5)
    # d loss / d z1 = (d loss / d y) W2^T * tanh'(z1): the derivative of tanh is included.
    expected_g1 = (2 * y) @ kernel2.T * (1 - np.tanh(z1_expected) ** 2)
    np.testing.assert_allclose(g1.numpy(), expected_g1, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(x2.numpy(), np.tanh(z1_expected), rtol=1e-5)
    np.testing.assert_array_equal(x1.numpy(), x)
    assert model.layers[0].activation is keras.activations.tanh


def test_restored_when_the_forward_pass_raises():
    model = _functional()
    x = _data()
    with (
        pytest.raises(RuntimeError, match="boom"),
        capture_layer_statistics(model, SUPPORTED) as records,
    ):
        model(x)
        raise RuntimeError("boom")
    assert len(records) == 5
    _assert_restored(model)
    model(x)  # still usable


def test_shared_layer_gives_one_record_per_call_in_call_order():
    shared = keras.layers.Dense(3, activation="tanh", name="shared")
    inputs = keras.Input((3,))
    model = keras.Model(inputs, shared(shared(inputs)))
    x = np.random.default_rng(0).normal(size=(2, 3)).astype("float32")
    with capture_layer_statistics(model, (keras.layers.Dense,)) as records:
        y = model(x)
    assert [r.layer for r in records] == [shared, shared]
    first, second = records
    kernel, bias = np.asarray(shared.kernel), np.asarray(shared.bias)
    np.testing.assert_allclose(first.inputs, x)
    np.testing.assert_allclose(first.outputs, x @ kernel + bias, rtol=1e-5)
    np.testing.assert_allclose(first.activated, np.tanh(first.outputs), rtol=1e-5)
    np.testing.assert_allclose(second.inputs, first.activated, rtol=1e-6)
    np.testing.assert_allclose(second.activated, y, rtol=1e-6)
    assert first.activation is not None
    assert "call" not in shared.__dict__


def test_activation_layers_are_captured_unchanged():
    """An ``Activation`` layer's own ``activation`` is its whole call: kept on."""
    layer = keras.layers.Activation("tanh")
    model = keras.Sequential([keras.Input((3,)), layer])
    x = np.ones((2, 3), "float32")
    with capture_layer_statistics(model, (keras.layers.Activation,)) as records:
        y = model(x)
    np.testing.assert_allclose(y, np.tanh(x), rtol=1e-6)
    assert records[0].activation is None and records[0].outputs is records[0].activated


def test_layers_outside_the_types_and_unused_layers_are_not_recorded():
    model = _functional()
    with capture_layer_statistics(model, (keras.layers.LayerNormalization,)) as records:
        model(_data())
    assert [r.layer.name for r in records] == ["ln"]
    with capture_layer_statistics(model, SUPPORTED) as records:
        pass
    assert records == []


def test_bad_layer_types_are_rejected():
    with (
        pytest.raises(ValueError, match="layer_types"),
        capture_layer_statistics(_functional(), [keras.layers.Dense]),
    ):
        pass
    with (
        pytest.raises(ValueError, match="layer_types"),
        capture_layer_statistics(_functional(), (int,)),
    ):
        pass


def test_threads_capturing_the_same_model_see_their_own_tensors():
    model = keras.Sequential(
        [keras.Input((2,)), keras.layers.Dense(2, activation="relu")]
    )
    barrier = threading.Barrier(2)
    results, errors = {}, []

    def replica(value):
        try:
            with capture_layer_statistics(model, (keras.layers.Dense,)) as records:
                barrier.wait()  # both threads have the patches installed
                model(np.full((1, 2), value, "float32"))
                barrier.wait()
            results[value] = records[0].inputs.numpy()
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=replica, args=(v,)) for v in (1.0, 2.0)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    np.testing.assert_array_equal(results[1.0], [[1.0, 1.0]])
    np.testing.assert_array_equal(results[2.0], [[2.0, 2.0]])
    _assert_single_dense_restored(model)


def _assert_single_dense_restored(model):
    layer = model.layers[0]
    assert "call" not in layer.__dict__
    assert layer.activation is keras.activations.relu


def test_mirrored_replicas_record_their_own_batch_shard(two_replica_strategy):
    strategy = two_replica_strategy
    with strategy.scope():
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    dataset = tf.data.Dataset.from_tensor_slices(
        np.arange(8, dtype="float32").reshape(4, 2)
    )
    batch = next(iter(strategy.experimental_distribute_dataset(dataset.batch(4))))

    @tf.function
    def step(x):
        def replica_fn(x):
            with capture_layer_statistics(model, (keras.layers.Dense,)) as records:
                model(x)
            return records[0].inputs

        return strategy.run(replica_fn, (x,))

    shards = strategy.experimental_local_results(step(batch))
    np.testing.assert_array_equal(shards[0].numpy(), [[0, 1], [2, 3]])
    np.testing.assert_array_equal(shards[1].numpy(), [[4, 5], [6, 7]])


def test_recursive_layer_listing_still_needs_the_private_walk():
    """`Model.layers` does not reach layers held by custom layers; the private
    `_flatten_layers` used by `matching_layers` does."""
    model = _subclassed()
    public = [layer.name for layer in model.layers]
    assert "fc1" not in public
    found = [layer.name for layer in matching_layers(model, SUPPORTED)]
    assert sorted(found) == ["bn", "conv", "fc1", "fc2", "ln"]
