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
