"""Tests of pyro_bbb.datasets against independent references (numpy, scipy, sklearn)."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_bbb import datasets as ds

sklearn = pytest.importorskip("sklearn")

# The repo sits beside shared/ (../shared/data/uci from the repo root).
UCI_ROOT = Path(
    os.environ.get("PYRO_BBB_UCI_ROOT")
    or Path(__file__).resolve().parents[2] / "shared" / "data" / "uci"
)
needs_uci = pytest.mark.skipif(
    not (UCI_ROOT / "yacht" / "data.txt").is_file(),
    reason=f"UCI data (yacht) not found under {UCI_ROOT}; set PYRO_BBB_UCI_ROOT",
)


def numpy_curve(x, eps=0.0):
    u = x + eps
    return x + 0.3 * np.sin(2 * np.pi * u) + 0.3 * np.sin(4 * np.pi * u) + eps


# ---------------------------------------------------------------- regression curve


def test_regression_curve_shapes_range_and_seeds():
    x, y = ds.regression_curve(64, seed=0, low=-1.0, high=2.0)
    assert x.shape == (64, 1) and y.shape == (64,)
    assert x.dtype == y.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 2.0
    x2, y2 = ds.regression_curve(64, seed=0, low=-1.0, high=2.0)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = ds.regression_curve(64, seed=1, low=-1.0, high=2.0)
    assert not torch.equal(x, x3)
    # the global RNG is untouched
    state = torch.get_rng_state()
    ds.regression_curve(10, seed=5)
    assert torch.equal(state, torch.get_rng_state())
    assert ds.regression_curve(5, dtype=torch.float64)[1].dtype == torch.float64


def test_regression_curve_noise_free_matches_formula():
    x, y = ds.regression_curve(200, seed=3, noise=0.0, dtype=torch.float64)
    xn = x[:, 0].numpy()
    expected = xn + 0.3 * np.sin(2 * np.pi * xn) + 0.3 * np.sin(4 * np.pi * xn)
    np.testing.assert_allclose(y.numpy(), expected, rtol=0, atol=1e-12)  # float64 round-off
    np.testing.assert_allclose(
        ds.curve_function(x[:, 0], 0.01).numpy(), numpy_curve(xn, 0.01), atol=1e-12
    )
    assert ds.curve_function(np.array([0.1]))[0] == pytest.approx(numpy_curve(0.1))


def test_regression_curve_noise_enters_inside_the_sines():
    # eps inside the sines scales the residual y - f(x) by (1 + 0.6 pi cos + 1.2 pi cos):
    # residual std ~ 3.1 * noise, not noise. Reference: numpy Monte Carlo with 200k draws.
    # Sampling error of the std with 20k points is ~1% (and ~0.3% for the reference),
    # so 5% is a safe tolerance that still separates 0.063 from 0.02.
    noise = 0.02
    x, y = ds.regression_curve(20_000, seed=0, noise=noise, dtype=torch.float64)
    xn = x[:, 0].numpy()
    residual = y.numpy() - numpy_curve(xn)
    rng = np.random.default_rng(123)
    xr = rng.uniform(0.0, 0.5, 200_000)
    ref = numpy_curve(xr, noise * rng.standard_normal(xr.size)) - numpy_curve(xr)
    assert residual.std() == pytest.approx(ref.std(), rel=0.05)


@pytest.mark.parametrize(
    "kwargs, word",
    [({"n": 0}, "n"), ({"noise": -1.0}, "noise"), ({"low": 1.0, "high": 0.0}, "low")],
)
def test_regression_curve_errors(kwargs, word):
    with pytest.raises(ValueError, match=word):
        ds.regression_curve(**kwargs)


def test_curve_dataset():
    data = ds.curve(40, num_test=31, test_range=(-0.5, 1.0))
    assert data.task == "regression" and data.y_test is None
    assert (data.y_mean, data.y_std) == (0.0, 1.0)
    assert data.x_train.shape == (40, 1) and data.y_train.shape == (40,)
    assert data.x_train.min() >= 0.0 and data.x_train.max() <= 0.5
    np.testing.assert_allclose(
        data.x_test[:, 0].numpy(), np.linspace(-0.5, 1.0, 31), atol=1e-6
    )  # float32 grid
    assert "x_test=(31, 1)" in repr(data)
    with pytest.raises(ValueError, match="test_range"):
        ds.curve(test_range=(1.0, 0.0))
    with pytest.raises(ValueError, match="task"):
        ds.Dataset("bad", "ranking", data.x_train, data.y_train, data.x_test, None)


# ---------------------------------------------------------------- conjugate regression


def numpy_posterior(x, y, noise, prior_scale):
    precision = x.T @ x / noise**2 + np.eye(x.shape[1]) / prior_scale**2
    cov = np.linalg.inv(precision)
    return precision, cov, cov @ x.T @ y / noise**2


def test_conjugate_mean_equals_ridge():
    from sklearn.linear_model import Ridge

    ref = ds.conjugate_linear_regression(n=40, d=4, noise=0.7, prior_scale=0.5, correlation=0.6)
    ridge = Ridge(alpha=0.7**2 / 0.5**2, fit_intercept=False).fit(ref.x.numpy(), ref.y.numpy())
    # both are direct float64 solves of a well-conditioned 4x4 system
    np.testing.assert_allclose(ref.posterior_mean.numpy(), ridge.coef_, rtol=1e-8, atol=1e-10)
    assert ref.meanfield_mean is ref.posterior_mean


def test_conjugate_covariance_and_precision():
    ref = ds.conjugate_linear_regression(n=30, d=3, noise=0.3, prior_scale=2.0, seed=4, correlation=0.8)
    x, y = ref.x.numpy(), ref.y.numpy()
    precision, cov, mean = numpy_posterior(x, y, 0.3, 2.0)
    assert ref.x.dtype == torch.float64 and ref.x.shape == (30, 3) and ref.y.shape == (30,)
    np.testing.assert_allclose(ref.precision.numpy(), precision, rtol=1e-12)
    np.testing.assert_allclose(ref.posterior_cov.numpy(), cov, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ref.posterior_mean.numpy(), mean, rtol=1e-9)
    np.testing.assert_allclose(ref.exact_std.numpy(), np.sqrt(np.diag(cov)), rtol=1e-9)


def test_meanfield_is_the_kl_minimizer():
    from scipy.optimize import minimize

    ref = ds.conjugate_linear_regression(n=50, d=3, noise=0.5, seed=2, correlation=0.8)
    precision, cov, mu = numpy_posterior(ref.x.numpy(), ref.y.numpy(), 0.5, 1.0)
    d = len(mu)
    logdet_cov = np.linalg.slogdet(cov)[1]

    def kl(params):  # KL(N(m, diag s^2) || N(mu, cov)) in closed form
        m, log_s = params[:d], params[d:]
        diff = m - mu
        return 0.5 * (
            np.sum(np.diag(precision) * np.exp(2 * log_s))
            + diff @ precision @ diff - d + logdet_cov - 2 * np.sum(log_s)
        )

    def grad(params):
        m, log_s = params[:d], params[d:]
        return np.concatenate([precision @ (m - mu), np.diag(precision) * np.exp(2 * log_s) - 1])

    res = minimize(kl, np.zeros(2 * d), jac=grad, method="BFGS", options={"gtol": 1e-8})
    # the objective is smooth and strictly convex; a final gradient norm below 1e-7 with
    # curvatures >= O(1) puts the minimizer within ~1e-7 of the optimum, so rtol 1e-5 is loose
    assert res.success or np.linalg.norm(grad(res.x)) < 1e-7
    np.testing.assert_allclose(ref.meanfield_mean.numpy(), res.x[:d], atol=1e-5)
    np.testing.assert_allclose(ref.meanfield_std.numpy(), np.exp(res.x[d:]), rtol=1e-5)


def test_std_ratio_correlated_vs_orthogonal():
    correlated = ds.conjugate_linear_regression(correlation=0.8)
    precision, cov, _ = numpy_posterior(correlated.x.numpy(), correlated.y.numpy(), 0.5, 1.0)
    expected = 1 / np.sqrt(np.diag(precision) * np.diag(cov))
    np.testing.assert_allclose(correlated.std_ratio.numpy(), expected, rtol=1e-9)
    # population value 1/sqrt(C_ii (C^-1)_ii) = 0.54 for d=3, rho=0.8
    assert (correlated.std_ratio < 0.8).all()

    # exactly orthogonal columns: X^T X diagonal, so mean-field is exact
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((20, 3)))
    x = torch.from_numpy(q * np.array([1.0, 3.0, 5.0]))
    orthogonal = ds.ConjugateLinearRegression.from_data(x, x.sum(1), noise=0.5)
    np.testing.assert_allclose(orthogonal.std_ratio.numpy(), 1.0, atol=1e-12)


def test_synthetic_design_statistics():
    # n = 20000: the sampling s.e. of a correlation of 0.8 is (1 - 0.64)/sqrt(n) = 0.0025
    # and of a std ~ 0.5%, so tolerances of 0.02 and 3% are >= 6 s.e.
    ref = ds.conjugate_linear_regression(n=20_000, d=3, noise=0.5, correlation=0.8, seed=1)
    corr = np.corrcoef(ref.x.numpy(), rowvar=False)
    np.testing.assert_allclose(corr[np.triu_indices(3, 1)], 0.8, atol=0.02)
    np.testing.assert_allclose(ref.x.numpy().std(0), 1.0, atol=0.03)
    residual = ref.y.numpy() - ref.x.numpy() @ ref.true_weights.numpy()
    assert residual.std() == pytest.approx(0.5, rel=0.03)
    again = ds.conjugate_linear_regression(n=20_000, d=3, noise=0.5, correlation=0.8, seed=1)
    assert torch.equal(ref.y, again.y)


def test_conjugate_diabetes():
    from sklearn.datasets import load_diabetes
    from sklearn.preprocessing import StandardScaler

    raw_x, raw_y = load_diabetes(return_X_y=True)
    x = StandardScaler().fit_transform(raw_x)
    y = (raw_y - raw_y.mean()) / raw_y.std()
    beta = np.linalg.lstsq(x, y, rcond=None)[0]
    sigma = np.sqrt(np.sum((y - x @ beta) ** 2) / (x.shape[0] - x.shape[1]))

    ref = ds.conjugate_linear_regression("diabetes", noise=None, n=5, d=2)
    assert ref.x.shape == (442, 10)
    np.testing.assert_allclose(ref.x.numpy(), x, atol=1e-12)
    np.testing.assert_allclose(ref.y.numpy(), y, atol=1e-12)
    assert ref.noise == pytest.approx(sigma, rel=1e-10)
    assert ds.conjugate_linear_regression("diabetes", noise=0.3).noise == 0.3


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"noise": None}, "noise"),
        ({"correlation": 1.0}, "correlation"),
        ({"d": 3, "correlation": -0.6}, "correlation"),
        ({"source": "mnist"}, "source"),
        ({"prior_scale": 0.0}, "prior_scale"),
    ],
)
def test_conjugate_errors(kwargs, word):
    with pytest.raises(ValueError, match=word):
        ds.conjugate_linear_regression(**kwargs)


# ---------------------------------------------------------------- scikit-learn sets


@pytest.mark.parametrize(
    "name, rows, cols", [("diabetes", 442, 10), ("breast_cancer", 569, 30)]
)
def test_load_sklearn_shapes_and_standardization(name, rows, cols):
    data = ds.load_sklearn(name, test_fraction=0.25, seed=0)
    num_test = round(0.25 * rows)
    assert data.x_train.shape == (rows - num_test, cols)
    assert data.x_test.shape == (num_test, cols)
    assert data.y_train.shape == (rows - num_test,) and data.y_test.shape == (num_test,)
    assert len(data.feature_names) == cols
    x = data.x_train.double().numpy()
    # float32 storage of O(1) values: 1e-5 covers the round-off of mean and std
    np.testing.assert_allclose(x.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(x.std(0), 1.0, atol=1e-5)


def test_load_sklearn_targets():
    from sklearn.datasets import load_breast_cancer, load_diabetes

    cancer = ds.load_sklearn("breast_cancer")
    assert cancer.task == "classification" and cancer.num_classes == 2
    assert cancer.y_train.dtype == torch.int64
    assert set(cancer.y_train.tolist()) == {0, 1}
    labels = torch.cat([cancer.y_train, cancer.y_test]).numpy()
    np.testing.assert_array_equal(np.sort(labels), np.sort(load_breast_cancer().target))

    diabetes = ds.load_sklearn("diabetes")
    assert diabetes.task == "regression" and diabetes.y_train.dtype == torch.float32
    y = diabetes.y_train.double().numpy()
    assert abs(y.mean()) < 1e-5 and y.std() == pytest.approx(1.0, abs=1e-5)
    # back to original units: the targets are those of sklearn (float32 of values <= 346)
    original = torch.cat([diabetes.y_train, diabetes.y_test]).double() * diabetes.y_std
    original = original.numpy() + diabetes.y_mean
    np.testing.assert_allclose(np.sort(original), np.sort(load_diabetes().target), atol=1e-3)


def test_load_sklearn_seeds():
    a, b = ds.load_sklearn("diabetes", seed=3), ds.load_sklearn("diabetes", seed=3)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_test, ds.load_sklearn("diabetes", seed=4).y_test)


def test_load_sklearn_errors(monkeypatch):
    with pytest.raises(ValueError, match="name"):
        ds.load_sklearn("iris")
    with pytest.raises(ValueError, match="test_fraction"):
        ds.load_sklearn("diabetes", test_fraction=1.0)
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"pip install pyro_bbb\[datasets\]"):
        ds.load_sklearn("diabetes")


# ---------------------------------------------------------------- UCI layout


@needs_uci
def test_load_uci_yacht_split0():
    folder = UCI_ROOT / "yacht"
    raw = np.loadtxt(folder / "data.txt")
    train = np.loadtxt(folder / "index_train_0.txt", dtype=int)
    test = np.loadtxt(folder / "index_test_0.txt", dtype=int)
    features = np.loadtxt(folder / "index_features.txt", dtype=int)
    target = int(np.loadtxt(folder / "index_target.txt"))

    data = ds.load_uci("yacht", split=0, root=UCI_ROOT)
    assert data.name == "yacht" and data.task == "regression"
    assert data.x_train.shape == (len(train), len(features))
    assert data.x_test.shape == (len(test), len(features))
    assert data.y_train.shape == (len(train),) and data.y_test.shape == (len(test),)

    # training statistics (population std, as in the published protocol)
    x_mean, x_std = raw[train][:, features].mean(0), raw[train][:, features].std(0)
    np.testing.assert_allclose(data.x_train.double().numpy().mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(data.x_train.double().numpy().std(0), 1.0, atol=1e-5)
    np.testing.assert_allclose(
        data.x_test.numpy(), (raw[test][:, features] - x_mean) / x_std, atol=1e-5
    )
    assert data.y_mean == pytest.approx(raw[train, target].mean(), rel=1e-12)
    assert data.y_std == pytest.approx(raw[train, target].std(), rel=1e-12)
    # float32 of standardized targets: |y| < 10, so 1e-6 relative ~ 1e-4 in original units
    original = data.y_test.double().numpy() * data.y_std + data.y_mean
    np.testing.assert_allclose(original, raw[test, target], atol=1e-4)


@needs_uci
def test_load_uci_path_env_and_splits(monkeypatch):
    n_splits = int(np.loadtxt(UCI_ROOT / "yacht" / "n_splits.txt"))
    assert ds.uci_num_splits("yacht", root=UCI_ROOT) == n_splits
    by_path = ds.load_uci(str(UCI_ROOT / "yacht"), split=1, root="/nonexistent")
    monkeypatch.setenv("PYRO_BBB_UCI_ROOT", str(UCI_ROOT))
    by_env = ds.load_uci("yacht", split=1)
    assert torch.equal(by_path.x_train, by_env.x_train)
    assert torch.equal(by_path.y_test, by_env.y_test)


@needs_uci
def test_load_uci_errors(monkeypatch):
    with pytest.raises(ValueError, match=r"unknown.*'nope'.*yacht"):
        ds.load_uci("nope", root=UCI_ROOT)
    with pytest.raises(ValueError, match=r"20 splits"):
        ds.load_uci("yacht", split=20, root=UCI_ROOT)
    with pytest.raises(ValueError, match="split"):
        ds.load_uci("yacht", split=-1, root=UCI_ROOT)
    monkeypatch.delenv("PYRO_BBB_UCI_ROOT", raising=False)
    with pytest.raises(ValueError, match=r"root=.*PYRO_BBB_UCI_ROOT"):
        ds.load_uci("yacht")


def test_load_uci_layout_constant_feature(tmp_path):
    # A tiny hand-made folder (no n_splits.txt: splits are counted from the index files).
    folder = tmp_path / "toy"
    folder.mkdir()
    data = np.array([[1.0, 5.0, 2.0], [3.0, 5.0, 4.0], [5.0, 5.0, 9.0], [7.0, 5.0, 0.0]])
    np.savetxt(folder / "data.txt", data)
    (folder / "index_features.txt").write_text("0\n1\n")
    (folder / "index_target.txt").write_text("2\n")
    (folder / "index_train_0.txt").write_text("0\n1\n2\n")
    (folder / "index_test_0.txt").write_text("3\n")
    assert ds.uci_num_splits(folder) == 1

    toy = ds.load_uci(folder, dtype=torch.float64)
    assert toy.name == "toy"
    std0 = np.std([1.0, 3.0, 5.0])  # training column 0: mean 3
    np.testing.assert_allclose(toy.x_train[:, 0].numpy(), [-2 / std0, 0.0, 2 / std0])
    np.testing.assert_allclose(toy.x_test.numpy(), [[4 / std0, 0.0]])
    assert torch.all(toy.x_train[:, 1] == 0)  # constant feature: centred, not divided by 0
    assert toy.y_mean == pytest.approx(5.0) and toy.y_std == pytest.approx(np.std([2, 4, 9]))
    with pytest.raises(ValueError, match="1 splits"):
        ds.load_uci(folder, split=1)


# ---------------------------------------------------------------- UCI gap splits


def write_uci_folder(folder, data, features, target):
    folder.mkdir()
    np.savetxt(folder / "data.txt", data)
    (folder / "index_features.txt").write_text("".join(f"{j}\n" for j in features))
    (folder / "index_target.txt").write_text(f"{target}\n")


def test_load_uci_gap_holds_out_the_middle_third_by_the_feature(tmp_path):
    # 9 rows; inputs are columns 2 and 0 (in that order), the target column 1.  Sorted on
    # column 0 the rows are 4 7 1 | 8 0 3 | 6 2 5: the middle three are the test set.
    col0 = np.array([5.0, 3.0, 8.0, 6.0, 1.0, 9.0, 7.0, 2.0, 4.0])
    col1 = np.arange(9.0) * 10  # target: row i has target 10 i
    col2 = np.array([2.0, 7.0, 1.0, 9.0, 3.0, 8.0, 4.0, 6.0, 5.0])
    data = np.stack([col0, col1, col2], axis=1)
    folder = tmp_path / "toy"
    write_uci_folder(folder, data, features=[2, 0], target=1)
    assert ds.uci_num_gap_splits(folder) == 2

    gap = ds.load_uci_gap(folder, feature=1, dtype=torch.float64)
    assert gap.name == "toy" and gap.task == "regression"
    rows = lambda d, y: sorted(int(round(v)) for v in (y.numpy() * d.y_std + d.y_mean) / 10)
    test_rows, train_rows = rows(gap, gap.y_test), rows(gap, gap.y_train)
    assert test_rows == [0, 3, 8]
    assert train_rows == [1, 2, 4, 5, 6, 7]  # the rest: disjoint and complete
    # Standardized with the training rows' statistics (ddof=0), inputs in file order.
    train = np.array(train_rows)
    x_raw = data[:, [2, 0]]
    mean, std = x_raw[train].mean(0), x_raw[train].std(0)
    order = np.argsort(gap.y_test.numpy())  # targets increase with the row number
    np.testing.assert_allclose(gap.x_test.numpy()[order], (x_raw[[0, 3, 8]] - mean) / std)
    assert gap.y_mean == pytest.approx(data[train, 1].mean())
    assert gap.y_std == pytest.approx(data[train, 1].std())

    # On the other feature (column 2: rows 2 0 4 | 6 8 7 | 1 5 3) another middle third.
    other = ds.load_uci_gap(folder, feature=0, dtype=torch.float64)
    assert rows(other, other.y_test) == [6, 7, 8]
    with pytest.raises(ValueError, match=r"feature must be an integer in \[0, 2\).*2 input features"):
        ds.load_uci_gap(folder, feature=2)
    with pytest.raises(ValueError, match="feature"):
        ds.load_uci_gap(folder, feature=True)


def test_gap_split_ties_and_sizes():
    train, test = ds.gap_split([1.0, 1.0, 1.0, 1.0, 2.0, 2.0])  # ties: in row order
    assert test.tolist() == [2, 3] and train.tolist() == [0, 1, 4, 5]
    for n in (3, 10, 11, 308):
        train, test = ds.gap_split(np.arange(n)[::-1])
        assert len(test) == n - 2 * round(n / 3)
        assert sorted(np.concatenate([train, test]).tolist()) == list(range(n))
    with pytest.raises(ValueError, match="at least 3 rows"):
        ds.gap_split([1.0, 2.0])
    with pytest.raises(ValueError, match="fraction"):
        ds.gap_split([1.0, 2.0, 3.0], fraction=1.0)


@needs_uci
def test_load_uci_gap_yacht_every_feature():
    folder = UCI_ROOT / "yacht"
    raw = np.loadtxt(folder / "data.txt")
    features = np.loadtxt(folder / "index_features.txt", dtype=int)
    target = int(np.loadtxt(folder / "index_target.txt"))
    x_raw, y_raw, n = raw[:, features], raw[:, target], len(raw)
    assert ds.uci_num_gap_splits("yacht", root=UCI_ROOT) == len(features) == 6
    third = round(n / 3)
    for j in range(len(features)):
        # The rule, written out: rows ranked on feature j (ties in row order), the middle
        # third held out.
        ranked = sorted(range(n), key=lambda i: (x_raw[i, j], i))
        test = np.sort(ranked[third : n - third])
        train = np.sort(ranked[:third] + ranked[n - third :])
        # In between: every test value lies between the two training parts.
        assert x_raw[ranked[:third], j].max() <= x_raw[test, j].min()
        assert x_raw[test, j].max() <= x_raw[ranked[n - third :], j].min()

        gap = ds.load_uci_gap("yacht", feature=j, root=UCI_ROOT, dtype=torch.float64)
        mean, std = x_raw[train].mean(0), x_raw[train].std(0)
        np.testing.assert_allclose(gap.x_train.numpy(), (x_raw[train] - mean) / std, atol=1e-12)
        np.testing.assert_allclose(gap.x_test.numpy(), (x_raw[test] - mean) / std, atol=1e-12)
        assert gap.y_mean == pytest.approx(y_raw[train].mean(), rel=1e-12)
        assert gap.y_std == pytest.approx(y_raw[train].std(), rel=1e-12)
        np.testing.assert_allclose(gap.y_test.numpy() * gap.y_std + gap.y_mean, y_raw[test], atol=1e-9)
    with pytest.raises(ValueError, match="6 input features"):
        ds.load_uci_gap("yacht", feature=6, root=UCI_ROOT)
