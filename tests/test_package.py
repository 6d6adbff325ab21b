"""The package as users meet it: public names, version, typing marker, README."""

import ast
import configparser
import importlib
import importlib.metadata
import inspect
import pathlib
import re
import subprocess
import sys

import pytest
from packaging.version import Version
from setuptools.config.setupcfg import read_configuration

import tfcurv

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The public API fixed in design.md: module -> names it must export.
FIXED_PUBLIC_NAMES = {
    "tfcurv": [
        "optimizers",
        "analysis",
        "Model",
        "Sequential",
        "attach",
        "Hessian",
        "GaussNewton",
    ],
    "tfcurv.optimizers": ["AGD", "AdaFisher", "AdaFisherW", "SGDPH"],
    "tfcurv.analysis": ["WeightTrajectory", "CurvatureMonitor"],
}


def _public_name_cases():
    for module, names in FIXED_PUBLIC_NAMES.items():
        for name in names:
            yield pytest.param(module, name, id=f"{module}.{name}")


@pytest.mark.parametrize(("module_name", "name"), _public_name_cases())
def test_fixed_public_name_is_exported(module_name, name):
    module = importlib.import_module(module_name)
    assert name in module.__all__
    assert getattr(module, name) is not None


@pytest.mark.parametrize("module_name", FIXED_PUBLIC_NAMES)
def test_every_exported_name_exists(module_name):
    module = importlib.import_module(module_name)
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert not missing
    assert len(set(module.__all__)) == len(module.__all__)


def test_version_comes_from_the_package_and_is_pep440():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    assert setup["metadata"]["version"] == "attr: tfcurv.__version__"
    assert str(Version(tfcurv.__version__)) == tfcurv.__version__
    assert (
        read_configuration(ROOT / "setup.cfg")["metadata"]["version"]
        == tfcurv.__version__
    )


def test_installed_metadata_matches_the_package_version():
    try:
        installed = importlib.metadata.version("tfcurv")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("tfcurv is imported from the source tree, not installed")
    assert installed == tfcurv.__version__


def test_py_typed_marker_ships_with_the_package():
    package_data = read_configuration(ROOT / "setup.cfg")["options"]["package_data"]
    assert "py.typed" in package_data["tfcurv"]
    assert (pathlib.Path(tfcurv.__file__).parent / "py.typed").is_file()


def _readme_section(title: str) -> str:
    readme = (ROOT / "README.md").read_text()
    match = re.search(
        rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", readme, re.MULTILINE | re.DOTALL
    )
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def test_readme_set_up_has_exactly_two_copy_paste_commands():
    blocks = re.findall(
        r"^```(\w*)\n(.*?)^```", _readme_section("Set up"), re.MULTILINE | re.DOTALL
    )

    assert len(blocks) == 2
    for language, body in blocks:
        assert language in ("bash", "sh", "shell")
        assert len(body.strip().splitlines()) == 1, "one line, copy-paste ready"
    quickstart, tests = (body.strip() for _, body in blocks)
    extras = re.search(r'-e "\.\[([\w,]+)\]"', quickstart).group(1).split(",")
    declared = read_configuration(ROOT / "setup.cfg")["options"]["extras_require"]
    assert set(extras) <= set(declared)
    assert quickstart.endswith("examples/quickstart.py")
    assert (ROOT / "examples" / "quickstart.py").is_file()
    assert tests == "bash .ci/test.sh"
    assert "pytest" in (ROOT / ".ci" / "test.sh").read_text()
    assert ".ci/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_readme_optimizer_table_lists_every_public_optimizer():
    table = _readme_section("Optimizers")
    rows = re.findall(r"^\| `(\w+)` \|", table, re.MULTILINE)
    assert set(tfcurv.optimizers.__all__) <= set(rows)


@pytest.mark.slow
def test_documentation_builds_without_warnings(tmp_path):
    """The docs build as ``tox -e docs`` builds them: warnings are errors."""
    pytest.importorskip(
        "sphinx", reason="needs the docs extra: pip install -e '.[docs]'"
    )
    pytest.importorskip("myst_parser", reason="needs the docs extra")
    pytest.importorskip("furo", reason="needs the docs extra")
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            "-d",
            str(tmp_path / "doctrees"),
            str(ROOT / "docs"),
            str(tmp_path / "html"),
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-5000:]
    assert (tmp_path / "html" / "generated" / "tfcurv.optimizers.AGD.html").is_file()
    # conf.py sets nitpicky: every cross-reference above resolved. The operators'
    # pages list the estimates they inherit, with their arguments.
    for operator in ("Hessian", "GaussNewton", "Fisher"):
        page = (tmp_path / "html" / "generated" / f"tfcurv.{operator}.html").read_text()
        for method in ("vp", "eigenvalues", "trace", "diagonal", "density", "solve",
                       "to_scipy", "dense"):  # fmt: skip
            assert f'id="tfcurv.{operator}.{method}"' in page, (operator, method)
        assert "basis_size" in page and "reorthogonalize" in page
    # The docs show the package's version, and the changelog that starts with it.
    assert f"tfcurv {tfcurv.__version__}" in (tmp_path / "html" / "index.html").read_text()
    changelog = (tmp_path / "html" / "changelog.html").read_text()
    assert f"{tfcurv.__version__} (unreleased)" in changelog or (
        f">{tfcurv.__version__}<" in changelog
    )


def test_readme_optimizer_defaults_match_the_signatures():
    rows = re.findall(
        r"^\| `(\w+)` \|[^|]*\| `([^`]*)`", _readme_section("Optimizers"), re.MULTILINE
    )
    assert rows
    for name, defaults in rows:
        signature = inspect.signature(getattr(tfcurv.optimizers, name))
        for argument in defaults.split(", "):
            key, value = argument.split("=")
            assert signature.parameters[key].default == ast.literal_eval(value), (
                f"README: {name}({argument})"
            )


def _changelog_versions() -> list[str]:
    headings = re.findall(
        r"^## (\S+)", (ROOT / "CHANGELOG.md").read_text(), re.MULTILINE
    )
    assert headings, "CHANGELOG.md has no '## <version>' heading"
    return headings


def test_changelog_starts_with_the_package_version_and_goes_back_in_order():
    versions = _changelog_versions()
    assert versions[0] == tfcurv.__version__
    parsed = [Version(version) for version in versions]
    assert [str(v) for v in parsed] == versions, "versions as PEP 440 writes them"
    assert parsed == sorted(parsed, reverse=True)
    assert len(set(parsed)) == len(parsed)


def test_documentation_includes_the_changelog():
    page = (ROOT / "docs" / "changelog.md").read_text()
    assert "{include} ../CHANGELOG.md" in page
    assert re.search(r"^changelog$", (ROOT / "docs" / "index.md").read_text(), re.M)


# What a module of tfcurv may import at its top: the standard library, the core
# requirements, TensorFlow (the cpu/gpu extras), and tfcurv itself. Anything else
# (matplotlib, tensorflow_datasets, ...) belongs to an extra and is imported
# where it is used, so that ``import tfcurv.<any module>`` works with the core
# requirements alone (.ci/wheel_check.py checks that in a clean environment).
CORE_IMPORTS = {"keras", "numpy", "tensorflow", "tfcurv"}


def _top_level_imports(path: pathlib.Path):
    tree = ast.parse(path.read_text())
    for node in tree.body:
        statements = [node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.Try):
            statements = node.body
        for statement in statements:
            if isinstance(statement, ast.Import):
                yield from (alias.name.split(".")[0] for alias in statement.names)
            elif isinstance(statement, ast.ImportFrom) and not statement.level:
                yield statement.module.split(".")[0]


def test_core_requirements_are_keras_and_numpy_and_suffice_for_every_module():
    requirements = read_configuration(ROOT / "setup.cfg")["options"]["install_requires"]
    assert sorted(requirements) == ["keras>=3.13", "numpy"]
    outside = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in (ROOT / "tfcurv").rglob("*.py")
        for name in _top_level_imports(path)
        if name not in CORE_IMPORTS and name not in sys.stdlib_module_names
    }
    assert not outside, sorted(outside)


def test_readme_names_the_tested_versions_as_tox_pins_them():
    """The README's tested TF/Keras pairs are tox's environments, and the oldest
    pair is what setup.cfg allows at the least."""
    tox = (ROOT / "tox.ini").read_text()
    tf_pins = re.findall(r"^\s*tf\d+: tensorflow-cpu~=(\d+\.\d+)\.0$", tox, re.M)
    keras_pins = re.findall(r"^\s*keras\d+: keras~=(\d+\.\d+)\.0$", tox, re.M)
    assert len(tf_pins) == len(keras_pins) == 2
    readme = (ROOT / "README.md").read_text()
    for tf_version, keras_version in zip(tf_pins, keras_pins, strict=True):
        assert f"TensorFlow {tf_version} + Keras {keras_version}" in readme
    oldest_tf, oldest_keras = min(tf_pins, key=Version), min(keras_pins, key=Version)
    options = read_configuration(ROOT / "setup.cfg")["options"]
    assert f"keras>={oldest_keras}" in options["install_requires"]
    assert f"tensorflow-cpu>={oldest_tf}" in options["extras_require"]["cpu"]
