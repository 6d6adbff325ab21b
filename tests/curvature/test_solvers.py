"""Eigen-solvers, quadrature, linear solves, SciPy operators and progress of the
curvature operators, each against a dense reference."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy.sparse import linalg as scipy_linalg

from tfcurv import GaussNewton, Hessian
from tfcurv.curvature import lanczos as lanczos_lib
from tfcurv.curvature import vectors as vec


def _symmetric(size, eigenvalues, seed=0):
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((size, size)))
    return (basis * eigenvalues) @ basis.T


def _counting(matrix):
    constant = tf.constant(matrix)
    calls = []

    def matvec(v):
        calls.append(1)
        return tf.linalg.matvec(constant, v)

    return matvec, calls


def _mlp():
    keras.config.set_floatx("float64")
    keras.utils.set_random_seed(1)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(5, activation="tanh"),
            keras.layers.Dense(3),
        ]
    )


def _data(count=12, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((count, 6)), rng.integers(0, 3, count)


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _flat(vectors):
    return np.concatenate([np.asarray(v).ravel() for v in vectors])


# -- thick-restart Lanczos ----------------------------------------------------------


@pytest.mark.parametrize("basis_size", [8, 12, None])
def test_restarted_lanczos_finds_the_top_eigenpairs_with_a_small_basis(basis_size):
    # A slowly decaying spectrum with a close pair at the top: a basis of 8
    # vectors has to restart many times before the three largest converge.
    rng = np.random.default_rng(1)
    eigenvalues = np.concatenate([[10.0, 9.9, 9.0], rng.uniform(-2.0, 8.0, 397)])
    matrix = _symmetric(400, eigenvalues)
    matvec, calls = _counting(matrix)
    values, vectors, products = lanczos_lib.top_eigenpairs(
        matvec, 400, tf.float64, 3, 1e-10, 2000, 0, basis_size
    )
    np.testing.assert_allclose(values, [10.0, 9.9, 9.0], rtol=1e-9)
    assert products == len(calls)
    if basis_size is not None:
        assert products > basis_size  # it did restart
    vectors = vectors.numpy()
    residuals = np.linalg.norm(vectors @ matrix - values[:, None] * vectors, axis=1)
    assert np.max(residuals) <= 1e-8 * 10.0
    np.testing.assert_allclose(vectors @ vectors.T, np.eye(3), atol=1e-10)


def test_restarted_lanczos_stops_at_max_iter():
    matrix = _symmetric(200, np.linspace(0.0, 1.0, 200))
    matvec, calls = _counting(matrix)
    _, _, products = lanczos_lib.top_eigenpairs(
        matvec, 200, tf.float64, 2, 1e-14, 30, 0, 10
    )
    assert products == len(calls) == 30


def test_float32_operator_gets_a_float64_recurrence():
    # The same matrix rounded to float32: the recurrence in float64 reaches the
    # float32 matrix's own top eigenvalue far below float32's 1e-7 resolution of
    # the Lanczos coefficients.
    rng = np.random.default_rng(2)
    eigenvalues = np.concatenate([[5.0, 4.0], rng.uniform(0.0, 3.0, 298)])
    matrix = _symmetric(300, eigenvalues).astype(np.float32)
    exact = np.linalg.eigvalsh(matrix.astype(np.float64))[::-1][:2]
    constant = tf.constant(matrix)
    values, vectors, _ = lanczos_lib.top_eigenpairs(
        lambda v: tf.linalg.matvec(constant, v), 300, tf.float32, 2, 1e-9, 500, 0
    )
    assert vectors.dtype == tf.float32
    np.testing.assert_allclose(values, exact, rtol=1e-7)


# -- quadrature ---------------------------------------------------------------------


def test_quadrature_without_reorthogonalisation_reproduces_the_moments():
    # Gauss quadrature with k nodes is exact for polynomials of degree <= 2k - 1:
    # sum_j w_j theta_j^m = v^T A^m v / |v|^2. Finite precision without
    # re-orthogonalisation keeps this (Knizhnerman 1996), after the basis has
    # lost orthogonality (k = 40 on a spectrum with well-separated top values).
    rng = np.random.default_rng(3)
    eigenvalues = np.concatenate([[1.0, 0.95, 0.9], rng.uniform(0.0, 0.5, 297)])
    matrix = _symmetric(300, eigenvalues)
    start = vec.random_flat(300, vec.seed_pair(7), tf.float64)
    v = start.numpy() / np.linalg.norm(start.numpy())
    for reorthogonalize in (False, True):
        alphas, betas = lanczos_lib.lanczos_tridiagonal(
            lambda q: tf.linalg.matvec(tf.constant(matrix), q), start, 40,
            reorthogonalize,
        )  # fmt: skip
        nodes, vectors = lanczos_lib.tridiagonal_eigh(alphas, betas)
        weights = vectors[0] ** 2
        power = v.copy()
        for degree in range(0, 2 * 40):
            moment = v @ power
            np.testing.assert_allclose(
                weights @ nodes**degree, moment, rtol=1e-9, atol=1e-13
            )
            power = matrix @ power


def test_density_without_reorthogonalisation_matches_the_stored_basis_on_an_mlp():
    model = _mlp()
    hessian = Hessian(model, _loss(), _data())
    plain = hessian.density(num_iter=15, num_runs=2, seed=4)
    stored = hessian.density(num_iter=15, num_runs=2, seed=4, reorthogonalize=True)
    # Same quadrature while the basis is still orthogonal to working precision.
    np.testing.assert_allclose(plain.nodes, stored.nodes, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(plain.weights, stored.weights, atol=1e-8)


# -- linear solves and SciPy ---------------------------------------------------------


def test_solve_by_conjugate_gradients_matches_a_dense_solve():
    model = _mlp()
    gauss_newton = GaussNewton(model, _loss(), _data())
    dense = gauss_newton.dense()
    rng = np.random.default_rng(5)
    b = [rng.standard_normal(v.shape) for v in gauss_newton.variables]
    result = gauss_newton.solve(b, damping=1e-2, tol=1e-10)
    expected = np.linalg.solve(dense + 1e-2 * np.eye(len(dense)), _flat(b))
    assert result.converged and result.stop_reason == "converged"
    assert result.relative_residual <= 1e-10
    np.testing.assert_allclose(_flat(result.x), expected, rtol=1e-7)
    assert [x.shape for x in result.x] == gauss_newton.shapes
    assert result.iterations == len(result.residual_history) - 1
    assert result.residual_history[0] == 1.0


def test_solve_stops_at_max_iter_and_on_negative_curvature():
    model = _mlp()
    gauss_newton = GaussNewton(model, _loss(), _data())
    b = [np.ones(v.shape) for v in gauss_newton.variables]
    short = gauss_newton.solve(b, damping=1e-3, tol=1e-12, max_iter=3)
    assert short.iterations == 3 and short.stop_reason == "max_iter"
    assert not short.converged and short.relative_residual > 1e-12
    negative = gauss_newton.negated().solve(b)
    assert negative.stop_reason == "non-positive curvature"
    assert not negative.converged and negative.iterations == 1
    zero = gauss_newton.solve([np.zeros(v.shape) for v in gauss_newton.variables])
    assert zero.converged and zero.iterations == 0
    assert all(not np.any(x) for x in zero.x)


@pytest.mark.parametrize(
    "call, argument",
    [
        (lambda g: g.solve([1.0]), "Argument `b`"),
        (lambda g: g.solve(None), "Argument `b`"),
        (lambda g: g.solve(_ones(g), damping=-1.0), "Argument `damping`"),
        (lambda g: g.solve(_ones(g), tol=0.0), "Argument `tol`"),
        (lambda g: g.solve(_ones(g), method="gmres"), "Argument `method`"),
        (lambda g: g.solve(_ones(g), max_iter=0), "Argument `max_iter`"),
        (lambda g: g.eigenvalues(2, basis_size=3), "Argument `basis_size`"),
        (lambda g: g.trace(verbose=3), "Argument `verbose`"),
        (lambda g: g.density(reorthogonalize="yes"), "Argument `reorthogonalize`"),
    ],
)
def test_solver_arguments_are_checked(call, argument):
    gauss_newton = GaussNewton(_mlp(), _loss(), _data())
    with pytest.raises(ValueError, match=argument):
        call(gauss_newton)


def _ones(operator):
    return [np.ones(shape) for shape in operator.shapes]


def test_to_scipy_is_the_dense_matrix():
    model = _mlp()
    hessian = Hessian(model, _loss(), _data())
    dense = hessian.dense()
    operator = hessian.to_scipy()
    assert operator.shape == dense.shape and operator.dtype == np.float64
    rng = np.random.default_rng(6)
    v = rng.standard_normal(hessian.size)
    np.testing.assert_allclose(operator @ v, dense @ v, rtol=1e-12, atol=1e-14)
    block = rng.standard_normal((hessian.size, 3))
    np.testing.assert_allclose(operator @ block, dense @ block, rtol=1e-12, atol=1e-14)
    values = scipy_linalg.eigsh(operator, k=3, which="LA", tol=1e-12)[0]
    np.testing.assert_allclose(
        np.sort(values), np.linalg.eigvalsh(dense)[-3:], rtol=1e-9, atol=1e-12
    )
    # A SciPy solver on the operator agrees with tfcurv's own.
    gauss_newton = GaussNewton(model, _loss(), _data())
    damped = gauss_newton.to_scipy() + 0.1 * scipy_linalg.aslinearoperator(
        np.eye(gauss_newton.size)
    )
    b = rng.standard_normal(gauss_newton.size)
    scipy_x, info = scipy_linalg.cg(damped, b, rtol=1e-12, maxiter=500)
    assert info == 0
    ours = gauss_newton.solve(
        list(vec.unflatten(tf.constant(b), gauss_newton.shapes)), damping=0.1, tol=1e-12
    )
    np.testing.assert_allclose(_flat(ours.x), scipy_x, rtol=1e-8, atol=1e-10)


# -- one progress bar per estimate ----------------------------------------------------


def test_one_progress_line_per_estimate(capsys):
    model = _mlp()
    x, y = _data(30)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(10)
    hessian = Hessian(model, _loss(), dataset)
    capsys.readouterr()
    hessian.eigenvalues(top_n=2, verbose=2)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    products = hessian.last_num_products
    assert lines[0].lstrip().startswith(f"{products}/{products}")
    hessian.trace(num_samples=7, verbose=2)
    hessian.density(num_iter=5, verbose=2)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert [line.split()[0] for line in lines] == ["7/7", "5/5"]
    # "auto" follows the constructor: a 3-batch dataset shows nothing, and
    # progress=True one bar (verbose=1 redraws it in place, ending with the count).
    hessian.trace(num_samples=4)
    assert capsys.readouterr().out == ""
    Hessian(model, _loss(), dataset, progress=True).trace(num_samples=4)
    out = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)
    assert out.rstrip().split("\r")[-1].lstrip().startswith("4/4")
    assert out.count("\n") == 1
