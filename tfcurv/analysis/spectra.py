"""Hessian eigenpairs of a whole model and of its layers (Haink 2023, §5.3 steps 4-5).

Built on :class:`tfcurv.Hessian`: a block small enough is diagonalised exactly
(``dense()`` then ``numpy.linalg.eigh``, as the official code does for small
layers); a larger one by Lanczos. Eigenvalues are in decreasing signed order.

* :func:`hessian_eigenpairs`: the top eigenpairs of the Hessian restricted to a
  set of variables, as flat rows with the variable layout kept alongside;
* :func:`compare_layers`: the top eigenvalues of every variable's own Hessian
  block next to those of the whole network, the localisation of the network's
  eigenvectors in the variables, and the overlap of each block's top eigenvector
  with the variable's slice of the network's eigenvectors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import keras
import numpy as np

from tfcurv.analysis.overlaps import localisation, overlap_matrix, split_rows
from tfcurv.analysis.results import SavableResult
from tfcurv.curvature.layers import select_variables
from tfcurv.curvature.losses import compiled_loss
from tfcurv.curvature.operators import Hessian


@dataclasses.dataclass
class Eigenpairs(SavableResult):
    """Eigenpairs of a Hessian block, eigenvalues in decreasing signed order.

    Attributes:
        values: (k,) eigenvalues.
        vectors: (k, P) unit eigenvectors, variables flattened in C order and
            concatenated in the order of ``variable_names``.
        variable_names: (n,) Keras variable paths.
        variable_shapes: (n, max ndim) shapes, padded with -1.
        exact: whether they come from a dense eigendecomposition (else Lanczos).
    """

    values: np.ndarray
    vectors: np.ndarray
    variable_names: np.ndarray
    variable_shapes: np.ndarray
    exact: bool

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """The variable shapes as tuples."""
        return [tuple(int(d) for d in row if d >= 0) for row in self.variable_shapes]

    def by_magnitude(self) -> Eigenpairs:
        """The same pairs ordered by decreasing ``|lambda|`` (the paper's ``accabs`` order)."""
        order = np.argsort(-np.abs(self.values), kind="stable")
        return dataclasses.replace(
            self, values=self.values[order], vectors=self.vectors[order]
        )

    def restricted_to(self, name: str) -> np.ndarray:
        """The (k, P_v) slice of the eigenvectors that lives on variable ``name``."""
        names = [str(n) for n in self.variable_names]
        matches = [
            i for i, n in enumerate(names) if n == name or n.endswith("/" + name)
        ]
        if len(matches) != 1:
            raise ValueError(
                f"`name` must name one of {names}. Received: name={name!r}"
            )
        return split_rows(self.vectors, self.shapes)[matches[0]]


@dataclasses.dataclass
class LayerComparison(SavableResult):
    """Layer-wise against network-wide Hessian spectra.

    Attributes:
        variable_names: (n,) the blocks compared (variable paths joined by "+").
        network_values: (k,) top eigenvalues of the Hessian of all ``variables``.
        layer_values: (n, k) top eigenvalues of each block's own Hessian (NaN where a
            block has fewer than k parameters).
        localisation: (k, n) share of each network eigenvector's squared norm in
            each block (rows sum to 1).
        top_overlap: (n, k) ``|h_1^layer . h_i^network|_layer / ||h_i^network|_layer||``:
            how well each block's top eigenvector matches the variable's slice of
            the i-th network eigenvector.
    """

    variable_names: np.ndarray
    network_values: np.ndarray
    layer_values: np.ndarray
    localisation: np.ndarray
    top_overlap: np.ndarray


def hessian_eigenpairs(
    model: keras.Model,
    loss,
    data,
    variables: Sequence | None = None,
    top_n: int | None = 5,
    dense_max_size: int = 3000,
    training: bool = False,
    tol: float = 1e-6,
    max_iter: int | None = None,
    seed: int = 0,
) -> Eigenpairs:
    """The top eigenpairs of the Hessian of ``loss`` on ``data`` w.r.t. ``variables``.

    Args:
        model, loss, data, training: as for :class:`tfcurv.Hessian` (``loss``
            ``None`` means the model's compiled loss).
        variables: ``None`` (all trainable variables) or variables, layers, layer
            names or variable paths (as for :class:`WeightTrajectory`).
        top_n: how many pairs; ``None`` for all of them (exact blocks only).
        dense_max_size: blocks of at most this many parameters are diagonalised
            exactly from the dense matrix; larger ones use Lanczos.
        tol, max_iter, seed: passed to ``Hessian.eigenvalues`` for Lanczos.
    """
    chosen = select_variables(model, variables)
    hessian = Hessian(
        model, compiled_loss(model, loss), data, training=training, variables=chosen
    )
    size = hessian.size
    if top_n is not None and (
        isinstance(top_n, bool)
        or not isinstance(top_n, (int, np.integer))
        or not 1 <= top_n <= size
    ):
        raise ValueError(
            f"`top_n` must be an integer in [1, {size}] or None. Received: top_n={top_n!r}"
        )
    if size <= dense_max_size:
        values, vectors = np.linalg.eigh(
            _symmetric(hessian.dense(max_size=size).astype(np.float64))
        )
        order = np.argsort(values)[::-1][: size if top_n is None else top_n]
        values, rows, exact = values[order], vectors[:, order].T, True
    elif top_n is None:
        raise ValueError(
            f"`top_n=None` (all eigenpairs) needs the dense matrix, but the block has {size} "
            f"parameters, more than dense_max_size={dense_max_size}"
        )
    else:
        values, vectors = hessian.eigenvalues(
            top_n, method="lanczos", tol=tol, max_iter=max_iter, seed=seed
        )
        rows = np.stack(
            [np.concatenate([np.ravel(p) for p in v]) for v in vectors]
        ).astype(np.float64)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        exact = False
    return Eigenpairs(
        values=np.asarray(values, np.float64),
        vectors=rows,
        variable_names=np.array([v.path for v in chosen]),
        variable_shapes=_padded_shapes([tuple(v.shape) for v in chosen]),
        exact=exact,
    )


def compare_layers(
    model: keras.Model,
    loss,
    data,
    variables: Sequence | None = None,
    top_n: int = 5,
    network: Eigenpairs | None = None,
    **eigen_kwargs,
) -> LayerComparison:
    """Top eigenvalues of every block's Hessian next to the whole network's.

    Args:
        variables: the blocks: ``None`` for one block per trainable variable (the
            paper's kernels and biases), or a list whose entries are each one block:
            a layer or layer name (all its trainable variables) or one variable.
        top_n: eigenvalues per block and for the network.
        network: eigenpairs of all the blocks' variables, in order, computed before
            (with at least ``top_n`` pairs), to avoid computing them again.
        eigen_kwargs: passed to :func:`hessian_eigenpairs`.
    """
    blocks = _blocks(model, variables)
    chosen = [v for block in blocks for v in block]
    if network is None:
        network = hessian_eigenpairs(model, loss, data, chosen, top_n, **eigen_kwargs)
    if [str(n) for n in network.variable_names] != [v.path for v in chosen] or len(
        network.values
    ) < top_n:
        raise ValueError(
            "`network` must hold at least `top_n` eigenpairs of exactly the compared variables"
        )
    block_shapes = [(sum(int(np.prod(v.shape)) for v in block),) for block in blocks]
    slices = split_rows(network.vectors[:top_n], block_shapes)
    layer_values, top_overlap = [], []
    for block, network_slice, (size,) in zip(blocks, slices, block_shapes):
        pairs = hessian_eigenpairs(
            model, loss, data, block, min(top_n, size), **eigen_kwargs
        )
        layer_values.append(_pad(pairs.values, top_n))
        top_overlap.append(overlap_matrix(pairs.vectors[:1], network_slice)[0])
    return LayerComparison(
        variable_names=np.array([_block_name(block) for block in blocks]),
        network_values=network.values[:top_n],
        layer_values=np.stack(layer_values),
        localisation=localisation(network.vectors[:top_n], block_shapes),
        top_overlap=np.stack(top_overlap),
    )


def _blocks(model: keras.Model, variables: Sequence | None) -> list[list]:
    if variables is None:
        return [[v] for v in model.trainable_variables]
    items = (
        [variables]
        if isinstance(variables, (str, keras.layers.Layer))
        else list(variables)
    )
    return [select_variables(model, [item]) for item in items]


def _block_name(block: list) -> str:
    if len(block) == 1:
        return block[0].path
    return "+".join(v.path for v in block)


def _symmetric(matrix: np.ndarray) -> np.ndarray:
    """The symmetric part (the dense matrix is symmetric up to rounding)."""
    return 0.5 * (matrix + matrix.T)


def _padded_shapes(shapes: list[tuple[int, ...]]) -> np.ndarray:
    width = max(1, max(len(s) for s in shapes))
    return np.array([list(s) + [-1] * (width - len(s)) for s in shapes], dtype=np.int64)


def _pad(values: np.ndarray, length: int) -> np.ndarray:
    """``values`` padded with NaN to ``length`` (a variable with fewer parameters)."""
    return np.concatenate([values, np.full(length - len(values), np.nan)])
