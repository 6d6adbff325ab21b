"""A quadratic test problem with a known Hessian, shared by the analysis tests.

Two linear branches ``a(x1) + b(x2)`` under mean squared error: the loss is
quadratic in the weights, so its Hessian is the same everywhere,
``H = 2 Z^T Z / n`` with ``Z = [x1, 1, x2, 1]`` (columns in the order of
``model.trainable_variables``: a/kernel, a/bias, b/kernel, b/bias).
"""

import keras
import numpy as np
import pytest


class QuadraticProblem:
    def __init__(self, num_examples: int = 40, seed: int = 0):
        keras.config.set_floatx("float64")
        rng = np.random.default_rng(seed)
        scales = np.array([3.0, 1.5, 1.0, 0.5])
        self.x1 = rng.standard_normal((num_examples, 3)) * scales[:3]
        self.x2 = rng.standard_normal((num_examples, 2)) * scales[2:]
        self.y = rng.standard_normal((num_examples, 1))
        ones = np.ones((num_examples, 1))
        self.z = np.concatenate([self.x1, ones, self.x2, ones], axis=1)
        self.hessian = 2.0 * self.z.T @ self.z / num_examples
        self.layer_slices = {"a": slice(0, 4), "b": slice(4, 7)}

    @property
    def data(self):
        return [self.x1, self.x2], self.y

    def model(self, seed: int = 3) -> keras.Model:
        keras.utils.set_random_seed(seed)
        x1, x2 = keras.Input((3,)), keras.Input((2,))
        output = keras.layers.Add()(
            [keras.layers.Dense(1, name="a")(x1), keras.layers.Dense(1, name="b")(x2)]
        )
        model = keras.Model([x1, x2], output)
        model.compile(
            optimizer=keras.optimizers.SGD(0.01), loss=keras.losses.MeanSquaredError()
        )
        return model

    def eigh(self, block: slice = slice(None)):
        """Eigenpairs of the (block of the) known Hessian, values descending."""
        values, vectors = np.linalg.eigh(self.hessian[block, block])
        return values[::-1], vectors[:, ::-1].T


@pytest.fixture
def quadratic():
    return QuadraticProblem()
