"""Capture the inputs and pre-activation outputs of chosen layers in one forward pass.

Keras has no module hooks. Optimizers such as AdaFisher need, for every Dense,
Conv2D, BatchNormalization and LayerNormalization layer, the tensor the layer
received and the gradient of the loss with respect to its output *before* a
fused ``activation=``. :func:`capture_layer_statistics` provides both ingredients
for a train step::

    with capture_layer_statistics(model, (keras.layers.Dense,)) as records:
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            loss = ...
    grads = tape.gradient(loss, variables + [r.outputs for r in records])

While the context is open, each matching layer *instance* (never its class)
runs a wrapper of its ``call`` (the technique of Keras' own
``keras/src/quantizers/gptq_core.py::stream_hessians``):

* the original ``call`` runs with the layer's fused activation switched off, so
  its result is the pre-activation; the wrapper records it, then applies the
  activation itself, so the layer's output is unchanged;
* records are kept per thread: ``MirroredStrategy`` runs the replica functions
  in threads that share the layer objects, and each replica must see its own
  tensors. The wrappers are installed once (reference-counted) while any thread
  captures, and removed when the last one leaves;
* everything is restored on exit, also when the forward pass raises.

A matching layer called twice in one forward pass (a shared layer) has no single
input/output pair; that raises a ``ValueError`` rather than silently keeping one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator, Sequence

import keras

from tfcurv.curvature.layers import matching_layers

_MISSING = object()


@dataclasses.dataclass
class CapturedLayer:
    """One layer's tensors from the forward pass, in the order layers were called.

    Attributes:
        layer: the Keras layer.
        inputs: the first input the layer's ``call`` received.
        outputs: the layer's output before its fused activation (for a layer
            without one, its output). Pass it to ``tape.gradient`` as a source
            to get the output gradient.
    """

    layer: keras.layers.Layer
    inputs: object
    outputs: object


class _Session:
    """The capture of one thread: which layers to record, and what was recorded."""

    def __init__(self, layers: Sequence[keras.layers.Layer]):
        self.layer_ids = {id(layer) for layer in layers}
        self.records: list[CapturedLayer] = []
        self.recorded_ids: set[int] = set()

    def record(self, layer, inputs, outputs) -> None:
        if id(layer) in self.recorded_ids:
            raise ValueError(
                f"Layer '{layer.name}' ({type(layer).__name__}) was called more than "
                "once in one forward pass. Curvature statistics need one input and "
                "one output per layer, so shared layers are not supported: give each "
                "use its own layer, or use an optimizer without layer statistics."
            )
        self.recorded_ids.add(id(layer))
        self.records.append(CapturedLayer(layer, inputs, outputs))


class _Patch:
    """The wrapper installed on one layer instance while any thread captures it."""

    def __init__(self, layer: keras.layers.Layer):
        self.layer = layer
        self.users = 0
        self.saved_call = layer.__dict__.get("call", _MISSING)
        self.original_call = layer.call
        activation = getattr(layer, "activation", None)
        fused = callable(activation) and activation is not keras.activations.linear
        self.activation = activation if fused else None

    def install(self) -> None:
        layer = self.layer
        if self.activation is not None:
            layer.activation = None  # Dense/Conv skip `activation` when it is None
        layer.call = self._call

    def remove(self) -> None:
        layer = self.layer
        if self.saved_call is _MISSING:
            del layer.call
        else:
            layer.call = self.saved_call
        if self.activation is not None:
            layer.activation = self.activation

    def _call(self, *args, **kwargs):
        outputs = self.original_call(*args, **kwargs)
        session = _active_session()
        if session is not None and id(self.layer) in session.layer_ids:
            inputs = args[0] if args else kwargs["inputs"]
            if not isinstance(
                inputs, keras.KerasTensor
            ):  # skip symbolic shape inference
                session.record(self.layer, inputs, outputs)
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs


_lock = threading.Lock()
_patches: dict[int, _Patch] = {}
_thread_state = threading.local()


def _active_session() -> _Session | None:
    stack = getattr(_thread_state, "sessions", None)
    return stack[-1] if stack else None


@contextlib.contextmanager
def capture_layer_statistics(
    model: keras.layers.Layer, layer_types: tuple[type, ...]
) -> Iterator[list[CapturedLayer]]:
    """Record input and pre-activation output of every ``layer_types`` layer of ``model``.

    Yields a list that the forward pass run inside the ``with`` block fills with
    one :class:`CapturedLayer` per matching layer that was called, in call order.
    Layers that were not called (an unused branch) have no record.

    Raises:
        ValueError: if a matching layer is called twice within the block, or if
            ``layer_types`` is not a tuple of layer classes.
    """
    if not isinstance(layer_types, tuple) or not all(
        isinstance(t, type) and issubclass(t, keras.layers.Layer) for t in layer_types
    ):
        raise ValueError(
            "`layer_types` must be a tuple of keras.layers.Layer subclasses. "
            f"Received: layer_types={layer_types!r}"
        )
    layers = matching_layers(model, layer_types) if layer_types else []
    session = _Session(layers)
    with _lock:
        for layer in layers:
            patch = _patches.get(id(layer))
            if patch is None:
                patch = _patches[id(layer)] = _Patch(layer)
                patch.install()
            patch.users += 1
    stack = _thread_state.__dict__.setdefault("sessions", [])
    stack.append(session)
    try:
        yield session.records
    finally:
        stack.remove(session)
        with _lock:
            for layer in layers:
                patch = _patches[id(layer)]
                patch.users -= 1
                if patch.users == 0:
                    patch.remove()
                    del _patches[id(layer)]
