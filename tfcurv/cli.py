"""The ``tfcurv`` command: ``tfcurv report MODEL.keras --data DATA.npz``.

Also runs as ``python -m tfcurv``. See ``tfcurv report --help``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import pathlib
import sys

REPORT_HELP = """\
Measure the curvature of a trained Keras model's loss on some data and print:
the largest Hessian eigenvalues, the Hessian trace, and one row per layer
(its parameters, the top eigenvalue of its own Hessian block, and its share of
the trace). Writes two plots: the spectral density (density.png) and the
per-layer curvature (layers.png).

The loss is the one the model was compiled with, unless --loss names another.
Data: an .npz file with arrays "x" and "y" (and optionally "sample_weight"),
split into batches of --batch-size; or, with --dataset, a Python function
that returns a tf.data.Dataset of (x, y) batches.

Every quantity is the curvature of the mean loss over all the examples given,
in inference mode unless --training. Cost: about top_n * 10 + trace_samples +
density_iter + 10 per layer passes over the data, each a Hessian-vector
product (about twice a gradient).
"""

EXAMPLES = """\
examples:
  tfcurv report model.keras --data val.npz
  tfcurv report model.keras --data val.npz --top-n 5 --output-dir plots/
  tfcurv report model.keras --dataset my_data.py:validation --loss mse
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tfcurv",
        description="Curvature tools for Keras models.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    report = commands.add_parser(
        "report",
        help="print and plot the Hessian curvature of a saved model",
        description=REPORT_HELP,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument("model", help="a saved Keras model (.keras file)")
    source = report.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--data", metavar="DATA.npz", help='an .npz file with arrays "x" and "y"'
    )
    source.add_argument(
        "--dataset",
        metavar="FILE.py:FUNCTION",
        help="a function (in a .py file or an importable module, as "
        "module:function) that takes no argument and returns a tf.data.Dataset "
        "of (x, y) or (x, y, sample_weight) batches",
    )
    report.add_argument(
        "--loss",
        help="a Keras loss name (e.g. sparse_categorical_crossentropy); default: "
        "the model's compiled loss",
    )
    report.add_argument(
        "--batch-size", type=int, default=256,
        help="batch size for --data (default 256); it does not change the result, "
        "only the memory of one pass",
    )  # fmt: skip
    report.add_argument(
        "--top-n", type=int, default=3, help="top eigenvalues to print (default 3)"
    )
    report.add_argument(
        "--trace-samples", type=int, default=100,
        help="Hutchinson probes for the trace (default 100)",
    )  # fmt: skip
    report.add_argument(
        "--density-iter", type=int, default=100,
        help="Lanczos steps of the spectral density (default 100)",
    )  # fmt: skip
    report.add_argument(
        "--training", action="store_true",
        help="measure in training mode (batch statistics, Dropout on)",
    )  # fmt: skip
    report.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    report.add_argument(
        "--output-dir", default=".", type=pathlib.Path,
        help="where to write density.png and layers.png (default: here)",
    )  # fmt: skip
    report.add_argument(
        "--no-plots", action="store_true", help="do not draw (no matplotlib needed)"
    )
    report.add_argument(
        "--json", type=pathlib.Path, metavar="FILE",
        help="also write the numbers to this JSON file",
    )  # fmt: skip
    report.add_argument(
        "--verbose", type=int, choices=(0, 1, 2), default=1,
        help="progress: 0 silent, 1 a bar per estimate (default), 2 a line per estimate",
    )  # fmt: skip
    return parser


def _load_function(spec: str):
    """``FILE.py:FUNCTION`` or ``module.path:FUNCTION`` to the function."""
    if ":" not in spec:
        raise SystemExit(
            f"--dataset must be FILE.py:FUNCTION or module:FUNCTION; got {spec!r}"
        )
    location, name = spec.rsplit(":", 1)
    if location.endswith(".py"):
        path = pathlib.Path(location)
        if not path.is_file():
            raise SystemExit(f"--dataset: no file {location}")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(location)
    if not callable(getattr(module, name, None)):
        raise SystemExit(f"--dataset: {location} has no function {name!r}")
    return getattr(module, name)


def _data(arguments):
    import numpy as np
    import tensorflow as tf

    if arguments.dataset:
        dataset = _load_function(arguments.dataset)()
        if not isinstance(dataset, tf.data.Dataset):
            raise SystemExit(
                f"--dataset: {arguments.dataset} returned a "
                f"{type(dataset).__name__}, not a tf.data.Dataset"
            )
        return dataset
    with np.load(arguments.data, allow_pickle=False) as stored:
        missing = {"x", "y"} - set(stored.files)
        if missing:
            raise SystemExit(
                f"--data: {arguments.data} has no array {sorted(missing)[0]!r} "
                f"(it has {sorted(stored.files)}); save it with "
                "numpy.savez(path, x=..., y=...)"
            )
        parts = [stored["x"], stored["y"]]
        if "sample_weight" in stored.files:
            parts.append(stored["sample_weight"])
    if arguments.batch_size < 1:
        raise SystemExit("--batch-size must be at least 1")
    if len(parts[0]) <= arguments.batch_size:
        return tuple(parts)
    return tf.data.Dataset.from_tensor_slices(tuple(parts)).batch(arguments.batch_size)


def report(arguments) -> dict:
    """Runs ``tfcurv report``: prints the table, writes plots (and JSON)."""
    import keras

    from tfcurv.analysis.report import curvature_report

    if not pathlib.Path(arguments.model).exists():
        raise SystemExit(f"no model file {arguments.model}")
    model = keras.saving.load_model(arguments.model)
    if arguments.loss is None and getattr(model, "loss", None) is None:
        raise SystemExit(
            f"{arguments.model} was saved without a compiled loss; pass --loss "
            "(a Keras loss name such as sparse_categorical_crossentropy)"
        )
    result = curvature_report(
        model,
        _data(arguments),
        loss=arguments.loss,
        top_n=arguments.top_n,
        trace_samples=arguments.trace_samples,
        density_iter=arguments.density_iter,
        training=arguments.training,
        seed=arguments.seed,
        verbose=arguments.verbose,
    )
    print(result.table())
    if not arguments.no_plots:
        _plots(result, arguments.output_dir)
    numbers = {
        "num_parameters": result.num_parameters,
        "top_eigenvalues": result.top_eigenvalues.tolist(),
        "trace": result.trace,
        "trace_samples": result.trace_samples,
        "layers": [
            {"name": str(n), "parameters": int(c), "top_eigenvalue": float(t),
             "trace_share": float(s)}
            for n, c, t, s in zip(
                result.layer_names, result.layer_parameters,
                result.layer_top_eigenvalues, result.layer_trace_shares,
            )
        ],
    }  # fmt: skip
    if arguments.json:
        arguments.json.write_text(json.dumps(numbers, indent=1))
    return numbers


def _plots(result, directory: pathlib.Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return
    from tfcurv.analysis import plots

    directory.mkdir(parents=True, exist_ok=True)
    ax = plots.plot_spectral_density(result.density)
    ax.figure.savefig(directory / "density.png", dpi=120, bbox_inches="tight")
    axes = plots.plot_layer_report(result)
    axes[0].figure.savefig(directory / "layers.png", dpi=120, bbox_inches="tight")
    plt.close("all")
    print(f"plots: {directory / 'density.png'}, {directory / 'layers.png'}")


def main(argv: list[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    if arguments.command == "report":
        report(arguments)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
