"""Run in a clean environment holding only the tfcurv wheel, its core requirements
and TensorFlow for the CPU (see ``.ci/test.sh``): every tfcurv module imports, and a
curvature optimizer trains a model through ``tfcurv.attach`` and ``fit``."""

import importlib
import importlib.metadata
import pkgutil

import keras
import numpy as np

import tfcurv

for extra in ("tensorflow-datasets", "matplotlib", "mlxtend", "pytest"):
    try:
        importlib.metadata.version(extra)
    except importlib.metadata.PackageNotFoundError:
        continue
    raise SystemExit(f"{extra} is installed: this environment is not a clean one")

modules = [m.name for m in pkgutil.walk_packages(tfcurv.__path__, "tfcurv.")]
for name in modules:
    importlib.import_module(name)

model = tfcurv.attach(keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
                                        keras.layers.LayerNormalization(),
                                        keras.layers.Dense(1)]))
model.compile(optimizer=tfcurv.optimizers.SGDPH(learning_rate=0.01), loss="mse")
x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
history = model.fit(x, x[:, :1], batch_size=8, epochs=2, verbose=0)
assert np.isfinite(history.history["loss"]).all(), history.history
print(f"tfcurv {tfcurv.__version__} wheel: {len(modules)} modules import, "
      f"SGDPH fit loss {history.history['loss'][0]:.3f} -> {history.history['loss'][-1]:.3f}")
