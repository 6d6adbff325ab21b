"""Rebuilding a layer from its first i directions, against numpy."""

import keras
import numpy as np
import pytest

from tfcurv.analysis import ReconstructionCurve, projected_weights, reconstruction_curve


def _orthonormal(rng, rows, cols):
    q, _ = np.linalg.qr(rng.standard_normal((rows, cols)))
    return q.T


def test_projected_weights_are_partial_sums_of_projections():
    rng = np.random.default_rng(0)
    directions = _orthonormal(rng, 5, 5)
    weights = rng.standard_normal(5)
    rebuilt = projected_weights(weights, directions, [0, 2, 5])
    np.testing.assert_array_equal(rebuilt[0], 0.0)
    np.testing.assert_allclose(
        rebuilt[1], directions[:2].T @ (directions[:2] @ weights)
    )
    np.testing.assert_allclose(rebuilt[2], weights, atol=1e-12)


def test_quadratic_loss_along_the_reconstruction(quadratic):
    model = quadratic.model()
    kernel = model.get_layer("a").kernel
    before = kernel.numpy().copy()
    _, block_vectors = quadratic.eigh(slice(0, 3))  # eigenvectors of the kernel block

    curve = reconstruction_curve(
        model, "a/kernel", block_vectors, quadratic.data, counts=[0, 1, 3]
    )

    np.testing.assert_array_equal(kernel.numpy(), before)  # restored
    bias_a = model.get_layer("a").bias.numpy()
    other = (
        quadratic.x2 @ model.get_layer("b").kernel.numpy()
        + model.get_layer("b").bias.numpy()
    )
    for count, loss in zip(curve.counts, curve.loss):
        rebuilt = projected_weights(before, block_vectors, [count])[0].reshape(3, 1)
        prediction = quadratic.x1 @ rebuilt + bias_a + other
        assert loss == pytest.approx(
            np.mean((prediction - quadratic.y) ** 2), rel=1e-10
        )
    assert curve.loss[-1] == pytest.approx(curve.original_loss, rel=1e-10)
    assert np.all(np.isnan(curve.accuracy))  # no accuracy metric compiled


def test_accuracy_of_a_rebuilt_softmax_classifier():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((60, 4)).astype("float32")
    y = rng.integers(0, 3, 60)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3, activation="softmax", name="out")]
    )
    model.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(), metrics=["accuracy"]
    )
    directions = _orthonormal(rng, 12, 12)
    kernel, bias = (v.numpy() for v in model.get_layer("out").trainable_variables)

    curve = reconstruction_curve(
        model, "out/kernel", directions, (x, y), counts=[4, 8, 12]
    )

    for count, accuracy in zip(curve.counts, curve.accuracy):
        rebuilt = projected_weights(kernel, directions, [count])[0].reshape(4, 3)
        expected = np.mean(np.argmax(x @ rebuilt + bias, axis=1) == y)
        assert accuracy == pytest.approx(expected, abs=1e-6)
    assert curve.original_accuracy == pytest.approx(curve.accuracy[-1], abs=1e-6)


def test_weights_are_restored_when_evaluation_fails(quadratic, tmp_path):
    model = quadratic.model()
    kernel = model.get_layer("a").kernel
    before = kernel.numpy().copy()
    with pytest.raises(Exception):  # noqa: B017 - whatever Keras raises for bad data
        reconstruction_curve(
            model, "a/kernel", np.eye(3), ([quadratic.x1], quadratic.y)
        )
    np.testing.assert_array_equal(kernel.numpy(), before)


def test_curve_round_trips_through_npz(quadratic, tmp_path):
    curve = reconstruction_curve(
        quadratic.model(), "b/kernel", np.eye(2), quadratic.data
    )
    curve.save(tmp_path / "curve.npz")
    loaded = ReconstructionCurve.load(tmp_path / "curve.npz")
    np.testing.assert_array_equal(loaded.counts, [0, 1, 2])
    np.testing.assert_array_equal(loaded.loss, curve.loss)


@pytest.mark.parametrize(
    "directions, counts, message",
    [
        (np.ones((2, 3)), [1], "orthonormal"),
        (np.eye(3), [4], "counts"),
        (np.eye(3), [], "counts"),
        (np.eye(4), [1], "parameters"),
    ],
)
def test_bad_arguments(directions, counts, message):
    with pytest.raises(ValueError, match=message):
        projected_weights(np.ones(3), directions, counts)


def test_uncompiled_model_is_rejected():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="compiled"):
        reconstruction_curve(
            model, model.layers[0].kernel, np.eye(2), (np.ones((1, 2)), np.ones((1, 1)))
        )
