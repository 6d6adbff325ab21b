"""Smoke run of ``examples/haink_reproduction.py --quick`` (offline digits, tiny settings)."""

import json
import pathlib
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.slow
def test_quick_reproduction_writes_table_arrays_and_plots(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    sys.modules.pop("haink_reproduction", None)
    import haink_reproduction

    results = haink_reproduction.main(["--output", str(tmp_path), "--quick"])

    table = (tmp_path / "table.md").read_text()
    for row in (
        "top-5 Hessian eigenvalues",
        "drift ratio",
        "update-PCs",
        "Localisation",
    ):
        assert row in table
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["network_top_eigenvalues"] == results["network_top_eigenvalues"]
    assert len(stored["network_top_eigenvalues"]) == 10
    assert all(ratio >= 1.0 for ratio in stored["drift_ratios"].values())
    for name in (
        "drift_kernel3",
        "layer_eigenvalues",
        "spectral_density",
        "reconstruction_kernel3",
        "overlap_update_pcs_kernel3",
        "explained_variance",
    ):
        assert (tmp_path / f"{name}.png").stat().st_size > 0
    assert (tmp_path / "network_eigenpairs.npz").exists()
