"""Hessian eigenpairs and layer-vs-network comparison on the quadratic problem."""

import keras
import numpy as np
import pytest

from tfcurv.analysis import Eigenpairs, compare_layers, hessian_eigenpairs, localisation


def _same_directions(a, b, atol):
    np.testing.assert_allclose(np.abs(np.sum(a * b, axis=1)), 1.0, atol=atol)


@pytest.mark.parametrize("compiled_loss", ["object", "name"])
def test_exact_eigenpairs_match_the_known_hessian(quadratic, compiled_loss):
    model = quadratic.model()
    if compiled_loss == "name":
        model.compile(optimizer="sgd", loss="mse")
    result = hessian_eigenpairs(model, None, quadratic.data, top_n=None)

    values, vectors = quadratic.eigh()
    assert result.exact
    np.testing.assert_allclose(result.values, values, rtol=1e-10, atol=1e-12)
    _same_directions(result.vectors, vectors, atol=1e-9)
    assert result.shapes == [(3, 1), (1,), (2, 1), (1,)]


def test_lanczos_eigenpairs_match_the_known_hessian(quadratic):
    model = quadratic.model()
    result = hessian_eigenpairs(
        model,
        keras.losses.MeanSquaredError(),
        quadratic.data,
        top_n=3,
        dense_max_size=1,
        tol=1e-12,
    )

    values, vectors = quadratic.eigh()
    assert not result.exact
    np.testing.assert_allclose(result.values, values[:3], rtol=1e-8)
    _same_directions(result.vectors, vectors[:3], atol=1e-6)


def test_restriction_to_one_layer_is_the_hessian_block(quadratic):
    model = quadratic.model()
    result = hessian_eigenpairs(
        model, None, quadratic.data, variables=["b"], top_n=None
    )
    values, vectors = quadratic.eigh(quadratic.layer_slices["b"])
    np.testing.assert_allclose(result.values, values, rtol=1e-10, atol=1e-12)
    _same_directions(result.vectors, vectors, atol=1e-9)
    assert list(result.variable_names) == [
        v.path for v in model.get_layer("b").trainable_variables
    ]


def test_compare_layers_against_numpy(quadratic):
    model = quadratic.model()
    comparison = compare_layers(
        model, None, quadratic.data, variables=["a", "b"], top_n=3
    )

    values, vectors = quadratic.eigh()
    np.testing.assert_allclose(comparison.network_values, values[:3], rtol=1e-10)
    np.testing.assert_allclose(
        comparison.localisation,
        localisation(
            vectors[:3], [(4,), (3,)]
        ),  # the layers: a = kernel+bias, b = kernel+bias
        atol=1e-9,
    )
    for row, block in enumerate(quadratic.layer_slices.values()):
        layer_values, layer_vectors = quadratic.eigh(block)
        np.testing.assert_allclose(
            comparison.layer_values[row], layer_values[:3], rtol=1e-10
        )
        network_slice = vectors[:3, block]
        expected = np.abs(network_slice @ layer_vectors[0]) / np.linalg.norm(
            network_slice, axis=1
        )
        np.testing.assert_allclose(comparison.top_overlap[row], expected, atol=1e-8)


def test_compare_layers_pads_small_variables_with_nan(quadratic):
    model = quadratic.model()
    comparison = compare_layers(
        model, None, quadratic.data, top_n=2
    )  # biases have one entry
    assert comparison.layer_values.shape == (4, 2)
    np.testing.assert_allclose(
        comparison.layer_values[1], [quadratic.hessian[3, 3], np.nan]
    )
    np.testing.assert_allclose(comparison.localisation.sum(axis=1), 1.0)


def test_eigenpairs_orderings_slices_and_npz(quadratic, tmp_path):
    model = quadratic.model()
    result = hessian_eigenpairs(model, None, quadratic.data, top_n=None)
    magnitude = result.by_magnitude()
    assert np.all(np.diff(np.abs(magnitude.values)) <= 0)
    np.testing.assert_array_equal(
        result.restricted_to("b/kernel"), result.vectors[:, 4:6]
    )

    result.save(tmp_path / "pairs.npz")
    loaded = Eigenpairs.load(tmp_path / "pairs.npz")
    assert loaded.exact is True and loaded.shapes == result.shapes
    np.testing.assert_array_equal(loaded.vectors, result.vectors)


def test_bad_arguments(quadratic):
    model = quadratic.model()
    with pytest.raises(ValueError, match="top_n"):
        hessian_eigenpairs(model, None, quadratic.data, top_n=8)
    with pytest.raises(ValueError, match="dense_max_size"):
        hessian_eigenpairs(model, None, quadratic.data, top_n=None, dense_max_size=2)
    uncompiled = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="not compiled with a loss"):
        hessian_eigenpairs(uncompiled, None, (quadratic.x1, quadratic.y))


def test_eigenvectors_use_the_c_order_flattening_of_the_kernel():
    """Two outputs under MSE: H = kron(X^T X, I_2) / n in C order (kron(I_2, X^T X) in F order).

    ``weight_alignment`` and the overlaps rely on this layout matching ``kernel.ravel()``.
    """
    keras.config.set_floatx("float64")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 3)) * [3.0, 1.0, 0.3]
    y = rng.standard_normal((30, 2))
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, use_bias=False)])
    pairs = hessian_eigenpairs(
        model, keras.losses.MeanSquaredError(), (x, y), top_n=None
    )
    expected = (
        np.kron(x.T @ x, np.eye(2)) / 30
    )  # mean over 2 outputs and 30 examples, times 2
    reconstructed = pairs.vectors.T @ np.diag(pairs.values) @ pairs.vectors
    np.testing.assert_allclose(reconstructed, expected, atol=1e-10)
