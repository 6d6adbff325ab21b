"""Models the benchmarks time: MNIST-shaped inputs, 10 classes.

Both are small enough for a laptop CPU and large enough that the optimizer's
share of a training step is visible.
"""

from __future__ import annotations

import keras
import numpy as np

INPUT_SHAPE = (28, 28, 1)
CLASSES = 10


def mlp() -> keras.Model:
    """784 → 256 → 256 → 10, tanh (about 270k parameters)."""
    return keras.Sequential(
        [
            keras.Input(INPUT_SHAPE),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(256, name="fc1"),
            keras.layers.Activation("tanh", name="act1"),
            keras.layers.Dense(256, name="fc2"),
            keras.layers.Activation("tanh", name="act2"),
            keras.layers.Dense(CLASSES, name="fc3"),
        ],
        name="mlp",
    )


def bn_cnn() -> keras.Model:
    """Two Conv2D + BatchNormalization + ReLU blocks, pooling, Dense (about 6k
    parameters, most of the step in convolutions)."""
    return keras.Sequential(
        [
            keras.Input(INPUT_SHAPE),
            keras.layers.Conv2D(16, 3, padding="same", name="conv1"),
            keras.layers.BatchNormalization(name="bn1"),
            keras.layers.ReLU(name="relu1"),
            keras.layers.MaxPooling2D(name="pool1"),
            keras.layers.Conv2D(32, 3, padding="same", name="conv2"),
            keras.layers.BatchNormalization(name="bn2"),
            keras.layers.ReLU(name="relu2"),
            keras.layers.GlobalAveragePooling2D(name="gap"),
            keras.layers.Dense(CLASSES, name="fc"),
        ],
        name="bn_cnn",
    )


MODELS = {"mlp": mlp, "bn_cnn": bn_cnn}


def random_batch(batch_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One batch of MNIST-shaped random images and labels."""
    rng = np.random.default_rng(seed)
    images = rng.random((batch_size, *INPUT_SHAPE), dtype=np.float32)
    labels = rng.integers(0, CLASSES, size=batch_size)
    return images, labels
