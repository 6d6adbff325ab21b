"""Capture the inputs and pre-activation outputs of chosen layers in one forward pass.

The one layer capture of tfcurv: the train step (AdaFisher's statistics) and
Curvature Propagation both use it. Keras has no module hooks. A consumer needs,
for every layer of the layer table, the tensor the layer received and the
gradient of the loss with respect to its output *before* a fused
``activation=``. :func:`capture_layer_statistics` provides both ingredients for
a train step::

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

A layer called several times in one forward pass (a shared layer) gives one
record per call, in call order; consumers sum their contributions over calls.
Each record also keeps the fused activation and the activated output, which
Curvature Propagation needs for its second-derivative terms.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator, Sequence

import keras

from tfcurv.curvature.layers import matching_layers

__all__ = ["CapturedLayer", "capture_layer_statistics", "capture_layers"]

_MISSING = object()

L = keras.layers
#: Layers whose ``call`` applies ``self.activation`` only when it is not None,
#: so the capture can switch a fused activation off and apply it itself.
_FUSED_ACTIVATION_LAYERS = (
    L.Dense, L.EinsumDense, L.Conv1D, L.Conv2D, L.Conv3D, L.Conv1DTranspose,
    L.Conv2DTranspose, L.Conv3DTranspose, L.DepthwiseConv1D, L.DepthwiseConv2D,
    L.SeparableConv1D, L.SeparableConv2D,
)  # fmt: skip


@dataclasses.dataclass
class CapturedLayer:
    """One layer's tensors from the forward pass, in the order layers were called.

    Attributes:
        layer: the Keras layer.
        inputs: the first input the layer's ``call`` received.
        outputs: the layer's output before its fused activation (for a layer
            without one, its output). Pass it to ``tape.gradient`` as a source
            to get the output gradient.
        activation: the fused activation the capture applied after ``outputs``
            (None when the layer has none, or it is linear).
        activated: the layer's output as the model saw it (``outputs`` when
            ``activation`` is None).
    """

    layer: keras.layers.Layer
    inputs: object
    outputs: object
    activation: object = None
    activated: object = None


class _Session:
    """The capture of one thread: which layers to record, and what was recorded."""

    def __init__(self, layers: Sequence[keras.layers.Layer]):
        self.layer_ids = {id(layer) for layer in layers}
        self.records: list[CapturedLayer] = []


class _Patch:
    """The wrapper installed on one layer instance while any thread captures it."""

    def __init__(self, layer: keras.layers.Layer):
        self.layer = layer
        self.users = 0
        self.saved_call = layer.__dict__.get("call", _MISSING)
        self.original_call = layer.call
        activation = getattr(layer, "activation", None)
        fused = (
            isinstance(layer, _FUSED_ACTIVATION_LAYERS)
            and callable(activation)
            and activation is not keras.activations.linear
        )
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
            record = None
            if not isinstance(inputs, keras.KerasTensor):  # not shape inference
                record = CapturedLayer(self.layer, inputs, outputs, self.activation)
                session.records.append(record)
        else:
            record = None
        activated = outputs
        if self.activation is not None:
            activated = self.activation(outputs)
        if record is not None:
            record.activated = activated
        return activated


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
    one :class:`CapturedLayer` per call of a matching layer, in call order.
    Layers that were not called (an unused branch) have no record.

    Raises:
        ValueError: if ``layer_types`` is not a tuple of layer classes.
    """
    if not isinstance(layer_types, tuple) or not all(
        isinstance(t, type) and issubclass(t, keras.layers.Layer) for t in layer_types
    ):
        raise ValueError(
            "Argument `layer_types` must be a tuple of keras.layers.Layer "
            f"subclasses. Received: layer_types={layer_types!r}"
        )
    layers = matching_layers(model, layer_types) if layer_types else []
    with capture_layers(layers) as records:
        yield records


@contextlib.contextmanager
def capture_layers(
    layers: Sequence[keras.layers.Layer],
) -> Iterator[list[CapturedLayer]]:
    """Record every call of the given layer instances (see :func:`capture_layer_statistics`)."""
    layers = list({id(layer): layer for layer in layers}.values())
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
