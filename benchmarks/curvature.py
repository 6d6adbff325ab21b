"""Curvature benchmarks, every ratio measured within this one run (CPU).

1. Hessian-vector product time / gradient time (both compiled) on an MLP and a
   BatchNorm CNN (training mode): median of per-round ratios, the two timed back
   to back in each round. Target: <= 2.3.
2. Products needed for the top Hessian eigenvalue to 1e-4 relative accuracy:
   Lanczos (full re-orthogonalisation) vs power iteration, on the ``mlp_tanh``
   and ``ln_mlp`` reference models (exact eigenvalues from the fixtures).
3. Curvature Propagation vs Hutchinson for the Hessian diagonal of a tanh MLP
   (the ``mlp_tanh`` reference, batch 32): mean per-coordinate variance of one
   sample, and at equal cost (variance x seconds per sample). Target: <= 1/5.

Run: ``python benchmarks/curvature.py`` (about two minutes on two cores).
"""

from __future__ import annotations

import os
import pathlib
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import keras
import numpy as np
import reference_fixtures as rf
import tensorflow as tf

from tfcurv import Hessian
from tfcurv.curvature import diagonal as diagonal_lib
from tfcurv.curvature import lanczos as lanczos_lib
from tfcurv.curvature import vectors as vec
from tfcurv.curvature.propagation import CurvaturePropagation

REFERENCE = pathlib.Path(
    os.environ.get("TFCURV_REFERENCE_DIR", ROOT.parent / "shared" / "reference")
)


def _paired_time_ratio(function, baseline, rounds=40):
    """Median over rounds of ``time(function) / time(baseline)``, timed back to back.

    Pairing each ratio within one round keeps a load change on a shared machine
    from landing on one side only.
    """
    function(), baseline()  # trace
    ratios = []
    for _ in range(rounds):
        start = time.perf_counter()
        function()
        middle = time.perf_counter()
        baseline()
        ratios.append((middle - start) / (time.perf_counter() - middle))
    return float(np.median(ratios))


def hvp_over_gradient(model, x, y, mode="reverse_over_reverse", block=1):
    """Time of ``block`` products in one compiled call (one forward pass), per
    product, over the time of one gradient."""
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    hessian = Hessian(model, loss, (x, y), training=True, mode=mode)
    x, y = tf.constant(x), tf.constant(y)

    @tf.function
    def gradient():
        with keras.StatelessScope(), tf.GradientTape() as tape:
            value = loss(y, model(x, training=True))
        return tape.gradient(value, model.trainable_variables)

    probe = vec.rademacher([block, hessian.size], vec.seed_pair(0), hessian.dtype)
    seed = vec.seed_pair(0)
    return _paired_time_ratio(
        lambda: hessian._compiled_products(x, y, None, probe, seed), gradient
    ) / block


def mlp():
    keras.config.set_floatx("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((784,)), keras.layers.Dense(512, activation="relu"),
         keras.layers.Dense(512, activation="tanh"), keras.layers.Dense(10)]
    )  # fmt: skip
    rng = np.random.default_rng(0)
    return (
        model,
        rng.standard_normal((256, 784)).astype("float32"),
        rng.integers(0, 10, 256),
    )


def bn_cnn():
    keras.config.set_floatx("float32")
    keras.utils.set_random_seed(0)
    layers = [keras.Input((28, 28, 1))]
    for filters in (16, 32):
        layers += [keras.layers.Conv2D(filters, 3, padding="same"),
                   keras.layers.BatchNormalization(), keras.layers.ReLU(),
                   keras.layers.MaxPooling2D(2)]  # fmt: skip
    layers += [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, 28, 28, 1)).astype("float32")
    return keras.Sequential(layers), x, rng.integers(0, 10, 128)


def products_to_accuracy(name, accuracy=1e-4):
    reference = rf.load(REFERENCE / f"hessian__{name}.npz")
    model = rf.build_model(reference)
    hessian = Hessian(
        model,
        rf.loss_fn(),
        (reference.arrays["x"], reference.arrays["y"]),
        training=True,
    )
    target = reference.arrays["hess_eigvals"][-1]

    def accurate(value):
        return abs(value - target) <= accuracy * abs(target)

    lanczos_products = 0
    while lanczos_products < hessian.size:  # the fewest products that are accurate
        lanczos_products += 1
        values, _, _ = lanczos_lib.top_eigenpairs(
            hessian._matvec, hessian.size, hessian.dtype, 1, 1e-300,
            lanczos_products, 0,
        )  # fmt: skip
        if accurate(values[0]):
            break
    v = vec.random_flat(hessian.size, vec.seed_pair(0), hessian.dtype, "gaussian")
    power_products = 0
    while True:
        v = v / tf.norm(v)
        hv = hessian._matvec(v)
        power_products += 1
        if accurate(float(tf.tensordot(v, hv, 1))) or power_products >= 5000:
            break
        v = hv
    return lanczos_products, power_products


def propagation_vs_hutchinson(num_samples=2000):
    reference = rf.load(REFERENCE / "hessian__mlp_tanh.npz")
    model = rf.build_model(reference)
    x, y = reference.arrays["x"], reference.arrays["y"]
    hessian = Hessian(model, rf.loss_fn(), (x, y))
    estimator = CurvaturePropagation(model, hessian.loss, hessian.variables)
    x, y = tf.constant(x), tf.constant(y)
    estimator.samples(x, y, None, 8, seed=99)  # trace
    start = time.perf_counter()
    cp = estimator.samples(x, y, None, num_samples, seed=0).numpy()
    cp_seconds = (time.perf_counter() - start) / num_samples
    diagonal_lib.hutchinson_samples(hessian._matmat, hessian.size, hessian.dtype, 2, 99)
    start = time.perf_counter()
    hutchinson = diagonal_lib.hutchinson_samples(
        hessian._matmat, hessian.size, hessian.dtype, num_samples, 0
    ).numpy()
    hutchinson_seconds = (time.perf_counter() - start) / num_samples
    exact = reference.arrays["hess_diag"]
    cp_variance = np.mean(
        (cp - exact) ** 2
    )  # = mean per-coordinate variance (unbiased)
    hutchinson_variance = np.mean((hutchinson - exact) ** 2)
    return (
        cp_variance / hutchinson_variance,
        cp_variance * cp_seconds / (hutchinson_variance * hutchinson_seconds),
        cp_seconds / hutchinson_seconds,
    )


def main():
    rows = []
    for name, build in (
        ("MLP 784-512-512-10, batch 256", mlp),
        ("BN-CNN 28x28, batch 128", bn_cnn),
    ):
        for mode in ("reverse_over_reverse", "forward_over_reverse"):
            ratio = hvp_over_gradient(*build(), mode=mode)
            rows.append(
                (f"HVP ({mode}) / gradient time, {name}", f"{ratio:.2f}", "<= 2.3")
            )
        ratio = hvp_over_gradient(*build(), block=16)
        rows.append(
            (f"HVP in a block of 16 / gradient time, {name}", f"{ratio:.2f}", "")
        )
    for name in ("mlp_tanh", "ln_mlp"):
        lanczos, power = products_to_accuracy(name)
        rows.append((f"products to top eigenvalue 1e-4, {name}: Lanczos / power",
                     f"{lanczos} / {power}", "fewer"))  # fmt: skip
    per_sample, equal_cost, cost = propagation_vs_hutchinson()
    rows.append(
        ("CP / Hutchinson variance per sample, tanh MLP", f"{per_sample:.2e}", "")
    )
    rows.append(("CP / Hutchinson cost per sample", f"{cost:.2f}", ""))
    rows.append(
        ("CP / Hutchinson variance at equal cost", f"{equal_cost:.2e}", "<= 0.2")
    )
    width = max(len(r[0]) for r in rows)
    print(f"{'quantity'.ljust(width)}  {'measured':>12}  target")
    for label, value, target in rows:
        print(f"{label.ljust(width)}  {value:>12}  {target}")


if __name__ == "__main__":
    main()
