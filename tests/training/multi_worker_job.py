"""One worker of a two-worker MultiWorkerMirroredStrategy job (or, without
ports, the same training in one process), for ``test_multi_worker.py``.

    python multi_worker_job.py OPTIMIZER OUT.npz [INDEX PORT0 PORT1] [--epochs N]
        [--backup DIR] [--crash-after STEPS]

Trains a small float64 model through ``tfcurv.attach`` on a fixed data set
(global batch 16, sharded by data across the workers) and writes the final
weights and the dense Hessian at them (``tfcurv.Hessian`` over the same data,
its products spread over the workers) to ``OUT.npz``. Prints ``STEP`` after each step (flushed).
"""

import argparse
import json
import os

parser = argparse.ArgumentParser()
parser.add_argument("optimizer")
parser.add_argument("out")
parser.add_argument("cluster", nargs="*", type=int)
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--backup", help="BackupAndRestore folder (one per worker inside)")
parser.add_argument("--crash-after", type=int, help="exit abruptly after this many steps")
args = parser.parse_args()
if args.cluster:
    index, *ports = args.cluster
    os.environ["TF_CONFIG"] = json.dumps(
        {
            "cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
            "task": {"type": "worker", "index": index},
        }
    )

import keras
import numpy as np
import tensorflow as tf

import tfcurv

keras.config.set_floatx("float64")
OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(0.1, momentum=0.9),
    "agd": lambda: tfcurv.optimizers.AGD(1e-2),
    "sgdph": lambda: tfcurv.optimizers.SGDPH(0.05),
    "adafisher": lambda: tfcurv.optimizers.AdaFisher(1e-3, update_freq=2),
}


class Steps(keras.callbacks.Callback):
    count = 0

    def on_train_batch_end(self, batch, logs=None):
        Steps.count += 1
        print("STEP", batch, flush=True)
        if args.crash_after is not None and Steps.count >= args.crash_after:
            os._exit(3)  # a lost worker: no clean-up


strategy = (
    tf.distribute.MultiWorkerMirroredStrategy()
    if args.cluster
    else tf.distribute.get_strategy()
)
with strategy.scope():
    keras.utils.set_random_seed(0)
    model = tfcurv.attach(
        keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(8, activation="tanh"),
                keras.layers.LayerNormalization(),
                keras.layers.Dense(3),
            ]
        )
    )
    model.compile(
        optimizer=OPTIMIZERS[args.optimizer](),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
rng = np.random.default_rng(0)
x, y = rng.normal(size=(64, 4)), rng.integers(0, 3, 64)
data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
options = tf.data.Options()
options.experimental_distribute.auto_shard_policy = (
    tf.data.experimental.AutoShardPolicy.DATA
)
callbacks = [Steps()]
if args.backup:
    # Keras 3's BackupAndRestore is not multi-worker aware: every worker saves
    # to the folder it is given, so each gets its own (as separate hosts have).
    worker = args.cluster[0] if args.cluster else 0
    callbacks.insert(
        0, keras.callbacks.BackupAndRestore(os.path.join(args.backup, f"worker{worker}"))
    )
history = model.fit(
    data.with_options(options), epochs=args.epochs, verbose=0, callbacks=callbacks
)
# Curvature at the trained weights, over the same data: under the strategy
# every product is spread over both workers' replicas.
hessian = tfcurv.Hessian(
    model, keras.losses.SparseCategoricalCrossentropy(from_logits=True), data
)
print("HESSIAN REPLICAS", 1 if hessian.strategy is None else hessian.strategy.num_replicas_in_sync)
np.savez(
    args.out,
    loss=np.array(history.history["loss"]),
    hessian=hessian.dense(),
    **{f"w{i}": v.numpy() for i, v in enumerate(model.trainable_variables)},
)
print("DONE", flush=True)
