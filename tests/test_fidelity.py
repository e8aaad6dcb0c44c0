"""Tests of ``pyro_bbb.fidelity``: many schemes against one reference.

References, independent of the code under test: scipy.stats.wasserstein_distance
per input; the coverage of N(0, 1) draws by the central 90% interval of
N(0, s^2), 2 * Phi(z_0.95 * s) - 1; total variation, agreement and the expected
calibration error worked out by hand on small probability tables.  Seeds are fixed.
"""

from __future__ import annotations

import json
import warnings

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from scipy import stats  # noqa: E402

from pyro_bbb.compare import ComparisonReport, compare  # noqa: E402
from pyro_bbb.fidelity import (  # noqa: E402
    DEFINITIONS,
    FidelityReport,
    compare_schemes,
    expected_calibration_error,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az  # noqa: E402

X_TRAIN = np.linspace(0.0, 1.0, 11)[:, None]  # spacing 0.1
X_TEST = np.array([[-1.0], [0.05], [0.5], [0.95], [2.0]])
IN_DATA = np.array([False, True, True, True, False])  # compare's nearest-neighbour rule
NUM_TEST = len(X_TEST)


def _idata(values, kind, *, chains=1, classes=None, y_test=None):
    """An InferenceData shaped like to_inference_data's; values is (draws, test[, class])."""
    values = values.reshape((chains, -1) + values.shape[1:])
    task = "classification" if classes else "regression"
    attrs = {"inference": kind, "task": task, "num_hidden_layers": 1, "posterior_kind": kind}
    var, dims = ("prob", ["test", "class"]) if classes else ("f", ["test"])
    pcd = {"x": X_TEST}
    if y_test is not None:
        pcd["y"] = y_test
    predictions = {var: values}
    if classes:  # to_inference_data writes the logits as f next to the probabilities
        predictions["f"] = np.log(values)
    idata = az.from_dict(
        posterior={"w": values.reshape(values.shape[:2] + (-1,))[..., :1]},
        predictions=predictions,
        constant_data={"x": X_TRAIN},
        predictions_constant_data=pcd,
        dims={"w": ["w_dim_0"], "x": ["obs", "feature"]},
        pred_dims={var: dims, "f": dims, "x": ["test", "feature"], "y": ["test"]},
        attrs=attrs,
    )
    for group in idata.groups():
        idata[group].attrs.update(attrs)
    return idata


def _reference(rng, n=2000, offset=0.0):
    """Two chains of iid N(0, 1) draws (converged); ``offset`` shifts chain 2 (unconverged)."""
    f = rng.standard_normal((n, NUM_TEST))
    f[n // 2:] += offset
    return _idata(f, "sampler", chains=2)


def _scheme(rng, scale, shift=0.0, n=2000):
    return _idata(shift + scale * rng.standard_normal((n, NUM_TEST)), "draws")


def test_w1_is_scipys_wasserstein_averaged_over_inputs():
    rng = np.random.default_rng(0)
    ref, a, b = _reference(rng, 400), _scheme(rng, 0.5, 0.3, 300), _scheme(rng, 2.0, -1.0, 300)
    rep = compare(ref, {"a": a, "b": b})
    r = ref.predictions.f.values.reshape(-1, NUM_TEST)
    for name, idata in (("a", a), ("b", b)):
        s = idata.predictions.f.values.reshape(-1, NUM_TEST)
        expected = np.mean([stats.wasserstein_distance(s[:, i], r[:, i]) for i in range(NUM_TEST)])
        got = rep.table.set_index("scheme").loc[name, "w1_mean"]
        assert got == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0])
def test_std_ratio_and_coverage_match_gaussian_closed_forms(scale):
    rng = np.random.default_rng(1)
    n = 20000
    ref = _reference(rng, n)
    rep = compare_schemes(ref, {"s": _scheme(rng, scale, n=n)})
    row = rep.table.iloc[0]
    # The std of n = 20000 normal draws is within ~1/sqrt(2n) = 0.5% of the truth (each side):
    # 3% on the median of the ratio is several standard errors.
    assert row.std_ratio_median_in == pytest.approx(scale, rel=0.03)
    assert row.std_ratio_median_away == pytest.approx(scale, rel=0.03)
    z90, z75 = stats.norm.ppf(0.95), stats.norm.ppf(0.75)
    # Binomial sd of a share over 20000 draws is <= 0.0035 per input, and the scheme's own
    # quantiles add about as much; averaged over 5 inputs, 0.01 is over 3 sd.
    assert row.coverage_90 == pytest.approx(2 * stats.norm.cdf(z90 * scale) - 1, abs=0.01)
    assert row.coverage_50 == pytest.approx(2 * stats.norm.cdf(z75 * scale) - 1, abs=0.01)
    assert row.smd_mean_abs < 0.05  # both centred at 0: |smd| ~ |N(0, 1/n)| scale


def test_five_schemes_one_row_each_and_the_closest_is_named():
    rng = np.random.default_rng(2)
    ref = _reference(rng)
    scales = {"mean_field": 0.3, "low_rank": 0.7, "exact": 1.0, "ensemble": 1.6, "dropout": 3.0}
    rep = compare(ref, {k: _scheme(rng, s) for k, s in scales.items()})
    assert isinstance(rep, FidelityReport)
    assert rep.table.scheme.tolist() == list(scales)
    assert rep.reference_converged
    text = rep.summary()
    assert "Closest to the reference by w1_mean: exact" in text
    assert "mean_field: over-confident" in text and "dropout: under-confident" in text
    assert "0.8" in text and "1.25" in text
    assert "Closest in the data: exact" in text and "Closest away from the data: exact" in text
    assert set(rep.reports) == set(scales)
    assert all(isinstance(r, ComparisonReport) for r in rep.reports.values())


def test_two_schemes_ranking_follows_w1():
    rng = np.random.default_rng(3)
    ref = _reference(rng)
    rep = compare(ref, {"far": _scheme(rng, 1.0, shift=2.0), "near": _scheme(rng, 1.0, shift=0.2)})
    assert len(rep.table) == 2
    w1 = rep.table.set_index("scheme").w1_mean
    assert w1["far"] == pytest.approx(2.0, abs=0.1)  # W1 of a shift is the shift
    assert "Closest to the reference by w1_mean: near" in rep.summary()


def test_unconverged_reference_ranks_nothing():
    rng = np.random.default_rng(4)
    ref = _reference(rng, offset=1.0)  # chains half a std apart: R-hat far above 1.01
    rep = compare(ref, {"a": _scheme(rng, 1.0), "b": _scheme(rng, 0.5)})
    assert not rep.reference_converged
    text = rep.summary()
    assert "did not converge" in text and "no scheme is ranked" in text
    assert "Closest" not in text
    assert rep.to_dict()["reference_converged"] is False


def test_reference_must_be_a_sampler():
    rng = np.random.default_rng(5)
    with pytest.raises(ValueError, match="reference must be a sampler"):
        compare(_scheme(rng, 1.0), {"a": _scheme(rng, 1.0)})
    with pytest.raises(ValueError, match="approximations must be a non-empty dict"):
        compare_schemes(_reference(rng, 100), {})


def test_single_scheme_compare_still_returns_a_comparison_report():
    rng = np.random.default_rng(6)
    rep = compare(_scheme(rng, 0.5), _reference(rng, 500))
    assert isinstance(rep, ComparisonReport)
    assert rep.get("std_ratio_median", "in_data") == pytest.approx(0.5, rel=0.1)


def test_classifier_agreement_tv_and_ece_by_hand():
    ref_p = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.4, 0.6], [0.3, 0.7]])
    sch_p = np.array([[0.75, 0.25], [0.35, 0.65], [0.15, 0.85], [0.25, 0.75], [0.35, 0.65]])
    y = np.array([0, 0, 1, 1, 1])
    # The reference's draws jitter by 1e-9 (so its R-hat is defined); the scheme's are equal,
    # so its mean probabilities are exactly sch_p (confidences kept off the bin edges).
    noise = np.random.default_rng(7).normal(0, 1e-9, (2000, NUM_TEST, 1)) * np.array([1, -1])
    ref = _idata(np.broadcast_to(ref_p, (2000, NUM_TEST, 2)) + noise, "sampler", chains=2, classes=2, y_test=y)
    sch = _idata(np.broadcast_to(sch_p, (400, NUM_TEST, 2)).copy(), "draws", classes=2, y_test=y)
    rep = compare_schemes(ref, {"s": sch})
    row = rep.table.iloc[0]
    assert row.tv == pytest.approx(np.mean([0.15, 0.25, 0.05, 0.15, 0.05]), abs=1e-6)
    assert row.agreement == pytest.approx(4 / 5)  # test 1 flips: 0.35 / 0.65 vs 0.6 / 0.4
    # ECE by hand, confidences 0.75 (right), 0.65 (wrong), 0.85 (right), 0.75 (right), 0.65
    # (right): bin (0.7, 0.8] 2/5 * |1 - 0.75|, (0.6, 0.7] 2/5 * |0.5 - 0.65|, (0.8, 0.9] 1/5 * 0.15.
    assert row.ece == pytest.approx(0.4 * 0.25 + 0.4 * 0.15 + 0.2 * 0.15, abs=1e-9)
    assert row.error_rate == pytest.approx(1 / 5)
    assert rep.fidelity_metric == "tv"
    assert rep.reference_converged  # iid jitter over 2 x 1000 draws: R-hat ~ 1, ESS ~ 2000
    assert "Closest to the reference by tv: s" in rep.summary()


def test_ece_perfectly_calibrated_and_validation():
    probs = np.array([[0.25, 0.75]] * 4)
    assert expected_calibration_error(probs, np.array([1, 1, 1, 0])) == pytest.approx(0.0)
    assert expected_calibration_error(probs, np.array([0, 0, 0, 0])) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="probs"):
        expected_calibration_error(np.array([[0.5, 0.6]]), np.array([0]))


def test_exports_and_pictures(tmp_path):
    rng = np.random.default_rng(8)
    rep = compare(_reference(rng, 500), {"a": _scheme(rng, 0.5, n=300), "b": _scheme(rng, 1.5, n=300)})
    data = json.loads(json.dumps(rep.to_dict()))
    assert set(data["schemes"]) == {"a", "b"}
    assert data["schemes"]["a"]["w1_mean"] == pytest.approx(rep.table.w1_mean.iloc[0])
    assert data["schemes"]["a"]["rmse"] is None  # no y_test: NaN -> None
    assert set(rep.table.columns) - {"scheme"} <= set(rep.definitions)  # every column defined
    md = rep.to_markdown()
    assert md.index(rep.summary()) < md.index("| scheme |") < md.index(DEFINITIONS["w1_mean"])
    paths = rep.plot(tmp_path)
    assert [p.name for p in paths] == ["scheme_bands.png", "scheme_std_ratio.png", "scheme_fidelity.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_fidelity_report_folder_has_the_shared_reference_chain_plots(tmp_path):
    from pyro_bbb.report import MARKER, write_report
    from test_report import SETTINGS

    rng = np.random.default_rng(9)
    rep = compare(_reference(rng, 400), {"a": _scheme(rng, 0.5, n=300), "b": _scheme(rng, 1.5, n=300)})
    out = write_report(tmp_path / "out", rep, {**SETTINGS, "methods": ["a", "b"]})
    listed = json.loads((out / MARKER).read_text())
    assert {"scheme_fidelity.png", "reference_trace.png", "reference_rank.png"} <= set(listed)
    html = (out / "report.html").read_text()
    assert "<img src='reference_trace.png'" in html and "<img src='reference_rank.png'" in html


@pytest.mark.slow
def test_end_to_end_guide_and_ensemble_against_nuts():
    import pyro.distributions as dist
    import torch

    import pyro_bbb as bbb
    from pyro_bbb.hmc import run_nuts
    from pyro_bbb.inference_data import to_inference_data
    from pyro_bbb.schemes import deep_ensemble

    torch.manual_seed(0)
    x = torch.linspace(-1, 1, 20)[:, None]
    y = 2 * x[:, 0] + 0.3 * torch.randn(20)
    model = bbb.BayesianRegressor(torch.nn.Linear(1, 1), prior=dist.Normal(0.0, 1.0), noise=0.3)
    x_test = torch.linspace(-2, 2, 9)[:, None]
    ref = run_nuts(model, x, y, num_samples=300, warmup_steps=100, num_chains=2, progress=False)
    guide = bbb.BBBGuide(model)
    bbb.fit(model, guide, x, y, epochs=300, lr=0.05, progress=False, seed=0)
    ensemble = deep_ensemble(model, x, y, num_members=5, epochs=200, lr=0.05, seed=0, progress=False)
    rep = bbb.compare(to_inference_data(model, ref, x, y, x_test=x_test), {
        "bbb": to_inference_data(model, guide, x, y, x_test=x_test, seed=0),
        "ensemble": to_inference_data(model, ensemble, x, y, x_test=x_test),
    })
    khat = rep.table.set_index("scheme").psis_khat
    assert np.isfinite(khat["bbb"]) and np.isnan(khat["ensemble"])  # only q has a log density
    # Five MAP fits of a convex problem land together: far narrower than the posterior.
    assert rep.table.set_index("scheme").std_ratio_median_in["ensemble"] < 0.5
