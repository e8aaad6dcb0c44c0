"""comparisons/uci.py runs end to end in its --quick mode on the shared UCI data (slow)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "comparisons" / "uci.py"
UCI_ROOT = Path(os.environ.get("PYRO_BBB_UCI_ROOT") or REPO.parent / "shared" / "data" / "uci")
QUICK_SETS = ("yacht", "bostonHousing")
METHODS = ("bbb_gaussian", "bbb_mixture", "hmc")
KEYS = {"rmse_mean", "rmse_se", "ll_mean", "ll_se", "n_splits"}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _target_std(name: str, split: int = 0) -> float:
    """Population std of the target on the training rows of a split (what load_uci divides by)."""
    folder = UCI_ROOT / name
    data = np.loadtxt(folder / "data.txt", ndmin=2)
    target = int(np.loadtxt(folder / "index_target.txt"))
    train = np.loadtxt(folder / f"index_train_{split}.txt").astype(int)
    return float(data[train, target].std())


@pytest.mark.slow
def test_uci_quick(tmp_path):
    if not all((UCI_ROOT / n / "data.txt").is_file() for n in QUICK_SETS):
        pytest.skip(f"UCI data not found under {UCI_ROOT} (set PYRO_BBB_UCI_ROOT to the folder "
                    "holding yacht/ and bostonHousing/)")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path), "--root", str(UCI_ROOT)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    results = json.loads((tmp_path / "uci.json").read_text())
    assert set(results) == set(QUICK_SETS)
    for name, table in results.items():
        assert set(table) == set(METHODS), name
        for method, r in table.items():
            assert set(r) == KEYS, (name, method)
            assert all(_finite(r[k]) for k in KEYS), (name, method, r)
            assert r["rmse_mean"] > 0 and r["rmse_se"] >= 0 and r["ll_se"] >= 0, (name, method)
            assert r["n_splits"] == 2, (name, method)
    # Yacht's target (residuary resistance) has a std of about 15 on the training rows, and
    # a linear model leaves an RMSE of about 9 (the resistance grows steeply with the Froude
    # number). Even the quick BBB budget (150 full-batch steps) fits the curve: its RMSE
    # is around 1 (the published PBP value is 1.02), so a fifth of the std is a loose bound
    # that still fails for a network that has not learnt the nonlinearity.
    y_std = _target_std("yacht")
    assert 10 < y_std < 20
    for method in ("bbb_gaussian", "bbb_mixture"):
        assert results["yacht"][method]["rmse_mean"] < 0.2 * y_std, results["yacht"][method]
        # a Gaussian predictive in original units: far above the LL of predicting with the
        # target's own mean and std, -log(y_std) - 1/2 log(2 pi e) = -4.1 on yacht
        assert results["yacht"][method]["ll_mean"] > -math.log(y_std) - 0.5 * math.log(2 * math.pi * math.e)
    # boston: the published RMSEs lie in 2.97 (dropout) .. 4.32 (VI); the std of the target is 9.2
    assert results["bostonHousing"]["bbb_gaussian"]["rmse_mean"] < 6

    md = (tmp_path / "uci.md").read_text()
    assert "python comparisons/uci.py --quick" in md
    assert "| data set | method | splits | test RMSE | test LL |" in md
    assert "published PBP" in md and "Target" in md and "torch" in md
    assert (tmp_path / "uci.png").stat().st_size > 0
    cache = json.loads((tmp_path / "uci_cache_quick.json").read_text())
    assert len(cache["results"]) == 2 * 2 * len(METHODS)

    # a rerun with the same configuration resumes from the cache: nothing is recomputed
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path), "--root", str(UCI_ROOT)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "(12 cached)" in proc.stdout
    assert json.loads((tmp_path / "uci.json").read_text()) == results


def test_uci_missing_data_message(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path), "--root", str(tmp_path / "nope")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    assert "not found" in proc.stderr and "--root" in proc.stderr
