"""The traced train step grows linearly with depth, like Keras' own step.

A first ``fit`` pays for tracing the step; a graph that grows faster than the
number of layers (SGD-PH's former one-branch-per-1-D-variable switch, each
branch holding its own second backward pass) makes that cost explode on deep
models. The graph's node count (the step's graph and every function in its
library: cond branches, XLA-compiled helpers) is measured on LayerNormalization
MLPs of depth 2, 4 and 8 (7, 13 and 25 1-D variables).
"""

from __future__ import annotations

import keras
import pytest
import tensorflow as tf

import tfcurv

DEPTHS = (2, 4, 8)


def layer_norm_mlp(depth: int) -> keras.Model:
    keras.utils.set_random_seed(0)
    layers = [keras.Input((4,))]
    for _ in range(depth):
        layers += [keras.layers.Dense(8, activation="tanh"), keras.layers.LayerNormalization()]
    layers.append(keras.layers.Dense(3))
    return tfcurv.Sequential(layers)


def graph_size(depth: int, make_optimizer) -> int:
    model = layer_norm_mlp(depth)
    model.compile(
        optimizer=make_optimizer(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.optimizer.build(model.trainable_variables)
    data = (tf.zeros((2, 4)), tf.constant([0, 1]))
    step = tf.function(model.train_step, autograph=False)  # the step has no Python control flow on tensors
    graph = step.get_concrete_function(data).graph.as_graph_def()
    return len(graph.node) + sum(len(f.node_def) for f in graph.library.function)


OPTIMIZERS = {
    "SGDPH": tfcurv.optimizers.SGDPH,
    "SGDPH(curvature_every=3)": lambda: tfcurv.optimizers.SGDPH(curvature_every=3),
    "AdaFisher": tfcurv.optimizers.AdaFisher,
    "AdaFisherW": tfcurv.optimizers.AdaFisherW,
    "AGD": tfcurv.optimizers.AGD,
}


@pytest.fixture(scope="module")
def keras_sgd_sizes() -> list[int]:
    return [graph_size(d, lambda: keras.optimizers.SGD(momentum=0.9)) for d in DEPTHS]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_step_graph_grows_linearly_with_depth(name, keras_sgd_sizes):
    sizes = [graph_size(d, OPTIMIZERS[name]) for d in DEPTHS]
    first, second = sizes[1] - sizes[0], sizes[2] - sizes[1]  # 2 and 4 more blocks
    # Linear growth: 4 more blocks cost twice what 2 more did (a few nodes of
    # slack for per-step bookkeeping). The former SGD-PH switch: 10752 vs 19464.
    assert second <= 2 * first + 16, sizes
    # Per block, at most 6 times Keras SGD's step (forward, backward, second
    # backward and the update; measured: SGD-PH 4.5, AdaFisher 3.6).
    keras_per_block = (keras_sgd_sizes[2] - keras_sgd_sizes[0]) / 6
    assert (sizes[2] - sizes[0]) / 6 <= 6 * keras_per_block, (sizes, keras_sgd_sizes)
