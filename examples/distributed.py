"""Train with a tfcurv optimizer across workers (MultiWorkerMirroredStrategy).

Two ways to run it:

* ``python examples/distributed.py`` launches two local worker processes on
  the loopback address (free ports), waits for both, and prints each worker's
  final loss and top Hessian eigenvalue: they are equal, and equal to what one
  process training on the global batch gets;
* on a real cluster, set ``TF_CONFIG`` on every machine as TensorFlow
  describes it (``{"cluster": {"worker": [...]}, "task": {...}}``) and run
  ``python examples/distributed.py --worker`` on each.

Options: ``--optimizer`` (AdaFisher, AGD, SGDPH, or Keras' SGD/Adam),
``--epochs``, ``--timeout`` (seconds per local worker).

The data are the digits of ``examples/data.py`` (MNIST when prepared, else a
5,000-digit offline copy); each worker reads its shard (``AutoShardPolicy.DATA``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys

OPTIMIZERS = ("AdaFisher", "AGD", "SGDPH", "SGD", "Adam")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_local_workers(arguments) -> int:
    """Start two workers of one job on this machine and wait for both."""
    ports = [_free_port(), _free_port()]
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    workers = []
    for index in range(2):
        environment = dict(os.environ)
        environment["TF_CONFIG"] = json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}}
        )
        workers.append(
            subprocess.Popen(
                [sys.executable, __file__, "--worker",
                 "--optimizer", arguments.optimizer, "--epochs", str(arguments.epochs)],
                env=environment,
            )  # fmt: skip
        )
    status = 0
    for worker in workers:
        try:
            status |= worker.wait(timeout=arguments.timeout)
        except subprocess.TimeoutExpired:
            for other in workers:
                other.kill()
            print("a worker did not finish in time; both stopped", file=sys.stderr)
            return 1
    return status


def run_worker(arguments) -> None:
    """One worker of the job ``TF_CONFIG`` describes."""
    import keras
    import tensorflow as tf

    import tfcurv

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from data import load_mnist

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    task = json.loads(os.environ["TF_CONFIG"])["task"]
    (x_train, y_train), _ = load_mnist()
    x_train, y_train = x_train[:2048], y_train[:2048]
    global_batch = 64  # split over the workers' replicas
    data = tf.data.Dataset.from_tensor_slices((x_train, y_train)).batch(global_batch)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    data = data.with_options(options)

    with strategy.scope():  # model and optimizer are created inside the scope
        keras.utils.set_random_seed(0)
        model = tfcurv.Sequential(
            [
                keras.Input((28, 28, 1)),
                keras.layers.Conv2D(8, 3, activation="relu"),
                keras.layers.MaxPooling2D(2),
                keras.layers.Flatten(),
                keras.layers.Dense(32, activation="relu"),
                keras.layers.Dense(10),
            ]
        )
        optimizer = {
            "AdaFisher": lambda: tfcurv.optimizers.AdaFisher(update_freq=10),
            "AGD": lambda: tfcurv.optimizers.AGD(),
            "SGDPH": lambda: tfcurv.optimizers.SGDPH(0.05),
            "SGD": lambda: keras.optimizers.SGD(0.05, momentum=0.9),
            "Adam": lambda: keras.optimizers.Adam(),
        }[arguments.optimizer]()
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    history = model.fit(data, epochs=arguments.epochs, verbose=0)
    # Curvature under the same strategy: each product is spread over all
    # workers' replicas and summed with one all-reduce.
    hessian = tfcurv.Hessian(model, None, data.take(2))
    values, _ = hessian.eigenvalues(top_n=1, seed=0)
    print(
        f"worker {task['index']}: {arguments.optimizer} loss "
        f"{history.history['loss'][-1]:.4f}, top Hessian eigenvalue {values[0]:.4f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true",
                        help="run one worker of the job TF_CONFIG describes")  # fmt: skip
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="AdaFisher")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600.0)
    arguments = parser.parse_args()
    if arguments.worker:
        if "TF_CONFIG" not in os.environ:
            parser.error("--worker needs TF_CONFIG (see the module docstring)")
        run_worker(arguments)
    else:
        sys.exit(launch_local_workers(arguments))


if __name__ == "__main__":
    main()
