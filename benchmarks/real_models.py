"""First ``fit`` and steady step of each tfcurv optimizer on models people train.

Models: ``keras.applications.ResNet50`` and ``MobileNetV2`` (``weights=None``,
64x64x3 inputs, 10 classes, logits), and a deep MLP of ``depth`` x
[Dense(32, relu) + LayerNormalization] (``3 * depth + 1`` 1-D variables: the
case where SGD-PH's trace used to explode). Random data, batch 32.

Each tfcurv optimizer is compared with the Keras optimizer it replaces:
SGD-PH with ``keras.optimizers.SGD(momentum=0.9)``, AGD and AdaFisher with
``keras.optimizers.Adam``. Per model, every optimizer gets a fresh model
(the same initial weights) and

* **first fit**: wall time of ``fit`` over 2 steps on a model that never ran
  (trace, graph optimisation, the first steps: what a user waits for);
* **steady step**: median per-batch time of a second ``fit`` over
  ``--steps`` batches (callback timestamps, first batch dropped).

The optimizers take turns in a random order per round, in one process, and
the ratio to the baseline is taken within each round, then the median over
rounds reported, so machine load affects both sides alike.

    python benchmarks/real_models.py [--models resnet50 mobilenetv2 ln_mlp]
        [--rounds 1] [--steps 6] [--depth 16] [--out results.json]

(with tfcurv installed, e.g. ``pip install -e .``, or ``PYTHONPATH=.``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time

import keras
import numpy as np
import tensorflow as tf

import tfcurv

BATCH = 32
IMAGE = (64, 64, 3)
CLASSES = 10


def resnet50():
    return keras.applications.ResNet50(
        weights=None, input_shape=IMAGE, classes=CLASSES, classifier_activation=None
    )


def mobilenetv2():
    return keras.applications.MobileNetV2(
        weights=None, input_shape=IMAGE, classes=CLASSES, classifier_activation=None
    )


def layer_norm_mlp(depth: int):
    layers = [keras.Input((16,))]
    for _ in range(depth):
        layers += [keras.layers.Dense(32, activation="relu"), keras.layers.LayerNormalization()]
    layers.append(keras.layers.Dense(CLASSES))
    return keras.Sequential(layers)


# name: (factory, needs the tfcurv step, baseline name)
OPTIMIZERS = {
    "SGD": (lambda: keras.optimizers.SGD(1e-2, momentum=0.9), False, None),
    "Adam": (lambda: keras.optimizers.Adam(1e-3), False, None),
    "SGDPH": (lambda: tfcurv.optimizers.SGDPH(1e-2), True, "SGD"),
    "AGD": (lambda: tfcurv.optimizers.AGD(1e-3), False, "Adam"),
    "AdaFisher": (lambda: tfcurv.optimizers.AdaFisher(1e-3), True, "Adam"),
}


class BatchTimes(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self._start)


def data(model_name: str, steps: int):
    rng = np.random.default_rng(0)
    shape = (16,) if model_name == "ln_mlp" else IMAGE
    x = rng.standard_normal((BATCH * steps, *shape)).astype("float32")
    y = rng.integers(0, CLASSES, BATCH * steps)
    return x, y


def measure(build, weights, optimizer_name: str, model_name: str, steps: int) -> dict:
    factory, needs_tfcurv_step, _ = OPTIMIZERS[optimizer_name]
    keras.backend.clear_session()
    model = build()
    model.set_weights(weights)
    if needs_tfcurv_step:
        model = tfcurv.attach(model)
    model.compile(
        optimizer=factory(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = data(model_name, 2)
    start = time.perf_counter()
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    first_fit = time.perf_counter() - start
    x, y = data(model_name, steps + 1)
    timer = BatchTimes()
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[timer])
    return {"first_fit": first_fit, "step": statistics.median(timer.times[1:])}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", nargs="+", default=["ln_mlp", "mobilenetv2", "resnet50"],
        choices=["ln_mlp", "mobilenetv2", "resnet50"],
    )
    parser.add_argument(
        "--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS)
    )
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6, help="steady-step batches")
    parser.add_argument("--depth", type=int, default=16, help="LayerNorm MLP depth")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the results as JSON")
    args = parser.parse_args(argv)
    names = list(args.optimizers)
    for name in list(names):  # every candidate needs its baseline in the run
        baseline = OPTIMIZERS[name][2]
        if baseline and baseline not in names:
            names.append(baseline)
    builders = {
        "resnet50": resnet50,
        "mobilenetv2": mobilenetv2,
        "ln_mlp": lambda: layer_norm_mlp(args.depth),
    }
    shuffler = random.Random(args.seed)
    results = {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "cpu_cores": len(os.sched_getaffinity(0)),  # the cores this process may use
        "models": {},
    }
    for model_name in args.models:
        keras.utils.set_random_seed(0)
        reference = builders[model_name]()
        weights = reference.get_weights()
        one_d = sum(len(v.shape) == 1 for v in reference.trainable_variables)
        del reference
        print(
            f"\n{model_name}: {one_d} 1-D trainable variables; "
            f"rounds {args.rounds}, steady step over {args.steps} batches",
            flush=True,
        )
        rounds = []
        for round_number in range(args.rounds):
            order = list(names)
            shuffler.shuffle(order)
            measured = {}
            for optimizer_name in order:
                measured[optimizer_name] = measure(
                    builders[model_name], weights, optimizer_name, model_name, args.steps
                )
                m = measured[optimizer_name]
                print(
                    f"  round {round_number + 1} {optimizer_name:10s} first fit "
                    f"{m['first_fit']:7.1f} s  steady step {1e3 * m['step']:8.1f} ms",
                    flush=True,
                )
            rounds.append(measured)
        summary = {}
        for optimizer_name in names:
            baseline = OPTIMIZERS[optimizer_name][2]
            row = {
                "first_fit_s": statistics.median(r[optimizer_name]["first_fit"] for r in rounds),
                "step_ms": 1e3 * statistics.median(r[optimizer_name]["step"] for r in rounds),
            }
            if baseline:
                row["baseline"] = baseline
                for key in ("first_fit", "step"):
                    row[f"{key}_ratio"] = statistics.median(
                        r[optimizer_name][key] / r[baseline][key] for r in rounds
                    )
            summary[optimizer_name] = row
        results["models"][model_name] = {"one_d_variables": one_d, "optimizers": summary}
        print(f"\n{model_name}: median over rounds (ratio to the baseline in the same round)")
        print(f"  {'optimizer':10s} {'first fit':>10s} {'ratio':>6s} {'step':>10s} {'ratio':>6s}")
        for optimizer_name, row in summary.items():
            first_ratio = f"{row['first_fit_ratio']:6.2f}" if "baseline" in row else "     -"
            step_ratio = f"{row['step_ratio']:6.2f}" if "baseline" in row else "     -"
            print(
                f"  {optimizer_name:10s} {row['first_fit_s']:9.1f}s {first_ratio} "
                f"{row['step_ms']:8.1f}ms {step_ratio}"
                + (f"  (vs {row['baseline']})" if "baseline" in row else "")
            )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    sys.exit(main() and 0)
