"""Toy sentiment task: does each optimizer train Embedding, GRU and attention models?

Sequences of token ids: ids 1-10 are "positive" words, 11-20 "negative", 0
padding (masked). The label says whether a sequence has more positive than
negative words. Two models a Keras user would write:

* ``gru``: Embedding(mask_zero) -> Conv1D -> GRU -> Dense;
* ``transformer``: Embedding -> one Transformer block (MultiHeadAttention,
  LayerNormalization, feed-forward) -> pooling -> Dense.

Every optimizer trains the same initial weights on the same batches, at its
defaults (Keras SGD with momentum 0.9 at 0.01); the script prints validation
accuracy after each epoch and the wall time of each fit. AdaFisher runs twice:
with its default for variables of no layer in tfcurv's table (a diagonal
empirical Fisher) and with ``unsupported_layers="identity"`` (the official
``F = 1``).

    python benchmarks/sentiment.py [--epochs 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import keras
import numpy as np

import tfcurv

VOCABULARY, LENGTH = 21, 24


def make_data(count: int, seed: int):
    """Token ids (count, LENGTH) with trailing padding, and binary labels.

    Each sequence has an odd length in [5, LENGTH - 1] of ids drawn uniformly
    from 1-20 (odd: no ties); label 1 when ids 1-10 outnumber ids 11-20.
    """
    rng = np.random.default_rng(seed)
    x = np.zeros((count, LENGTH), "int32")
    lengths = 2 * rng.integers(2, LENGTH // 2, size=count) + 1
    for row, length in enumerate(lengths):
        x[row, :length] = rng.integers(1, 21, size=length)
    positive = ((x >= 1) & (x <= 10)).sum(axis=1)
    negative = ((x >= 11) & (x <= 20)).sum(axis=1)
    return x, (positive > negative).astype("int32")


def gru_model():
    inputs = keras.Input((LENGTH,), dtype="int32")
    h = keras.layers.Embedding(VOCABULARY, 16, mask_zero=True)(inputs)
    h = keras.layers.Conv1D(16, 3, padding="same", activation="relu")(h)
    h = keras.layers.GRU(16)(h)
    return keras.Model(inputs, keras.layers.Dense(2)(h))


def transformer_model():
    inputs = keras.Input((LENGTH,), dtype="int32")
    h = keras.layers.Embedding(VOCABULARY, 16)(inputs)
    attended = keras.layers.MultiHeadAttention(2, 8)(h, h)
    h = keras.layers.LayerNormalization()(h + attended)
    fed = keras.layers.Dense(32, activation="relu")(h)
    h = keras.layers.LayerNormalization()(h + keras.layers.Dense(16)(fed))
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(inputs, keras.layers.Dense(2)(h))


OPTIMIZERS = {
    "Adam": lambda: keras.optimizers.Adam(),
    "SGD": lambda: keras.optimizers.SGD(0.01, momentum=0.9),
    "AGD": lambda: tfcurv.optimizers.AGD(),
    "AdaFisher": lambda: tfcurv.optimizers.AdaFisher(),
    "AdaFisher(identity)": lambda: tfcurv.optimizers.AdaFisher(
        unsupported_layers="identity"
    ),
}


def run(epochs: int) -> dict:
    x, y = make_data(2000, 0)
    x_val, y_val = make_data(500, 1)
    results = {}
    for model_name, build in (("gru", gru_model), ("transformer", transformer_model)):
        for name, make in OPTIMIZERS.items():
            keras.utils.set_random_seed(0)
            model = tfcurv.attach(build())
            model.compile(
                optimizer=make(),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"],
            )
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                history = model.fit(
                    x, y, batch_size=64, epochs=epochs, verbose=0,
                    validation_data=(x_val, y_val), shuffle=False,
                )  # fmt: skip
            seconds = time.perf_counter() - start
            accuracy = [round(a, 3) for a in history.history["val_accuracy"]]
            results[f"{model_name}/{name}"] = {"val_accuracy": accuracy, "seconds": seconds}
            print(f"{model_name:12s} {name:20s} val acc {accuracy}  {seconds:5.1f} s")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--json", help="write the results here")
    arguments = parser.parse_args()
    results = run(arguments.epochs)
    if arguments.json:
        with open(arguments.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
