"""``tfcurv.Hessian`` and ``tfcurv.GaussNewton``: curvature of a Keras model's loss.

(``tfcurv.Fisher``, in :mod:`tfcurv.curvature.fisher`, shares the machinery here.)

Each operator is the curvature matrix of the mean loss of ``model`` on
``data`` at the model's current weights, restricted to ``variables``. It is
never stored: everything goes through compiled matrix-vector products (one
``tf.function`` trace per operator, reused for every vector).

The forward pass of every product runs

* inside :func:`~tfcurv.curvature.exact_moments.exact_second_derivatives`, so
  BatchNormalization / LayerNormalization / GroupNormalization in training mode
  give exact second derivatives;
* inside ``keras.StatelessScope``, so no call changes the model: with
  ``training=True`` batch statistics and live Dropout are used, but moving
  averages and random-seed states are not updated. Every evaluation therefore
  sees the same Dropout mask (the one the seed state currently gives), which
  keeps the operator a fixed symmetric matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from tfcurv import _keras
from tfcurv._checks import (
    check_bool,
    check_choice,
    check_integer,
    check_range,
    check_seed,
)
from tfcurv.curvature import data as data_lib
from tfcurv.curvature import density as density_lib
from tfcurv.curvature import diagonal as diagonal_lib
from tfcurv.curvature import lanczos as lanczos_lib
from tfcurv.curvature import losses as losses_lib
from tfcurv.curvature import products
from tfcurv.curvature import trace as trace_lib
from tfcurv.curvature import vectors as vec
from tfcurv.curvature.exact_moments import exact_second_derivatives
from tfcurv.curvature.layers import select_variables
from tfcurv.curvature.second_derivatives import check_second_derivatives

DEFAULT_MAX_DENSE_SIZE = 5000


class CurvatureOperator:
    """A symmetric curvature matrix of ``loss`` on ``data``, known through products.

    Args:
        model: a built Keras model.
        loss: a ``keras.losses.Loss``, a loss name or a callable; reduced as in
            ``model.compile`` and with ``model.losses`` added. ``None``: the
            loss the model was compiled with.
        data: ``(x, y)``, ``(x, y, sample_weight)`` or a ``tf.data.Dataset`` of
            such batches (the curvature of the mean loss over all examples).
        training: ``True`` for batch statistics and live Dropout (without
            changing the model), ``False`` for inference mode.
        variables: ``None`` (all trainable variables), a layer, or a list of
            layers / variables to restrict the matrix to.
        mode: ``"reverse_over_reverse"`` (default) or ``"forward_over_reverse"``
            (Hessian only).
        max_dense_size: largest parameter count :meth:`dense` and exact methods
            accept.
        progress: show a progress bar per pass over ``data`` (default: for
            datasets of more than 20 batches).
        strategy: a ``tf.distribute`` strategy to spread each product over:
            every replica (on every worker) takes its contiguous share of each
            batch and the shares are summed with one all-reduce, which gives
            the single-device product on the same data (BatchNormalization in
            training mode then uses per-replica batch statistics, and the
            sampled-label Fisher draws per replica). Default: the model's
            ``distribute_strategy`` when it has several replicas, else one
            device.
    """

    def __init__(
        self,
        model: keras.Model,
        loss,
        data,
        training: bool = False,
        variables=None,
        mode: str = "reverse_over_reverse",
        max_dense_size: int = DEFAULT_MAX_DENSE_SIZE,
        progress: bool | None = None,
        strategy: tf.distribute.Strategy | None = None,
    ):
        if not isinstance(model, keras.Model):
            raise ValueError(
                "Argument `model` must be a keras.Model (a layer alone has no loss "
                f"to differentiate). Received: model={model!r}"
            )
        if not model.built:
            raise ValueError(
                f"Argument `model` must be built (call it once, or build it) before "
                f"its curvature can be measured. Received: an unbuilt {type(model).__name__}"
            )
        check_bool("training", training)
        if strategy is not None and not isinstance(strategy, tf.distribute.Strategy):
            raise ValueError(
                "Argument `strategy` must be a tf.distribute.Strategy or None. "
                f"Received: strategy={strategy!r}"
            )
        strategy = strategy or getattr(model, "distribute_strategy", None)
        self.strategy = (
            strategy
            if strategy is not None and strategy.num_replicas_in_sync > 1
            else None
        )
        check_choice("mode", mode, tuple(products.MODES))
        self.model = model
        self.data = data_lib.Data(data, progress)
        self.training = training
        self.mode = mode
        self.variables = select_variables(model, variables)
        check_second_derivatives(model, f"tfcurv.{type(self).__name__}")
        self.shapes = [tuple(v.shape) for v in self.variables]
        self.dtype = tf.as_dtype(self.variables[0].dtype)
        self.loss = losses_lib.resolve(
            losses_lib.compiled_loss(model, loss), self.dtype.name
        )
        self.size = sum(vec.sizes(self.shapes))
        self.max_dense_size = check_integer("max_dense_size", max_dense_size)
        self._compiled_products = tf.function(self._batch_products)

    # -- the model's loss, without changing the model ---------------------------------

    def _outputs_and_regularisation(self, x):
        """Model outputs and ``sum(model.losses)`` from one stateless forward pass."""
        with (
            exact_second_derivatives(),
            keras.StatelessScope(collect_losses=True) as scope,
        ):
            outputs = self.model(x, training=self.training)
            # model.losses: add_loss terms of this call and weight penalties (read
            # here from the variables themselves, which the scope does not map).
            regularisation = list(scope.losses) + [
                v.regularizer(v.value)
                for v in self.model.trainable_variables
                if getattr(v, "regularizer", None) is not None
            ]
        regularisation = [tf.cast(term, self.dtype) for term in regularisation]
        return outputs, tf.add_n(regularisation) if regularisation else None

    def _mean_loss(self, y, outputs, sample_weight=None) -> tf.Tensor:
        """The mean loss over the batch given here. Keras divides a loss by the
        replica count inside a replica context; that is undone, since each
        replica's product is weighted by its share of the batch instead."""
        return _keras.unscale_loss_for_distribution(
            self.loss(y, outputs, sample_weight=sample_weight)
        )

    def _loss(self, x, y, sample_weight) -> tf.Tensor:
        outputs, regularisation = self._outputs_and_regularisation(x)
        value = self._mean_loss(y, outputs, sample_weight)
        return value if regularisation is None else value + regularisation

    # -- products ---------------------------------------------------------------------

    # Seed of the random draws an operator makes per batch (sampled-label Fisher);
    # operators that draw nothing ignore it.
    sampling_seed = 0

    def _products_on_batch(self, x, y, sample_weight, vectors, batch_seed):
        raise NotImplementedError

    def _batch_products(self, x, y, sample_weight, flat_vectors, batch_seed):
        """``A V^T`` on one batch, for the rows of ``flat_vectors`` (compiled)."""
        vectors = [
            vec.unflatten(flat_vectors[i], self.shapes)
            for i in range(flat_vectors.shape[0])
        ]
        results = self._products_on_batch(x, y, sample_weight, vectors, batch_seed)
        return tf.stack([vec.flatten(r) for r in results])

    def _matmat(self, flat_vectors: tf.Tensor) -> tf.Tensor:
        """Products with the rows of ``flat_vectors`` (k, P), over all of ``data``."""
        flat_vectors = tf.cast(flat_vectors, self.dtype)
        # One vector per compiled call: several could share a forward pass, but
        # tracing k unrolled products costs about k times one trace (12 s for
        # k = 16 on a small CNN) while running them saves little.
        products_on = (
            self._compiled_products if self.strategy is None
            else self._distributed_products
        )  # fmt: skip
        chunks = []
        for start in range(int(flat_vectors.shape[0])):
            chunk = flat_vectors[start : start + 1]
            chunks.append(
                self.data.weighted_mean(
                    lambda index, batch, chunk=chunk: products_on(
                        *batch, chunk, vec.seed_pair(self.sampling_seed, index)
                    )
                )
            )
        return tf.concat(chunks, axis=0)

    def _distributed_products(self, x, y, sample_weight, flat_vectors, batch_seed):
        """:meth:`_batch_products` of one batch, spread over the strategy's
        replicas: replica ``r`` takes rows ``[r n / R, (r + 1) n / R)``, weighs
        its mean-loss product by its share of the rows, and one all-reduce sums
        the shares."""
        strategy = self.strategy
        replicas = strategy.num_replicas_in_sync
        size = data_lib.batch_size(x)
        if size < replicas:
            raise ValueError(
                f"Each batch of `data` must have at least one example per replica "
                f"({replicas}) to spread products over `strategy`; a batch has {size}"
            )
        bounds = [size * r // replicas for r in range(replicas + 1)]

        def share(context):
            r = context.replica_id_in_sync_group
            rows = slice(bounds[r], bounds[r + 1])
            return tuple(
                None if part is None
                else tf.nest.map_structure(lambda t: t[rows], part)
                for part in (x, y, sample_weight)
            )  # fmt: skip

        shares = strategy.experimental_distribute_values_from_function(share)

        def on_replica(batch):
            bx, by, bw = batch
            rows = tf.shape(tf.nest.flatten(bx)[0])[0]
            weight = tf.cast(rows, self.dtype) / tf.cast(size, self.dtype)
            return self._compiled_products(bx, by, bw, flat_vectors, batch_seed) * weight

        per_replica = strategy.run(on_replica, args=(shares,))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    def _matvec(self, flat_vector: tf.Tensor) -> tf.Tensor:
        return self._matmat(flat_vector[None])[0]

    def vp(self, vectors: Sequence) -> list[tf.Tensor]:
        """The matrix times ``vectors`` (one tensor per variable, same shapes)."""
        if not isinstance(vectors, (list, tuple)) or len(vectors) != len(self.variables):
            raise ValueError(
                "Argument `vectors` must be a list of one tensor per variable "
                f"({len(self.variables)}). Received: a {type(vectors).__name__}"
                + (f" of {len(vectors)}" if isinstance(vectors, (list, tuple)) else "")
            )
        for index, (v, shape) in enumerate(zip(vectors, self.shapes)):
            if not hasattr(v, "shape") or tuple(v.shape) != shape:
                raise ValueError(
                    f"Argument `vectors` must be shaped like the variables: entry "
                    f"{index} should have shape {shape}. Received: "
                    f"{tuple(v.shape) if hasattr(v, 'shape') else v!r}"
                )
        flat = vec.flatten([tf.cast(v, self.dtype) for v in vectors])
        return vec.unflatten(self._matvec(flat), self.shapes)

    # -- small models -----------------------------------------------------------------

    def _check_dense_size(self, what: str, max_size: int | None) -> None:
        limit = (
            self.max_dense_size
            if max_size is None
            else check_integer("max_size", max_size)
        )
        if self.size > limit:
            raise ValueError(
                f"{what} needs {self.size} products and a {self.size}x{self.size} "
                f"matrix; this exceeds max_size={limit}. Pass max_size={self.size} "
                "(or a larger max_dense_size) to allow it, or use variables= to "
                "restrict the matrix to a block"
            )

    def _unit_products(self):
        """Yields ``(start, A[:, start:start+k]^T)`` for all unit vectors, in chunks."""
        identity_chunk = 64
        for start in range(0, self.size, identity_chunk):
            stop = min(start + identity_chunk, self.size)
            units = tf.one_hot(tf.range(start, stop), self.size, dtype=self.dtype)
            yield start, self._matmat(units)

    def dense(self, max_size: int | None = None) -> np.ndarray:
        """The full ``(P, P)`` matrix (variables flattened in order, C order).

        Costs ``P`` products; refused above ``max_size`` (default
        ``max_dense_size``) with a ``ValueError``.
        """
        self._check_dense_size("dense()", max_size)
        return np.concatenate([rows.numpy() for _, rows in self._unit_products()])

    # -- spectra ----------------------------------------------------------------------

    def eigenvalues(
        self,
        top_n: int = 1,
        method: str = "lanczos",
        tol: float = 1e-6,
        max_iter: int | None = None,
        seed: int = 0,
    ) -> tuple[np.ndarray, list[list[np.ndarray]]]:
        """Top eigenpairs: values (descending) and eigenvectors shaped like ``variables``.

        ``method="lanczos"`` (default) returns the ``top_n`` largest algebraic
        eigenvalues (for the most negative ones, use ``eigenvalues`` of
        ``-1 * operator`` via :meth:`negated`). ``method="power"`` is PyHessian's
        deflated power iteration, which finds the ``top_n`` largest in
        magnitude. ``max_iter`` bounds the products (Lanczos, default
        ``min(P, 300)``) or the iterations per pair (power, default 1000).
        """
        top_n = check_integer("top_n", top_n)
        if top_n > self.size:
            raise ValueError(
                f"Argument `top_n` must be at most the parameter count {self.size}. "
                f"Received: top_n={top_n}"
            )
        check_range("tol", tol, 0.0, low_inclusive=False)
        if method == "lanczos":
            max_iter = (
                min(self.size, 300)
                if max_iter is None
                else check_integer("max_iter", max_iter)
            )
            solver = lanczos_lib.top_eigenpairs
        elif method == "power":
            max_iter = (
                1000 if max_iter is None else check_integer("max_iter", max_iter)
            )
            solver = lanczos_lib.power_iteration
        else:
            check_choice("method", method, ("lanczos", "power"))
        values, vectors, self.last_num_products = solver(
            self._matvec, self.size, self.dtype, top_n, tol, max(max_iter, top_n),
            check_seed(seed),
        )
        return np.asarray(values), [
            [t.numpy() for t in vec.unflatten(v, self.shapes)] for v in vectors
        ]

    # -- traces, diagonals, densities ------------------------------------------------

    def trace(
        self, method: str = "hutchinson", num_samples: int = 100, seed: int = 0
    ) -> float:
        """The trace: ``"hutchinson"``, ``"hutch++"`` (``num_samples`` products each) or ``"exact"``."""
        num_samples = check_integer("num_samples", num_samples)
        seed = check_seed(seed)
        if method == "hutchinson":
            return trace_lib.hutchinson(
                self._matmat, self.size, self.dtype, num_samples, seed
            )
        if method == "hutch++":
            return trace_lib.hutch_plus_plus(
                self._matmat, self.size, self.dtype, num_samples, seed
            )
        if method == "exact":
            return float(np.sum(self.diagonal("exact")))
        raise ValueError(
            f"method must be 'hutchinson', 'hutch++' or 'exact', got {method!r}"
        )

    def diagonal(
        self, method: str = "exact", num_samples: int = 100, seed: int = 0
    ) -> np.ndarray:
        """The diagonal as one flat array (variables flattened in order).

        ``"exact"``: one product per parameter (refused above
        ``max_dense_size``); ``"hutchinson"``: mean of ``num_samples`` Rademacher
        estimates ``v * (A v)``; ``"curvature_propagation"``: Martens, Sutskever
        & Swersky (2012), ``num_samples`` samples, see
        :mod:`tfcurv.curvature.propagation`.
        """
        num_samples = check_integer("num_samples", num_samples)
        seed = check_seed(seed)
        if method == "exact":
            self._check_dense_size("diagonal('exact')", None)
            return diagonal_lib.exact(self._matmat, self.size, self.dtype).numpy()
        if method == "hutchinson":
            return diagonal_lib.hutchinson(
                self._matmat, self.size, self.dtype, num_samples, seed
            ).numpy()
        if method == "curvature_propagation":
            return self._curvature_propagation(num_samples, seed)
        raise ValueError(
            "method must be 'exact', 'hutchinson' or 'curvature_propagation', "
            f"got {method!r}"
        )

    def _propagation_estimator(self):
        """The Curvature Propagation estimator of this matrix (built and traced once)."""
        if getattr(self, "_propagation", None) is None:
            from tfcurv.curvature import propagation

            if not isinstance(self, (Hessian, GaussNewton)):
                raise ValueError(
                    "curvature_propagation estimates Hessian and Gauss-Newton "
                    f"diagonals only, not {type(self).__name__}"
                )
            self._propagation = propagation.CurvaturePropagation(
                self.model,
                self.loss,
                self.variables,
                gauss_newton=isinstance(self, GaussNewton),
                training=self.training,
            )
        return self._propagation

    def _curvature_propagation(self, num_samples: int, seed: int) -> np.ndarray:
        estimator = self._propagation_estimator()
        return self.data.weighted_mean(
            lambda _, batch: estimator.diagonal(
                *batch, num_samples=num_samples, seed=seed
            )
        ).numpy()

    def density(
        self, num_iter: int = 100, num_runs: int = 1, seed: int = 0
    ) -> density_lib.SpectralDensity:
        """Stochastic Lanczos quadrature: ``num_runs`` runs of ``num_iter`` products."""
        num_iter = check_integer("num_iter", num_iter)
        num_runs = check_integer("num_runs", num_runs)
        seed = check_seed(seed)
        return density_lib.stochastic_lanczos_quadrature(
            self._matvec, self.size, self.dtype, num_iter, num_runs, seed
        )

    def negated(self) -> CurvatureOperator:
        """The same operator times -1 (its top eigenvalues are this one's bottom ones)."""
        return _Negated(self)


class _Negated(CurvatureOperator):
    def __init__(self, operator: CurvatureOperator):
        self.__dict__.update(operator.__dict__)
        self._compiled_products = operator._compiled_products

    def _matmat(self, flat_vectors):
        return -CurvatureOperator._matmat(self, flat_vectors)


class Hessian(CurvatureOperator):
    """The Hessian of the mean loss (plus regularisation) with respect to ``variables``."""

    def _products_on_batch(self, x, y, sample_weight, vectors, batch_seed):
        return products.hessian_vector_products(
            lambda: self._loss(x, y, sample_weight), self.variables, vectors, self.mode
        )


class OutputSpaceOperator(CurvatureOperator):
    """A matrix ``J^T M J`` through the model outputs, plus the regularisation Hessian.

    ``J`` is the Jacobian of the model outputs (logits, for cross-entropies with
    ``from_logits=True``) and ``M`` a curvature of the loss in output space,
    given by :meth:`_output_space_products`. The Hessian of the regularisation
    losses is added exactly (for L2 weight penalties a multiple of the identity).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.mode != "reverse_over_reverse":
            raise ValueError(
                f"{type(self).__name__} supports only mode='reverse_over_reverse'"
            )

    def _output_space_products(self, outputs_fn, y, sample_weight, vectors, seed):
        raise NotImplementedError

    def _products_on_batch(self, x, y, sample_weight, vectors, batch_seed):
        regularisation_holder = []

        def outputs_fn():
            outputs, regularisation = self._outputs_and_regularisation(x)
            regularisation_holder.append(regularisation)
            return outputs

        results = self._output_space_products(
            outputs_fn, y, sample_weight, vectors, batch_seed
        )
        if regularisation_holder[0] is not None:
            regularised = products.hessian_vector_products(
                lambda: self._outputs_and_regularisation(x)[1], self.variables, vectors
            )
            results = [
                [a + b for a, b in zip(r, q)] for r, q in zip(results, regularised)
            ]
        return results


class GaussNewton(OutputSpaceOperator):
    """The generalised Gauss-Newton matrix ``J^T (d^2 loss / d outputs^2) J``.

    ``J`` is the Jacobian of the model outputs (logits, for cross-entropies
    with ``from_logits=True``). The Hessian of the regularisation losses is
    added exactly (for L2 weight penalties it is a multiple of the identity).
    """

    def _output_space_products(self, outputs_fn, y, sample_weight, vectors, seed):
        return products.gauss_newton_vector_products(
            outputs_fn,
            lambda outputs: self._mean_loss(y, outputs, sample_weight),
            self.variables,
            vectors,
        )
