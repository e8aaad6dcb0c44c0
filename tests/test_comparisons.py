"""The studies in comparisons/ run end to end in their --quick mode (marked slow)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "comparisons"

pytest.importorskip("sklearn")


def _run(script: str, out: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / script), "--quick", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.mark.slow
def test_classification_quick(tmp_path):
    _run("classification.py", tmp_path)
    results = json.loads((tmp_path / "classification.json").read_text())
    assert "digits" in results
    methods = ("sgd", "dropout", "bbb_gaussian", "bbb_mixture")
    for name, table in results.items():
        assert set(table) == {f"{m}_{w}" for m in methods for w in (100, 400)}
        for key, r in table.items():
            assert {"error_mean", "error_se", "n_seeds"} <= set(r), key
            assert _finite(r["error_mean"]) and 0 <= r["error_mean"] <= 1, key
            assert _finite(r["error_se"]) and r["error_se"] >= 0, key
            assert r["n_seeds"] == 2
    # a few epochs already beat chance (90% error) by far on digits
    assert results["digits"]["sgd_100"]["error_mean"] < 0.3
    assert results["digits"]["bbb_mixture_100"]["error_mean"] < 0.5
    md = (tmp_path / "classification.md").read_text()
    assert "--quick" in md and "| method |" in md and "torch" in md
    assert (tmp_path / "classification.png").stat().st_size > 0


@pytest.mark.slow
def test_pruning_quick(tmp_path):
    _run("pruning.py", tmp_path)
    r = json.loads((tmp_path / "pruning.json").read_text())
    assert r["fractions"] == [0.0, 0.5, 0.75, 0.95, 0.98]
    assert isinstance(r["n_weights"], int) and r["n_weights"] > 0
    for key in ("error", "error_se", "error_magnitude", "error_random", "n_kept"):
        assert len(r[key]) == len(r["fractions"]), key
        assert all(_finite(v) for v in r[key]), key
    assert all(0 <= e <= 1 for e in r["error"])
    assert r["n_kept"][0] == r["n_weights"]
    assert r["n_kept"] == sorted(r["n_kept"], reverse=True)
    md = (tmp_path / "pruning.md").read_text()
    assert "--quick" in md and "| removed |" in md
    for png in ("pruning_snr.png", "pruning_error.png"):
        assert (tmp_path / png).stat().st_size > 0
