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

import contextlib
import dataclasses
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
    check_verbose,
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


@dataclasses.dataclass
class SolveResult:
    """What :meth:`CurvatureOperator.solve` found.

    Attributes:
        x: the solution, one array per variable.
        iterations: products spent (one per conjugate-gradient iteration).
        relative_residual: ``||b - (A + damping I) x|| / ||b||``, recomputed
            from ``x``.
        converged: whether ``relative_residual`` is at most ``tol``.
        stop_reason: ``"converged"``, ``"max_iter"``, ``"non-positive
            curvature"`` (the damped matrix is not positive definite along a
            search direction; ``x`` is the last iterate), ``"rounding"`` (CG's
            recurrence reached ``tol`` but the recomputed residual did not:
            the precision of the products, float32 for instance, limits what
            can be reached) or ``"b is zero"``.
        residual_history: the recurrence's relative residual norm before each
            iteration and after the last.
    """

    x: list
    iterations: int
    relative_residual: float
    converged: bool
    stop_reason: str
    residual_history: np.ndarray


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
        progress: what ``verbose="auto"`` of the estimates means: ``True``,
            one progress bar per estimate; ``False``, none; ``None``
            (default), a bar for datasets of more than 20 batches.
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
        self._compile()
        self._bar = None

    def _compile(self) -> None:
        self._compiled_products = tf.function(
            self._batch_products, reduce_retracing=True
        )
        self._compiled_tridiagonal = tf.function(
            self._tridiagonal_on_batch, reduce_retracing=True
        )

    def _tridiagonal_on_batch(self, x, y, sample_weight, batch_seed, start, num_iter):
        """A whole Lanczos recurrence on one batch in one compiled call: one
        forward pass, then one backward pass per step, in a ``tf.while_loop``."""
        product = self._flat_product_fn(x, y, sample_weight, batch_seed)
        return lanczos_lib.lanczos_tridiagonal_in_graph(product, start, num_iter)

    def _in_graph_tridiagonal(self):
        """``(start, num_iter) -> (alphas, betas)`` compiled whole, where the data
        is one batch on one device (else ``None``: products go one by one)."""
        batch = self.data.single_batch
        if batch is None or self.strategy is not None:
            return None

        def tridiagonal(start, num_iter):
            alphas, betas = self._compiled_tridiagonal(
                *batch, vec.seed_pair(self.sampling_seed, 0), start,
                tf.constant(num_iter),
            )  # fmt: skip
            if self._bar is not None:
                self._products_before += int(alphas.shape[0])
                self._bar.update(self._products_before, finalize=False)
            return alphas.numpy(), betas.numpy()

        return tridiagonal

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

    # -1 for the negated operator.
    _sign = 1.0

    def _product_fn_on_batch(self, x, y, sample_weight, batch_seed):
        """Runs the forward pass on one batch and returns ``v -> A v`` (one tensor
        per variable in and out) that reuses it."""
        raise NotImplementedError

    def _flat_product_fn(self, x, y, sample_weight, batch_seed):
        """:meth:`_product_fn_on_batch` on flat vectors, with the sign applied."""
        product = self._product_fn_on_batch(x, y, sample_weight, batch_seed)
        sign = tf.constant(self._sign, self.dtype)
        return lambda flat: sign * vec.flatten(product(vec.unflatten(flat, self.shapes)))

    def _batch_products(self, x, y, sample_weight, flat_vectors, batch_seed):
        """``A V^T`` on one batch, for the rows of ``flat_vectors`` (compiled):
        one forward and gradient pass, then one backward pass per row, in a
        ``tf.while_loop`` (so one trace serves every number of rows)."""
        product = self._flat_product_fn(x, y, sample_weight, batch_seed)
        count = tf.shape(flat_vectors)[0]
        results = tf.TensorArray(self.dtype, size=count, element_shape=[self.size])

        def body(index, results):
            return index + 1, results.write(index, product(flat_vectors[index]))

        _, results = tf.while_loop(
            lambda index, _: index < count, body, (tf.constant(0), results)
        )
        return results.stack()

    def _matmat(self, flat_vectors: tf.Tensor) -> tf.Tensor:
        """Products with the rows of ``flat_vectors`` (k, P), over all of ``data``."""
        flat_vectors = tf.cast(flat_vectors, self.dtype)
        # All rows in one compiled call per batch: one forward pass for them all.
        products_on = (
            self._compiled_products if self.strategy is None
            else self._distributed_products
        )  # fmt: skip
        self._block = int(flat_vectors.shape[0])
        result = self.data.weighted_mean(
            lambda index, batch: products_on(
                *batch, flat_vectors, vec.seed_pair(self.sampling_seed, index)
            ),
            self._on_batch,
        )
        if self._bar is not None:
            self._products_before += self._block
            self._bar.update(self._products_before, finalize=False)
        return result

    # -- progress: one bar per estimate ------------------------------------------------

    def _on_batch(self, batches_done: int) -> None:
        """Moves the current estimate's bar by a product's share of a pass."""
        total = self.data.num_batches
        if self._bar is not None and total and batches_done < total:
            self._bar.update(
                self._products_before + self._block * batches_done / total,
                finalize=False,
            )

    @contextlib.contextmanager
    def _estimate(self, num_products: int | None, verbose):
        """One Keras ``Progbar`` counting the products of one estimate.

        ``verbose``: ``"auto"`` (the constructor's ``progress``), 0 (silent),
        1 (a bar) or 2 (one line at the end), as in ``model.fit``. An
        estimate inside another (``trace("exact")`` runs ``diagonal``) adds to
        the outer bar.
        """
        if check_verbose(verbose) == "auto":
            verbose = 1 if self.data.progress else 0
        if self._bar is not None or verbose == 0:
            yield
            return
        self._bar = keras.utils.Progbar(
            num_products, verbose=verbose, unit_name="product"
        )
        self._products_before = 0
        try:
            yield
        finally:
            bar, self._bar = self._bar, None
            bar.target = max(self._products_before, 1)
            bar.update(self._products_before, finalize=True)

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

    def _flat(self, vectors: Sequence, argument: str) -> tf.Tensor:
        """``vectors`` (one tensor per variable, same shapes) as one flat vector."""
        if not isinstance(vectors, (list, tuple)) or len(vectors) != len(self.variables):
            raise ValueError(
                f"Argument `{argument}` must be a list of one tensor per variable "
                f"({len(self.variables)}). Received: a {type(vectors).__name__}"
                + (f" of {len(vectors)}" if isinstance(vectors, (list, tuple)) else "")
            )
        for index, (v, shape) in enumerate(zip(vectors, self.shapes)):
            if not hasattr(v, "shape") or tuple(v.shape) != shape:
                raise ValueError(
                    f"Argument `{argument}` must be shaped like the variables: entry "
                    f"{index} should have shape {shape}. Received: "
                    f"{tuple(v.shape) if hasattr(v, 'shape') else v!r}"
                )
        return vec.flatten([tf.cast(v, self.dtype) for v in vectors])

    def vp(self, vectors: Sequence) -> list[tf.Tensor]:
        """The matrix times ``vectors`` (one tensor per variable, same shapes)."""
        return vec.unflatten(self._matvec(self._flat(vectors, "vectors")), self.shapes)

    # -- the operator for other libraries and solvers -----------------------------------

    def to_scipy(self):
        """This matrix as a ``scipy.sparse.linalg.LinearOperator`` of shape ``(P, P)``.

        Its products run in TensorFlow (the same compiled products as
        :meth:`vp`, over all of ``data``), on flat NumPy vectors in the order
        of ``variables`` (each flattened in C order); ``matmat`` sends its
        columns one product each. Any SciPy solver or eigensolver then works
        on it, for example ``scipy.sparse.linalg.eigsh(op.to_scipy(), k=3)``.
        Needs SciPy (``pip install scipy``).
        """
        try:
            from scipy.sparse import linalg as scipy_linalg
        except ImportError as error:  # pragma: no cover - scipy is a test dependency
            raise ImportError(
                "to_scipy() needs SciPy: pip install scipy"
            ) from error
        numpy_dtype = np.dtype(self.dtype.as_numpy_dtype)

        def matvec(v):
            flat = tf.constant(np.asarray(v, numpy_dtype).reshape(-1))
            return self._matvec(flat).numpy()

        def matmat(columns):
            rows = tf.constant(np.asarray(columns, numpy_dtype).T)
            return self._matmat(rows).numpy().T

        return scipy_linalg.LinearOperator(
            (self.size, self.size),
            matvec=matvec,
            rmatvec=matvec,
            matmat=matmat,
            rmatmat=matmat,
            dtype=numpy_dtype,
        )

    def solve(
        self,
        b: Sequence,
        damping: float = 0.0,
        method: str = "cg",
        tol: float = 1e-6,
        max_iter: int | None = None,
        verbose="auto",
    ) -> SolveResult:
        """Solves ``(A + damping I) x = b`` by conjugate gradients.

        ``b`` is one tensor per variable (like :meth:`vp`). Stops when the
        residual norm ``||b - (A + damping I) x||`` is at most ``tol ||b||``,
        after ``max_iter`` products (default ``min(P, 1000)``), or when a search
        direction has non-positive curvature: conjugate gradients needs a
        positive-definite matrix, which a Hessian need not be (add
        ``damping``, or solve with :class:`~tfcurv.GaussNewton` or :class:`~tfcurv.Fisher`).
        The residual is recomputed from ``x`` at the end, so the reported
        norm is the true one, not CG's recurrence. Returns a
        :class:`~tfcurv.curvature.SolveResult` with ``x`` shaped like the variables and the
        iteration report. The recurrence runs in float64.
        """
        check_choice("method", method, ("cg",))
        check_range("damping", damping, 0.0)
        check_range("tol", tol, 0.0, low_inclusive=False)
        max_iter = (
            min(self.size, 1000) if max_iter is None
            else check_integer("max_iter", max_iter)
        )  # fmt: skip
        rhs = tf.cast(self._flat(b, "b"), tf.float64)

        def damped(v):
            product = tf.cast(self._matvec(tf.cast(v, self.dtype)), tf.float64)
            return product + damping * v

        target = tol * float(tf.norm(rhs))
        x = tf.zeros_like(rhs)
        residual, history, stop = rhs, [float(tf.norm(rhs))], None
        with self._estimate(max_iter + 1, verbose):
            if history[0] == 0.0:
                stop = "b is zero"
            direction, residual_square = residual, history[0] ** 2
            iterations = 0
            while stop is None:
                if history[-1] <= target:
                    stop = "converged"
                    break
                if iterations >= max_iter:
                    stop = "max_iter"
                    break
                product = damped(direction)
                curvature = float(tf.tensordot(direction, product, 1))
                iterations += 1
                if curvature <= 0.0:
                    stop = "non-positive curvature"
                    break
                step = residual_square / curvature
                x += step * direction
                residual -= step * product
                new_square = float(tf.tensordot(residual, residual, 1))
                direction = residual + (new_square / residual_square) * direction
                residual_square = new_square
                history.append(new_square**0.5)
            true_residual = float(tf.norm(rhs - damped(x))) if iterations else history[0]
        if stop == "converged" and true_residual > target:
            stop = "rounding"
        reference = history[0] or 1.0
        return SolveResult(
            x=[t.numpy() for t in vec.unflatten(tf.cast(x, self.dtype), self.shapes)],
            iterations=iterations,
            relative_residual=true_residual / reference,
            converged=true_residual <= target,
            stop_reason=stop,
            residual_history=np.asarray(history) / reference,
        )

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

    def dense(self, max_size: int | None = None, verbose="auto") -> np.ndarray:
        """The full ``(P, P)`` matrix (variables flattened in order, C order).

        Costs ``P`` products; refused above ``max_size`` (default
        ``max_dense_size``) with a ``ValueError``.
        """
        self._check_dense_size("dense()", max_size)
        with self._estimate(self.size, verbose):
            return np.concatenate(
                [rows.numpy() for _, rows in self._unit_products()]
            )

    # -- spectra ----------------------------------------------------------------------

    def eigenvalues(
        self,
        top_n: int = 1,
        method: str = "lanczos",
        tol: float = 1e-6,
        max_iter: int | None = None,
        seed: int = 0,
        basis_size: int | None = None,
        verbose="auto",
    ) -> tuple[np.ndarray, list[list[np.ndarray]]]:
        """Top eigenpairs: values (descending) and eigenvectors shaped like ``variables``.

        ``method="lanczos"`` (default) returns the ``top_n`` largest algebraic
        eigenvalues (for the most negative ones, use ``eigenvalues`` of
        ``-1 * operator`` via :meth:`negated`), by thick-restart Lanczos: it
        holds a basis of ``basis_size`` parameter vectors (in the operator's dtype, used in float64; default
        ``max(top_n + 10, 20)``), however many products it takes.
        ``method="power"`` is PyHessian's deflated power iteration, which finds
        the ``top_n`` largest in magnitude. ``tol``: a pair is converged when
        its residual norm is at most ``tol`` times the largest Ritz value
        (Lanczos) or its Rayleigh quotient changes by at most ``tol`` relative
        (power). ``max_iter`` bounds the products (Lanczos, default 300) or
        the iterations per pair (power, default 1000); the number used is
        ``last_num_products`` afterwards.
        """
        top_n = check_integer("top_n", top_n)
        if top_n > self.size:
            raise ValueError(
                f"Argument `top_n` must be at most the parameter count {self.size}. "
                f"Received: top_n={top_n}"
            )
        check_range("tol", tol, 0.0, low_inclusive=False)
        seed = check_seed(seed)
        if method == "lanczos":
            max_iter = 300 if max_iter is None else check_integer("max_iter", max_iter)
            if basis_size is not None:
                check_integer("basis_size", basis_size, top_n + 2)
            target = max(max_iter, top_n)
            with self._estimate(target, verbose):
                values, vectors, self.last_num_products = lanczos_lib.top_eigenpairs(
                    self._matvec, self.size, self.dtype, top_n, tol, target, seed,
                    basis_size,
                )  # fmt: skip
        elif method == "power":
            max_iter = (
                1000 if max_iter is None else check_integer("max_iter", max_iter)
            )
            with self._estimate(None, verbose):
                values, vectors, self.last_num_products = lanczos_lib.power_iteration(
                    self._matvec, self.size, self.dtype, top_n, tol,
                    max(max_iter, top_n), seed,
                )  # fmt: skip
        else:
            check_choice("method", method, ("lanczos", "power"))
        return np.asarray(values), [
            [t.numpy() for t in vec.unflatten(v, self.shapes)] for v in vectors
        ]

    # -- traces, diagonals, densities ------------------------------------------------

    def trace(
        self,
        method: str = "hutchinson",
        num_samples: int = 100,
        seed: int = 0,
        verbose="auto",
    ) -> float:
        """The trace: ``"hutchinson"``, ``"hutch++"`` (``num_samples`` products each) or ``"exact"``."""
        check_choice("method", method, ("hutchinson", "hutch++", "exact"))
        num_samples = check_integer("num_samples", num_samples)
        seed = check_seed(seed)
        if method == "exact":
            return float(np.sum(self.diagonal("exact", verbose=verbose)))
        with self._estimate(num_samples, verbose):
            if method == "hutchinson":
                return trace_lib.hutchinson(
                    self._matmat, self.size, self.dtype, num_samples, seed
                )
            return trace_lib.hutch_plus_plus(
                self._matmat, self.size, self.dtype, num_samples, seed
            )

    def diagonal(
        self,
        method: str = "exact",
        num_samples: int = 100,
        seed: int = 0,
        verbose="auto",
    ) -> np.ndarray:
        """The diagonal as one flat array (variables flattened in order).

        ``"exact"``: one product per parameter (refused above
        ``max_dense_size``); ``"hutchinson"``: mean of ``num_samples`` Rademacher
        estimates ``v * (A v)``; ``"curvature_propagation"``: Martens, Sutskever
        & Swersky (2012), ``num_samples`` samples, see
        the module ``tfcurv.curvature.propagation`` (no products, so no progress bar).
        """
        check_choice(
            "method", method, ("exact", "hutchinson", "curvature_propagation")
        )
        num_samples = check_integer("num_samples", num_samples)
        seed = check_seed(seed)
        if method == "curvature_propagation":
            return self._curvature_propagation(num_samples, seed)
        if method == "exact":
            self._check_dense_size("diagonal('exact')", None)
            with self._estimate(self.size, verbose):
                return diagonal_lib.exact(self._matmat, self.size, self.dtype).numpy()
        with self._estimate(num_samples, verbose):
            return diagonal_lib.hutchinson(
                self._matmat, self.size, self.dtype, num_samples, seed
            ).numpy()

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
        self,
        num_iter: int = 100,
        num_runs: int = 1,
        seed: int = 0,
        reorthogonalize: bool = False,
        verbose="auto",
    ) -> density_lib.SpectralDensity:
        """Stochastic Lanczos quadrature: ``num_runs`` runs of ``num_iter`` products.

        Each run holds three parameter vectors: the quadrature needs only the
        tridiagonal, and stays accurate without re-orthogonalisation (see
        the module ``tfcurv.curvature.lanczos``). ``reorthogonalize=True`` keeps the
        basis (``num_iter`` vectors) and re-orthogonalises against it, which
        gives Ritz values free of the repeated copies of converged eigenvalues
        that finite precision otherwise adds (their weights still sum right).
        """
        num_iter = check_integer("num_iter", num_iter)
        num_runs = check_integer("num_runs", num_runs)
        seed = check_seed(seed)
        check_bool("reorthogonalize", reorthogonalize)
        with self._estimate(num_iter * num_runs, verbose):
            return density_lib.stochastic_lanczos_quadrature(
                self._matvec, self.size, self.dtype, num_iter, num_runs, seed,
                reorthogonalize, tridiagonal=self._in_graph_tridiagonal(),
            )  # fmt: skip

    def negated(self) -> CurvatureOperator:
        """The same operator times -1 (its top eigenvalues are this one's bottom ones)."""
        return _Negated(self)


class _Negated(CurvatureOperator):
    def __init__(self, operator: CurvatureOperator):
        self.__dict__.update(operator.__dict__)
        self._sign = -operator._sign
        self._original = operator
        self._compile()

    def _product_fn_on_batch(self, x, y, sample_weight, batch_seed):
        return self._original._product_fn_on_batch(x, y, sample_weight, batch_seed)


class Hessian(CurvatureOperator):
    """The Hessian of the mean loss (plus regularisation) with respect to ``variables``."""

    def _product_fn_on_batch(self, x, y, sample_weight, batch_seed):
        return products.hessian_product_fn(
            lambda: self._loss(x, y, sample_weight), self.variables, self.mode
        )


class OutputSpaceOperator(CurvatureOperator):
    """A matrix ``J^T M J`` through the model outputs, plus the regularisation Hessian.

    ``J`` is the Jacobian of the model outputs (logits, for cross-entropies with
    ``from_logits=True``) and ``M`` a curvature of the loss in output space,
    given by :meth:`_output_space_product_fn`. The Hessian of the regularisation
    losses is added exactly (for L2 weight penalties a multiple of the identity).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.mode != "reverse_over_reverse":
            raise ValueError(
                f"{type(self).__name__} supports only mode='reverse_over_reverse'"
            )

    def _output_space_product_fn(self, outputs_fn, y, sample_weight, seed):
        raise NotImplementedError

    def _product_fn_on_batch(self, x, y, sample_weight, batch_seed):
        regularisation_holder = []

        def outputs_fn():
            outputs, regularisation = self._outputs_and_regularisation(x)
            regularisation_holder.append(regularisation)
            return outputs

        product = self._output_space_product_fn(outputs_fn, y, sample_weight, batch_seed)
        if regularisation_holder[0] is None:
            return product
        regularised = products.hessian_product_fn(
            lambda: self._outputs_and_regularisation(x)[1], self.variables
        )
        return lambda v: [a + b for a, b in zip(product(v), regularised(v))]


class GaussNewton(OutputSpaceOperator):
    """The generalised Gauss-Newton matrix ``J^T (d^2 loss / d outputs^2) J``.

    ``J`` is the Jacobian of the model outputs (logits, for cross-entropies
    with ``from_logits=True``). The Hessian of the regularisation losses is
    added exactly (for L2 weight penalties it is a multiple of the identity).
    """

    def _output_space_product_fn(self, outputs_fn, y, sample_weight, seed):
        return products.gauss_newton_product_fn(
            outputs_fn,
            lambda outputs: self._mean_loss(y, outputs, sample_weight),
            self.variables,
        )
