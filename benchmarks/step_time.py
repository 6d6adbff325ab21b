"""Time per training step of each tfcurv optimizer against Keras Adam and SGD.

Every (model, optimizer) pair is compiled once and warmed up; then the pairs
take turns in a random order, ``--rounds`` times, each running ``--steps``
training steps (``train_on_batch`` on the compiled train function, one fixed
batch). Taking turns in one process spreads machine noise evenly over the
optimizers. The
table reports the median time per step and, per model, the median over rounds
of the ratio to Adam's (with its quartiles) and to SGD's time in the same round.

    python benchmarks/step_time.py [--models mlp bn_cnn] [--out results.json]

(with tfcurv installed, e.g. ``pip install -e .``, or ``PYTHONPATH=.``).

To benchmark a new optimizer, add one :class:`Entry` to ``OPTIMIZERS``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import platform
import random
import statistics
import time
from collections.abc import Callable, Mapping

import keras
import models  # benchmarks/models.py: the script's folder is on sys.path
import tensorflow as tf

import tfcurv

OptimizerFactory = Callable[[], keras.optimizers.Optimizer]


@dataclasses.dataclass(frozen=True)
class Entry:
    """One optimizer in the benchmark.

    Attributes:
        name: row label.
        factory: returns a fresh optimizer.
        needs_tfcurv_step: train through ``tfcurv.attach(model)``.
        variants: extra rows ``"<name> [<variant>]"``, each with its own factory
            (e.g. a curvature optimizer with statistics on every step).
    """

    name: str
    factory: OptimizerFactory
    needs_tfcurv_step: bool = False
    variants: Mapping[str, OptimizerFactory] = dataclasses.field(default_factory=dict)

    def rows(self) -> list[tuple[str, OptimizerFactory, bool]]:
        return [(self.name, self.factory, self.needs_tfcurv_step)] + [
            (f"{self.name} [{variant}]", factory, self.needs_tfcurv_step)
            for variant, factory in self.variants.items()
        ]


BASELINES = [
    Entry("Adam", lambda: keras.optimizers.Adam(1e-3)),
    Entry("SGD", lambda: keras.optimizers.SGD(1e-2, momentum=0.9)),
]
OPTIMIZERS = [
    Entry(
        "AGD",
        lambda: tfcurv.optimizers.AGD(1e-3),
        variants={"unfused": lambda: tfcurv.optimizers.AGD(1e-3, fused=False)},
    ),
    Entry(
        "AdaFisher",
        lambda: tfcurv.optimizers.AdaFisher(1e-3),
        needs_tfcurv_step=True,
        variants={
            "statistics step": lambda: tfcurv.optimizers.AdaFisher(1e-3, update_freq=1)
        },
    ),
    Entry(
        "SGDPH",
        lambda: tfcurv.optimizers.SGDPH(1e-2),
        needs_tfcurv_step=True,
        variants={
            f"curvature_every={k}": (
                lambda k=k: tfcurv.optimizers.SGDPH(1e-2, curvature_every=k)
            )
            for k in (2, 4, 10)
        },
    ),
    # The tfcurv train step's overhead with an optimizer that needs no curvature.
    Entry(
        "SGD attached",
        lambda: keras.optimizers.SGD(1e-2, momentum=0.9),
        needs_tfcurv_step=True,
    ),
]


@dataclasses.dataclass
class Contestant:
    """A compiled model and its batch, ready to time."""

    model_name: str
    optimizer_name: str
    model: keras.Model
    batch: tuple

    def run(self, steps: int, clock=time.perf_counter) -> float:
        """Seconds per step over ``steps`` consecutive steps."""
        start = clock()
        for _ in range(steps):
            self.model.train_on_batch(*self.batch)
        return (clock() - start) / steps


def prepare(model_name, optimizer_name, factory, needs_tfcurv_step, batch_size, warmup):
    keras.utils.set_random_seed(0)
    model = models.MODELS[model_name]()
    if needs_tfcurv_step:
        model = tfcurv.attach(model)
    model.compile(
        optimizer=factory(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=False,
    )
    contestant = Contestant(
        model_name, optimizer_name, model, models.random_batch(batch_size)
    )
    contestant.run(warmup)  # tracing and first-call costs stay out of the timing
    return contestant


CLOCKS = {
    # elapsed time: what a user waits for
    "wall": time.perf_counter,
    # CPU time of this process (all threads): less sensitive to other
    # processes on a shared machine
    "process": time.process_time,
}


def measure(
    contestants, rounds: int, steps: int, clock
) -> dict[tuple[str, str], list[float]]:
    """Every contestant once per round, in a new random order each round
    (a fixed order favours some positions by several per cent)."""
    times = {(c.model_name, c.optimizer_name): [] for c in contestants}
    order = list(contestants)
    shuffler = random.Random(0)
    for _ in range(rounds):
        shuffler.shuffle(order)
        for contestant in order:
            times[(contestant.model_name, contestant.optimizer_name)].append(
                contestant.run(steps, clock)
            )
    return times


def paired_ratio(times, key, baseline) -> tuple[float, float, float]:
    """Median and quartiles over rounds of ``time / baseline time`` in that round.

    Pairing by round cancels slow changes of machine load between rounds.
    """
    ratios = [t / b for t, b in zip(times[key], times[baseline])]
    quartile_1, median, quartile_3 = statistics.quantiles(ratios, n=4)
    return median, quartile_1, quartile_3


def summarize(times) -> list[dict]:
    rows = []
    for (model_name, optimizer_name), samples in times.items():
        key = (model_name, optimizer_name)
        to_adam = paired_ratio(times, key, (model_name, "Adam"))
        to_sgd = paired_ratio(times, key, (model_name, "SGD"))
        rows.append(
            {
                "model": model_name,
                "optimizer": optimizer_name,
                "median_ms_per_step": 1e3 * statistics.median(samples),
                "ratio_to_adam": to_adam[0],
                "ratio_to_adam_quartiles": to_adam[1:],
                "ratio_to_sgd": to_sgd[0],
                "ratio_to_sgd_quartiles": to_sgd[1:],
                "samples_ms": [1e3 * t for t in samples],
            }
        )
    return rows


def print_table(rows) -> None:
    header = (
        f"{'model':<8} {'optimizer':<28} {'ms/step':>9} {'/ Adam':>7} "
        f"{'(quartiles)':>13} {'/ SGD':>7}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        low, high = row["ratio_to_adam_quartiles"]
        print(
            f"{row['model']:<8} {row['optimizer']:<28} "
            f"{row['median_ms_per_step']:9.3f} {row['ratio_to_adam']:7.3f} "
            f"  {low:5.3f}-{high:5.3f} {row['ratio_to_sgd']:7.3f}"
        )


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(models.MODELS))
    parser.add_argument(
        "--optimizers",
        nargs="+",
        default=None,
        help="names of OPTIMIZERS entries (default: all); Adam and SGD always run",
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed run")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    parser.add_argument("--out", type=pathlib.Path, help="also write the rows as JSON")
    args = parser.parse_args(argv)

    entries = BASELINES + [
        e for e in OPTIMIZERS if args.optimizers is None or e.name in args.optimizers
    ]
    contestants = [
        prepare(model_name, *row, args.batch_size, args.warmup)
        for model_name in args.models
        for entry in entries
        for row in entry.rows()
    ]
    rows = summarize(measure(contestants, args.rounds, args.steps, CLOCKS[args.clock]))
    print_table(rows)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {
                    "settings": {k: str(v) for k, v in vars(args).items()},
                    "versions": {
                        "python": platform.python_version(),
                        "keras": keras.__version__,
                        "tensorflow": tf.__version__,
                        "tfcurv": tfcurv.__version__,
                    },
                    "rows": rows,
                },
                indent=2,
            )
        )
    return rows


if __name__ == "__main__":
    main()
