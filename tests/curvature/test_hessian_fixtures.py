"""tfcurv.Hessian / GaussNewton against the PyTorch float64 references (README §4.2).

Models in float64 at their initial weights, BatchNormalization in training mode,
batch = the fixture's ``x, y``, mean sparse softmax cross-entropy from logits.
"""

import numpy as np
import pytest
from reference_fixtures import assert_close_to_reference

from tfcurv import GaussNewton, Hessian

pytestmark = pytest.mark.fixtures


def _relative_error(actual, expected):
    return np.max(np.abs(actual - expected)) / np.max(np.abs(expected))


def _as_flat(products):
    return np.concatenate([np.asarray(p).ravel() for p in products])


def _split(flat, shapes):
    sizes = np.cumsum([int(np.prod(s)) for s in shapes])[:-1]
    return [piece.reshape(s) for piece, s in zip(np.split(flat, sizes), shapes)]


@pytest.mark.parametrize(
    "kind, key", [(Hessian, "probe_HV"), (GaussNewton, "probe_GNV")]
)
def test_vector_products_match_reference(reference, kind, key):
    operator = reference.operator(kind)
    shapes = [v.shape for v in reference.model.trainable_variables]
    probes = reference.arrays["probe_V"]
    for column in range(probes.shape[1]):
        product = _as_flat(operator.vp(_split(probes[:, column], shapes)))
        expected = reference.arrays[key][:, column]
        assert _relative_error(product, expected) <= 1e-8, (key, column)


def test_dense_hessian_matches_reference(make_reference):
    reference = make_reference("bn_cnn")
    dense = reference.operator(Hessian).dense()
    assert _relative_error(dense, reference.arrays["hess"]) <= 1e-8
    assert np.max(np.abs(dense - dense.T)) <= 1e-12 * np.max(np.abs(dense))


@pytest.mark.parametrize("name", ["mlp_tanh", "ln_mlp"])
def test_dense_blocks_restricted_to_one_variable(make_reference, name):
    reference = make_reference(name)
    variables = reference.model.trainable_variables
    blocks = [k for k in reference.arrays if k.startswith("hessblock_")]
    assert blocks
    for key in blocks:
        index = int(key.split("_")[1])
        for kind, prefix in ((Hessian, "hessblock_"), (GaussNewton, "gnblock_")):
            block = reference.operator(kind, variables=[variables[index]]).dense()
            expected = reference.arrays[f"{prefix}{index:02d}"]
            assert _relative_error(block, expected) <= 1e-8, (prefix, index)


@pytest.mark.parametrize(
    "kind, key", [(Hessian, "hess_diag"), (GaussNewton, "gn_diag")]
)
def test_exact_diagonal_matches_reference(reference, kind, key):
    diagonal = reference.operator(kind).diagonal("exact")
    assert _relative_error(diagonal, reference.arrays[key]) <= 1e-8
    # trace("exact") is the sum of this diagonal.
    trace_key = key.replace("diag", "trace")
    assert_close_to_reference(diagonal.sum(), reference.arrays[trace_key], trace_key, rtol=1e-8)


def test_lanczos_top_and_bottom_eigenvalues_match_reference(reference):
    hessian = reference.operator(Hessian)
    spectrum = reference.arrays["hess_eigvals"]  # ascending
    values, vectors = hessian.eigenvalues(top_n=3, method="lanczos", tol=1e-8)
    np.testing.assert_allclose(values, spectrum[::-1][:3], rtol=1e-6)
    bottom, _ = hessian.negated().eigenvalues(top_n=1, tol=1e-8)
    np.testing.assert_allclose(-bottom, spectrum[:1], rtol=1e-6)
    # Eigenvectors: unit norm, and H u = lambda u.
    for value, vector in zip(values, vectors):
        flat = _as_flat(vector)
        assert abs(np.linalg.norm(flat) - 1) <= 1e-10
        residual = _as_flat(hessian.vp(vector)) - value * flat
        assert np.linalg.norm(residual) <= 1e-5 * abs(values[0])


def test_power_iteration_matches_top_magnitude_eigenvalues(make_reference):
    reference = make_reference("mlp_tanh")
    values, _ = reference.operator(Hessian).eigenvalues(
        top_n=2, method="power", tol=1e-10
    )
    np.testing.assert_allclose(
        values, reference.arrays["hess_top_eigvals"][:2], rtol=1e-6
    )


def test_gauss_newton_top_eigenvalue_matches_reference(make_reference):
    reference = make_reference("ln_mlp")
    values, _ = reference.operator(GaussNewton).eigenvalues(top_n=1, tol=1e-8)
    np.testing.assert_allclose(values[0], reference.arrays["gn_eigvals"][-1], rtol=1e-6)
