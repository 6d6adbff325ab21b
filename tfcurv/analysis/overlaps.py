"""Overlaps between directions in weight space (Haink 2023, §5.3 step 5).

Pure numpy: vectors are rows of a (k, P) array, or the eigenvectors returned by
``tfcurv.Hessian.eigenvalues`` (one list of arrays per eigenpair, shaped like the
variables), flattened in C order and concatenated in variable order.

* :func:`overlap_matrix`: ``|a_i . b_j|`` (e.g. principal components vs Hessian
  eigenvectors, the ``pvhc`` maps of the paper);
* :func:`extended_singular_vectors`: ``vec(s_j u_j v_j^T) / ||.||`` of a weight
  matrix, conv kernels (k_h, k_w, C_in, C_out) reshaped to (k_h k_w, C_in C_out);
* :func:`weight_alignment`: ``w . h_i / ||w||`` for every eigenvector;
* :func:`localisation`: the share of ``||h_i||^2`` in every variable.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from tfcurv.analysis.results import SavableResult


@dataclasses.dataclass
class SingularDirections(SavableResult):
    """Extended singular vectors of a weight matrix.

    Attributes:
        singular_values: (k,) descending.
        vectors: (k, P) unit rows ``vec(u_j v_j^T)``, in the kernel's own C-order
            flattening (so they compare directly with Hessian eigenvectors).
        matrix_shape: the 2-D shape the kernel was reshaped to for the SVD.
    """

    singular_values: np.ndarray
    vectors: np.ndarray
    matrix_shape: np.ndarray


def as_rows(vectors) -> np.ndarray:
    """Directions as a float64 (k, P) array.

    Accepts a (k, P) or (P,) array, or a list of eigenvectors, each a list of
    arrays (one per variable) as ``tfcurv.Hessian.eigenvalues`` returns them.
    """
    if isinstance(vectors, np.ndarray):
        rows = np.asarray(vectors, np.float64)
        return rows[None, :] if rows.ndim == 1 else rows.reshape(len(rows), -1)
    rows = []
    for vector in vectors:
        if isinstance(vector, (list, tuple)):
            rows.append(
                np.concatenate(
                    [np.ravel(np.asarray(part, np.float64)) for part in vector]
                )
            )
        else:
            rows.append(np.ravel(np.asarray(vector, np.float64)))
    if not rows:
        raise ValueError("`vectors` must hold at least one direction")
    return np.stack(rows)


def overlap_matrix(a, b) -> np.ndarray:
    """Absolute cosines ``|a_i·b_j| / (||a_i|| ||b_j||)``, shape (len(a), len(b)); 1 = same direction."""
    a, b = _unit_rows(as_rows(a), "a"), _unit_rows(as_rows(b), "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"`a` and `b` must have the same number of parameters; got {a.shape[1]} and {b.shape[1]}"
        )
    return np.abs(a @ b.T)


def best_overlap(directions, target) -> tuple[float, int]:
    """The largest ``|d_j·t|`` over the rows ``d_j`` of ``directions``, and its index j."""
    overlaps = overlap_matrix(directions, target)[:, 0]
    index = int(np.argmax(overlaps))
    return float(overlaps[index]), index


def matrix_view_shape(shape: Sequence[int]) -> tuple[int, int]:
    """The 2-D shape a kernel is read as for its SVD.

    A Dense kernel (in, out) stays as it is; a kernel (k_1, ..., k_n, C_in, C_out)
    of a convolution becomes (k_1 ... k_n, C_in C_out), the reshaping of the
    official code, which keeps the C-order flattening of the kernel.
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2:
        raise ValueError(
            f"`kernel` must have at least 2 dimensions for an SVD. Received shape {shape}"
        )
    if len(shape) == 2:
        return shape
    return int(np.prod(shape[:-2])), shape[-2] * shape[-1]


def extended_singular_vectors(kernel, top_n: int | None = None) -> SingularDirections:
    """Extended singular vectors ``vec(s_j u_j v_j^T)/||.||`` of a kernel, by decreasing s_j."""
    kernel = np.asarray(kernel, np.float64)
    rows, cols = matrix_view_shape(kernel.shape)
    u, s, vt = np.linalg.svd(kernel.reshape(rows, cols), full_matrices=False)
    count = len(s) if top_n is None else int(top_n)
    if not 1 <= count <= len(s):
        raise ValueError(
            f"`top_n` must be in [1, {len(s)}] or None. Received: top_n={top_n!r}"
        )
    vectors = np.einsum("ik,jk->kij", u[:, :count], vt[:count].T).reshape(count, -1)
    return SingularDirections(
        singular_values=s[:count], vectors=vectors, matrix_shape=np.array([rows, cols])
    )


def weight_alignment(weights, eigenvectors) -> np.ndarray:
    """Alignment ``w·h_i / ||w||`` for every eigenvector ``h_i`` (signed; unit ``h_i`` assumed).

    ``weights`` is the variable (or list of variables) the eigenvectors live on.
    """
    w = as_rows([weights] if isinstance(weights, (list, tuple)) else np.ravel(weights))[
        0
    ]
    h = as_rows(eigenvectors)
    if h.shape[1] != w.size:
        raise ValueError(
            f"`eigenvectors` have {h.shape[1]} parameters but `weights` has {w.size}"
        )
    norm = np.linalg.norm(w)
    if norm == 0:
        raise ValueError("`weights` is the zero vector; its alignment is undefined")
    return h @ w / norm


def variable_sizes(shapes: Sequence[Sequence[int]]) -> list[int]:
    """Number of entries of each variable shape."""
    return [int(np.prod(shape)) for shape in shapes]


def split_rows(rows: np.ndarray, shapes: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Split (k, P) rows into one (k, P_v) block per variable of the given shapes."""
    sizes = variable_sizes(shapes)
    if sum(sizes) != rows.shape[1]:
        raise ValueError(
            f"`shapes` total {sum(sizes)} parameters but the vectors have {rows.shape[1]}"
        )
    return np.split(rows, np.cumsum(sizes)[:-1], axis=1)


def localisation(vectors, shapes: Sequence[Sequence[int]]) -> np.ndarray:
    """Share of ``||h_i||^2`` in each variable, shape (k, number of variables); rows sum to 1."""
    rows = as_rows(vectors)
    squared = np.stack(
        [np.sum(block**2, axis=1) for block in split_rows(rows, shapes)], axis=1
    )
    return squared / squared.sum(axis=1, keepdims=True)


def _unit_rows(rows: np.ndarray, name: str) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError(f"`{name}` contains a zero vector; overlaps are undefined")
    return rows / norms
