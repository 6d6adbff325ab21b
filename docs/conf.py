"""Sphinx configuration of the tfcurv documentation (Sphinx + MyST Markdown).

Build with ``tox -e docs`` or ``sphinx-build -W --keep-going -b html docs docs/_build/html``.
Nothing is mocked: the API reference imports tfcurv (and so TensorFlow) for real,
so a docstring that does not render is a build error.
"""

import os
import pathlib
import shutil
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import tfcurv

project = "tfcurv"
author = "the tfcurv developers"
copyright = "tfcurv developers"
release = tfcurv.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx.ext.mathjax",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build"]
templates_path = ["_templates"]

# MyST: $...$ and $$...$$ maths, ::: fences, anchors for headings down to ###.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# API reference: autosummary walks the public names (each module's __all__)
# and writes one page per name into generated/, rebuilt from scratch every time
# so that a name that left the API leaves no stale page behind.
shutil.rmtree(pathlib.Path(__file__).resolve().parent / "generated", ignore_errors=True)
autosummary_generate = True
autosummary_ignore_module_all = False
autosummary_imported_members = False  # modules with __all__ list theirs anyway
autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_default_options = {"show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

html_theme = "furo"
html_title = f"tfcurv {release}"

# Every cross-reference must resolve (`sphinx-build -n`). Types of other
# libraries are not linked: the build runs offline, without intersphinx.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(numpy|np|collections\.abc|os|typing|keras|tf|tensorflow)\..*"),
]

# A class page lists every public method, inherited ones included (Hessian's
# eigenvalues, trace, ... live on CurvatureOperator), but not the Keras
# methods a tfcurv optimizer or model inherits: those are Keras' to document.
# (`:inherited-members:` in _templates/public_class.rst, and the hook below.)


def _public_tfcurv_classes():
    import inspect

    found = set()
    from tfcurv.optimizers import curvature_optimizer

    contract = ["CurvatureOptimizer", "CurvatureContext", "LayerStatistics"]
    modules = [(m, m.__all__) for m in (tfcurv, tfcurv.analysis, tfcurv.curvature)]
    modules += [(tfcurv.optimizers, tfcurv.optimizers.__all__)]
    modules += [(curvature_optimizer, contract)]  # documented in train_step.md
    for module, names in modules:
        for name in names:
            value = getattr(module, name)
            if inspect.isclass(value):
                found.add(value)
    return found


_PUBLIC = _public_tfcurv_classes()


def _skip_members_of_other_libraries(app, what, name, obj, skip, options):
    if what != "class" or skip:
        return None
    owner = getattr(obj, "__module__", None)
    if owner is None and isinstance(obj, property):
        owner = getattr(obj.fget, "__module__", None)
    if owner is not None and not owner.startswith("tfcurv"):
        return True
    return None


def _documented_bases(app, name, obj, options, bases):
    """Undocumented tfcurv bases (private mixins, internal bases) are replaced
    by their own bases, so "Bases:" names only documented classes."""
    resolved = []
    pending = list(bases)
    while pending:
        base = pending.pop(0)
        internal = base.__module__.startswith("tfcurv") and base not in _PUBLIC
        if internal:
            pending[:0] = [b for b in base.__bases__ if b is not object]
        elif base not in resolved:
            resolved.append(base)
    bases[:] = resolved or [object]


def setup(app):
    app.connect("autodoc-skip-member", _skip_members_of_other_libraries)
    app.connect("autodoc-process-bases", _documented_bases)
