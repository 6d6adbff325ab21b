"""The data a curvature is measured on: one batch or a ``tf.data.Dataset``.

A curvature of "the loss on ``data``" is the curvature of the mean loss over
all examples. For a dataset of batches with mean losses ``L_b`` over ``n_b``
examples that is ``sum_b n_b L_b / sum_b n_b``, so every per-batch quantity is
weighted by its batch size (:func:`weighted_mean`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import tensorflow as tf

Batch = tuple  # (x, y, sample_weight or None)


def _as_batch(element, argument: str) -> Batch:
    if not isinstance(element, (tuple, list)) or len(element) not in (2, 3):
        raise ValueError(
            f"{argument} must be (x, y), (x, y, sample_weight) or a tf.data.Dataset "
            f"of such tuples; got {type(element).__name__}"
            + (
                f" of length {len(element)}"
                if isinstance(element, (tuple, list))
                else ""
            )
        )
    x, y = element[0], element[1]
    sample_weight = element[2] if len(element) == 3 else None
    return x, y, sample_weight


def batch_size(x) -> int:
    first = tf.nest.flatten(x)[0]
    return int(first.shape[0]) if hasattr(first, "shape") else len(first)


class Data:
    """Iterates over the batches of ``data`` (validated once, at construction)."""

    def __init__(self, data, progress: bool | None = None):
        self.is_dataset = isinstance(data, tf.data.Dataset)
        if self.is_dataset:
            self._dataset = data
            self._batch = None
            cardinality = int(data.cardinality())
            self.num_batches = cardinality if cardinality >= 0 else None
        else:
            self._dataset = None
            x, y, sample_weight = _as_batch(data, "data")
            if batch_size(x) == 0:
                raise ValueError(
                    "Argument `data` must hold at least one example. Received: a "
                    "batch of 0 rows"
                )
            self._batch = tuple(
                None if t is None else tf.nest.map_structure(tf.convert_to_tensor, t)
                for t in (x, y, sample_weight)
            )
            self.num_batches = 1
        # "auto" progress: a bar only where a pass takes visibly long, that is
        # for datasets of many batches.
        self.progress = (
            progress
            if progress is not None
            else self.is_dataset and (self.num_batches is None or self.num_batches > 20)
        )

    @property
    def single_batch(self) -> Batch | None:
        """The batch, when ``data`` is one batch (not a dataset)."""
        return self._batch

    def batches(self) -> Iterator[Batch]:
        if not self.is_dataset:
            yield self._batch
            return
        for element in self._dataset:
            yield _as_batch(element, "data")

    def weighted_mean(
        self,
        per_batch: Callable[[int, Batch], object],
        on_batch: Callable[[int], None] | None = None,
    ):
        """``sum_b n_b f(b, batch_b) / sum_b n_b`` for a structure-valued ``f``.

        ``f`` also gets the batch's index ``b`` (to key per-batch random draws);
        ``on_batch(b + 1)`` (optional) is called after each batch.
        """
        if not self.is_dataset:
            value = per_batch(0, self._batch)
            if on_batch is not None:
                on_batch(1)
            return value
        total, count = None, 0
        for index, batch in enumerate(self.batches()):
            n = batch_size(batch[0])
            value = tf.nest.map_structure(
                lambda t, n=n: t * n, per_batch(index, batch)
            )
            total = (
                value if total is None else tf.nest.map_structure(tf.add, total, value)
            )
            count += n
            if on_batch is not None:
                on_batch(index + 1)
        if count == 0:
            raise ValueError("data is an empty dataset")
        return tf.nest.map_structure(lambda t: t / count, total)
