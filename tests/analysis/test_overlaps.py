"""Overlaps, extended singular vectors, alignment and localisation on known answers."""

import numpy as np
import pytest

from tfcurv.analysis.overlaps import (
    SingularDirections,
    as_rows,
    best_overlap,
    extended_singular_vectors,
    localisation,
    matrix_view_shape,
    overlap_matrix,
    weight_alignment,
)


def _orthonormal(rng, rows, cols):
    q, _ = np.linalg.qr(rng.standard_normal((rows, cols)))
    return q


def test_overlap_matrix_of_orthonormal_sets_is_a_permutation():
    rng = np.random.default_rng(0)
    basis = _orthonormal(rng, 8, 8).T
    shuffled = -3.0 * basis[[2, 0, 1]]  # scaled and flipped: overlaps ignore both
    overlaps = overlap_matrix(shuffled, basis)
    expected = np.zeros((3, 8))
    expected[[0, 1, 2], [2, 0, 1]] = 1.0
    np.testing.assert_allclose(overlaps, expected, atol=1e-12)


def test_best_overlap_finds_the_closest_direction():
    rng = np.random.default_rng(1)
    basis = _orthonormal(rng, 6, 6).T
    target = 0.6 * basis[4] + 0.8 * basis[1]
    value, index = best_overlap(basis, target)
    assert index == 1 and value == pytest.approx(0.8)


def test_extended_singular_vectors_of_a_matrix_with_known_svd():
    rng = np.random.default_rng(2)
    u, v = _orthonormal(rng, 5, 3), _orthonormal(rng, 4, 3)
    singular_values = np.array([3.0, 2.0, 0.5])
    kernel = u @ np.diag(singular_values) @ v.T

    result = extended_singular_vectors(kernel)

    assert len(result.singular_values) == 4  # min(5, 4); the planted rank is 3
    np.testing.assert_allclose(result.singular_values[:3], singular_values, rtol=1e-12)
    assert result.singular_values[3] < 1e-12
    for j in range(3):  # sign-free: u_j v_j^T is unchanged when both flip
        np.testing.assert_allclose(
            result.vectors[j], np.outer(u[:, j], v[:, j]).ravel(), atol=1e-12
        )
    np.testing.assert_allclose(np.linalg.norm(result.vectors, axis=1), 1.0)
    np.testing.assert_allclose(
        result.singular_values @ result.vectors, kernel.ravel(), atol=1e-12
    )


def test_conv_kernel_is_read_as_spatial_by_channel_matrix():
    """(k_h, k_w, C_in, C_out) -> (k_h k_w, C_in C_out), keeping the kernel's C order."""
    rng = np.random.default_rng(3)
    assert matrix_view_shape((3, 3, 2, 4)) == (9, 8)
    assert matrix_view_shape((5, 2, 6)) == (5, 12)
    u, v = _orthonormal(rng, 9, 2), _orthonormal(rng, 8, 2)
    matrix = u @ np.diag([4.0, 1.0]) @ v.T
    kernel = matrix.reshape(3, 3, 2, 4)

    result = extended_singular_vectors(kernel, top_n=2)

    np.testing.assert_allclose(result.singular_values, [4.0, 1.0], rtol=1e-12)
    np.testing.assert_array_equal(result.matrix_shape, [9, 8])
    np.testing.assert_allclose(
        result.vectors[0].reshape(3, 3, 2, 4),
        np.outer(u[:, 0], v[:, 0]).reshape(3, 3, 2, 4),
        atol=1e-12,
    )


def test_weight_alignment_of_a_weight_built_from_eigenvectors():
    rng = np.random.default_rng(4)
    eigenvectors = _orthonormal(rng, 6, 3).T
    weights = (3.0 * eigenvectors[0] + 4.0 * eigenvectors[1]).reshape(2, 3)
    np.testing.assert_allclose(
        weight_alignment(weights, eigenvectors), [0.6, 0.8, 0.0], atol=1e-12
    )


def test_localisation_splits_the_squared_norm_by_variable():
    shapes = [(2, 2), (2,), (3,)]
    vector = [
        np.array([[1.0, 0.0], [0.0, 1.0]]),
        np.array([0.0, 0.0]),
        np.array([2.0, 0.0, 0.0]),
    ]
    second = [np.zeros((2, 2)), np.array([0.0, 1.0]), np.zeros(3)]
    shares = localisation([vector, second], shapes)
    np.testing.assert_allclose(shares, [[2 / 6, 0.0, 4 / 6], [0.0, 1.0, 0.0]])


def test_as_rows_flattens_eigenvectors_per_variable_in_c_order():
    eigenvector = [np.arange(6.0).reshape(2, 3), np.array([6.0, 7.0])]
    np.testing.assert_array_equal(as_rows([eigenvector]), [np.arange(8.0)])


def test_singular_directions_round_trip(tmp_path):
    result = extended_singular_vectors(np.arange(12.0).reshape(3, 4))
    result.save(tmp_path / "svd.npz")
    loaded = SingularDirections.load(tmp_path / "svd.npz")
    np.testing.assert_array_equal(loaded.vectors, result.vectors)


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: overlap_matrix(np.ones((2, 3)), np.ones((2, 4))),
            "same number of parameters",
        ),
        (lambda: overlap_matrix(np.zeros((1, 3)), np.ones((1, 3))), "zero vector"),
        (lambda: extended_singular_vectors(np.ones(4)), "at least 2 dimensions"),
        (lambda: extended_singular_vectors(np.ones((2, 3)), top_n=3), "top_n"),
        (lambda: weight_alignment(np.zeros(3), np.eye(3)), "zero vector"),
        (lambda: weight_alignment(np.ones(4), np.eye(3)), "parameters"),
        (lambda: localisation(np.ones((1, 5)), [(2,), (2,)]), "total 4 parameters"),
    ],
)
def test_bad_input_is_rejected(call, message):
    with pytest.raises(ValueError, match=message):
        call()
